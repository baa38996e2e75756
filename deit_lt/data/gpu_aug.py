"""Batched, per-sample training augmentation on the device (the 'device' placement's fast path).

The DeiT / DeiT-LT recipe augments every image on the CPU with PIL through timm's
``create_transform(is_training=True)`` (timm/data/transforms_factory.py)::

    RandomResizedCropAndInterpolation -> RandomHorizontalFlip -> RandAugment ('rand-m9-mstd0.5-inc1')
    -> ToTensor -> Normalize -> RandomErasing (p 0.25, 'pixel', 1 box)

Small datasets (CIFAR, digits) are kept decoded on the device as one uint8 tensor, so this module computes the
same augmentation family with the same strength for a whole batch at once: every sample draws its own crop,
flip, RandAugment ops, magnitudes and erasing boxes, there is no Python loop over the batch and no host
synchronisation (no ``.item()``, no boolean-mask indexing, no ``.cpu()``), so it can run inside a training step.

Why our own code instead of the field's libraries:
- timm's RandAugment (timm/data/auto_augment.py) is PIL-only (per image, on the CPU).
- kornia's ``RandAugment`` draws the ops once per batch (only the sign varies per sample), uses its own
  magnitude scale without magnitude noise and an additive brightness, so it is not timm's 'rand-m9-mstd0.5-inc1'
  (see docs/ECOSYSTEM.md, section 1); torchvision v2 draws one parameter set per call.
timm itself still parses the RandAugment spec (``rand_augment_transform``), so the op set, probabilities,
magnitudes and hparams are timm's; we only re-implement the per-op pixel maths, batched.

How PIL is mirrored (all images stay in the uint8 value range, as float32 holding integers, and every op
re-quantises exactly where PIL does):
- crop + resize (``Image.resize`` after ``crop``, Pillow's Resample.c): the separable, antialiased convolution is
  written as one (out, in) weight matrix per axis and sample (PIL's coefficient rule: bicubic a=-0.5 or
  triangle, support widened when downscaling, taps limited to the crop box, normalised), applied with two
  batched matmuls; rounding after the horizontal and after the vertical pass, like PIL's two uint8 passes. The
  horizontal flip is folded into the column matrix.
- point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd, Brightness, Contrast) become a
  per-sample, per-channel 256-entry lookup table (PIL's own LUT formulas, incl. ``Image.blend``'s float32
  truncation), applied with one gather.
- Color / Sharpness (``ImageEnhance``): blend with the ITU-R 601 grey image (PIL's fixed-point L conversion) or
  the 3x3 SMOOTH-filtered image (border pixels kept), truncated like ``Image.blend``.
- geometric ops (Rotate, ShearX/Y, TranslateX/Y[Rel]): one affine matrix per sample mapping output pixel
  centres to input coordinates (Pillow's ``Image.transform`` convention), sampled with Pillow's Geometry.c
  kernels (bicubic with a=-1 or bilinear, edge-clamped taps, points outside the image take the fill colour
  ``img_mean``), truncated to uint8.
On the CPU every op and the resize reproduce Pillow 12 bit for bit on real images (tests/test_gpu_aug.py): the
resize uses Pillow's fixed-point coefficients with exact float64 sums, and geometric ops interpolate in float64
(``precise=True``; float32 puts ~0.01-4% of a warped image's pixels one level lower). What can still differ is
float contraction (fused multiply-adds, e.g. under torch.compile on the GPU), which can move a value that sits
exactly on a quantisation boundary by one uint8 level.

Random erasing follows timm/data/random_erasing.py (area 0.02-1/3 of the image divided by the box count,
log-uniform aspect 0.3-3.33, 10 attempts per box, 'pixel' / 'rand' / 'const' fills), with masks built by
broadcasting.

Randomness: ``DeviceAugment.sample_params`` draws everything from one ``torch.Generator`` (reproducible step by
step); ``DeviceAugment.apply`` is deterministic given the parameters, so it is the part to ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from deit_lt.config import AugConfig

__all__ = [
    'DeviceAugment', 'DeviceEvalTransform', 'BatchedRandAugment', 'SUPPORTED_OPS', 'apply_ops', 'level_to_arg',
    'resize_weights', 'resample', 'sample_rrc_boxes', 'sample_erasing', 'apply_erasing', 'resolve_channel_stats',
]

_LEVEL_DENOM = 10.0             # timm: magnitude M maps to the op argument through M / 10
_FILTER_SUPPORT = {'bicubic': 2.0, 'bilinear': 1.0}
_PIL_PRECISION_BITS = 22      # Pillow Resample.c: fixed-point coefficients for 8-bit images

# Ops grouped by how they are computed; each sample applies at most one op per layer, so the groups never overlap.
_LUT_OPS = frozenset({
    'AutoContrast', 'Equalize', 'Invert', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal', 'Solarize',
    'SolarizeIncreasing', 'SolarizeAdd', 'Brightness', 'BrightnessIncreasing', 'Contrast', 'ContrastIncreasing',
})
_BLEND_OPS = frozenset({'Color', 'ColorIncreasing', 'Sharpness', 'SharpnessIncreasing', 'Desaturate'})
_GEOMETRIC_OPS = frozenset({
    'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel',
})
SUPPORTED_OPS = _LUT_OPS | _BLEND_OPS | _GEOMETRIC_OPS


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------

def resolve_channel_stats(values: Sequence[float], chans: int, what: str = 'mean') -> tuple[float, ...]:
    """Per-channel statistics for a `chans`-channel image.

    A statistic with one entry per channel is used as is, a single entry is repeated. For 1-channel images and
    3-entry (RGB) statistics the entries are averaged (ImageNet's defaults give mean 0.449, std 0.226): a grey
    value then lands in the same range as the RGB normalisation puts it, whichever channel it stands for.

    Args:
        values: The configured statistic (e.g. ``AugConfig.mean``).
        chans: Number of image channels (1 or 3).
        what: Name used in error messages.

    Returns:
        A tuple with `chans` floats.
    """
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    if len(values) == 1:
        return values * chans
    if chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f'{what} has {len(values)} entries but the images have {chans} channels; give one entry per '
                     f'channel (or a single entry).')


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def _to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``(UINT8)`` cast of a clipped float: truncation (values are >= 0 after the clip)."""
    return torch.floor(x.clamp(0.0, 255.0))


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    gdev = generator.device
    if gdev.type != device.type or (gdev.index is not None and device.index is not None and gdev.index != device.index):
        raise ValueError(f'the generator lives on {gdev} but the images on {device}; create it with '
                         f'torch.Generator(device=images.device).manual_seed(seed).')


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Resize (Pillow Resample.c) as per-sample weight matrices
# --------------------------------------------------------------------------------------------------------------

def _pil_resample_filter(t: torch.Tensor, interpolation: str) -> torch.Tensor:
    t = t.abs()
    if interpolation == 'bilinear':
        return (1.0 - t).clamp(min=0.0)
    a = -0.5  # Pillow's bicubic resize kernel (Catmull-Rom); torch.nn.functional.interpolate uses a = -0.75
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def resize_weights(out_size: int, in_size: int, start: torch.Tensor, length: torch.Tensor,
                   interpolation: str = 'bicubic') -> torch.Tensor:
    """Weights that resize the window ``[start, start + length)`` of one axis to `out_size` pixels, like PIL.

    Mirrors Pillow's ``precompute_coeffs`` for ``img.crop(box).resize(size, filter)``: output pixel ``o`` is
    centred at ``(o + 0.5) * length / out_size`` inside the crop, the kernel is widened by the scale factor when
    downscaling (antialiasing), taps outside the crop are dropped and the remaining weights renormalised, then
    rounded to Pillow's 22-bit fixed point (``normalize_coeffs_8bpc``), so float64 sums reproduce PIL exactly.

    Args:
        out_size: Output length of the axis.
        in_size: Length of the axis in the full (uncropped) image.
        start: (B,) integer tensor, first pixel of each sample's crop window.
        length: (B,) integer tensor, window length (>= 1).
        interpolation: 'bicubic' or 'bilinear'.

    Returns:
        (B, out_size, in_size) float64 tensor; ``out = W @ in`` along the axis.
    """
    if interpolation not in _FILTER_SUPPORT:
        raise ValueError(f"interpolation must be one of {sorted(_FILTER_SUPPORT)}, got '{interpolation}'")
    dev = start.device
    start = start.to(torch.float64)[:, None, None]
    length = length.to(torch.float64)[:, None, None]
    scale = length / torch.full_like(length, out_size)     # tensor / tensor: true division, as Pillow's double
    filterscale = scale.clamp(min=1.0)
    support = _FILTER_SUPPORT[interpolation] * filterscale
    center = (torch.arange(out_size, device=dev, dtype=torch.float64)[None, :, None] + 0.5) * scale
    lo = torch.floor(center - support + 0.5).clamp(min=0.0)        # C's (int) cast; equal to floor once clamped
    hi = torch.minimum(torch.floor(center + support + 0.5), length)
    tap = torch.arange(in_size, device=dev, dtype=torch.float64)[None, None, :] - start   # crop-local index
    inside = (tap >= lo) & (tap < hi)
    w = _pil_resample_filter((tap - center + 0.5) / filterscale, interpolation) * inside
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    one = float(1 << _PIL_PRECISION_BITS)
    return torch.sign(w) * torch.floor(w.abs() * one + 0.5) / one    # round half away from zero, like Pillow


def resample(x: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor) -> torch.Tensor:
    """Separable resize with per-sample weights, re-quantised after each pass like PIL's two uint8 passes.

    The matmuls run in float64: with the fixed-point weights of ``resize_weights`` every sum is exact, so the
    result equals Pillow's, and TF32 settings (which only affect float32 matmuls) cannot change it.

    Args:
        x: (B, C, H, W) float tensor of uint8 values.
        wy: (B, H_out, H) row weights (``resize_weights``).
        wx: (B, W_out, W) column weights.

    Returns:
        (B, C, H_out, W_out) float32 tensor of uint8 values.
    """
    x = torch.matmul(x.to(torch.float64), wx.transpose(1, 2).unsqueeze(1))   # horizontal pass first, as Pillow
    x = _round_half_up(x).clamp(0.0, 255.0)
    x = torch.matmul(wy.unsqueeze(1), x)
    return _round_half_up(x).clamp(0.0, 255.0).to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------------------------

def sample_rrc_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                     generator: torch.Generator | None = None, device: torch.device | str = 'cpu',
                     attempts: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop boxes drawn like timm's ``RandomResizedCropAndInterpolation.get_params``.

    All `attempts` tries are drawn at once and the first one that fits is kept; samples without a fitting try use
    timm's fallback (central crop, clamped to the ratio range).

    Args:
        n: Number of boxes.
        height: Image height.
        width: Image width.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio w / h, sampled log-uniformly.
        generator: Random generator on `device` (None: global RNG).
        device: Device of the returned tensors.
        attempts: Number of tries before the fallback (timm: 10).

    Returns:
        boxes: (n, 4) int64 tensor (top, left, h, w).
        fallback: (n,) bool tensor, True where the fallback was used.
    """
    area = height * width
    u = _rand((n, attempts, 2), generator, device)
    target_area = (scale[0] + (scale[1] - scale[0]) * u[..., 0]) * area
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    tw = torch.round(torch.sqrt(target_area * aspect))              # round half to even, like Python's round
    th = torch.round(torch.sqrt(target_area / aspect))
    ok = (tw <= width) & (th <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)     # first fitting attempt (0 if none)
    found = ok.any(dim=1)
    h = th.gather(1, first).squeeze(1)
    w = tw.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh)).clamp(min=1)
    w = torch.where(found, w, torch.full_like(w, fw)).clamp(min=1)
    off = _rand((n, 2), generator, device)
    top = torch.where(found, torch.floor(off[:, 0] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    left = torch.where(found, torch.floor(off[:, 1] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long(), ~found


def _pad_crop_weights(out_size: int, in_size: int, offset: torch.Tensor, padding: int) -> torch.Tensor:
    """0/1 selection matrices for a crop of the zero-padded image (rows of zeros where the padding is)."""
    src = torch.arange(out_size, device=offset.device)[None, :] + offset[:, None] - padding     # (B, out)
    cols = torch.arange(in_size, device=offset.device)[None, None, :]
    return (cols == src[..., None]).to(torch.float64)


# --------------------------------------------------------------------------------------------------------------
# RandAugment ops (batched; PIL semantics)
# --------------------------------------------------------------------------------------------------------------

def level_to_arg(name: str, magnitude: torch.Tensor, sign: torch.Tensor, translate_const: float = 250.0,
                 translate_pct: float = 0.45) -> torch.Tensor:
    """Vectorised copy of timm's ``LEVEL_TO_ARG`` functions (same float64 operations, so the same values).

    Args:
        name: timm op name.
        magnitude: (N,) float64 magnitudes, already clipped.
        sign: (N,) float64 in {-1, +1}: the random negation timm applies to rotate/shear/translate/enhance.
        translate_const: timm hparam for absolute translation (pixels at magnitude 10).
        translate_pct: timm hparam for relative translation (fraction of the size at magnitude 10).

    Returns:
        (N,) float64 op argument: degrees, shear factor, pixels, fraction, bits, threshold, add or blend factor
        (0 for ops without argument).
    """
    level = magnitude / torch.full_like(magnitude, _LEVEL_DENOM)   # true division (torch may use a reciprocal)
    if name in ('AutoContrast', 'Equalize', 'Invert'):
        return torch.zeros_like(level)
    if name == 'Rotate':
        return level * 30.0 * sign
    if name in ('ShearX', 'ShearY'):
        return level * 0.3 * sign
    if name in ('TranslateX', 'TranslateY'):
        return level * float(translate_const) * sign
    if name in ('TranslateXRel', 'TranslateYRel'):
        return level * translate_pct * sign
    if name == 'Posterize':
        return torch.trunc(level * 4)
    if name == 'PosterizeIncreasing':
        return 4 - torch.trunc(level * 4)
    if name == 'PosterizeOriginal':
        return torch.trunc(level * 4) + 4
    if name == 'Solarize':
        return torch.trunc(level * 256).clamp(max=256)
    if name == 'SolarizeIncreasing':
        return 256 - torch.trunc(level * 256).clamp(max=256)
    if name == 'SolarizeAdd':
        return torch.trunc(level * 110).clamp(max=128)
    if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        return level * 1.8 + 0.1
    if name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'):
        return (1.0 + sign * (level * 0.9)).clamp(min=0.1)
    if name == 'Desaturate':
        # timm: level in [0.5, 1] (clamped), then ImageEnhance.Color factor min(1, max(0, 1 - level))
        return (1.0 - (0.5 + 0.5 * level).clamp(0.5, 1.0)).clamp(0.0, 1.0)
    raise ValueError(f"RandAugment op '{name}' is not supported on the device; supported: {sorted(SUPPORTED_OPS)}. "
                     f"Use the 'loader' placement (PIL) for this spec.")


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion, (19595 R + 38470 G + 7471 B + 0x8000) >> 16 (exact in float32). (B,1,H,W)."""
    if x.shape[1] == 1:
        return x
    s = 19595.0 * x[:, 0:1] + 38470.0 * x[:, 1:2] + 7471.0 * x[:, 2:3] + 32768.0
    return torch.floor(s / 65536.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageFilter.SMOOTH`` (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13), border pixels copied unchanged."""
    k_side, k_mid = x.new_tensor(1.0 / 13.0), x.new_tensor(5.0 / 13.0)    # float32 kernel, as Pillow's filter
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x

    def row(r: torch.Tensor, centre_weight) -> torch.Tensor:
        return r[..., :-2] * k_side + r[..., 1:-1] * centre_weight + r[..., 2:] * k_side

    inner = row(x[..., 2:, :], k_side) + row(x[..., 1:-1, :], k_mid) + row(x[..., :-2, :], k_side)
    inner = _round_half_up(inner).clamp(0.0, 255.0)
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _equalize_lut(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` lookup tables, (B, C, 256), from per-channel histograms (no host sync)."""
    b, c = x.shape[:2]
    idx = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, idx, torch.ones_like(idx))
    total = idx.shape[1]
    last = hist.gather(1, idx.amax(1, keepdim=True)).squeeze(1)     # count in the last non-empty bin
    step = (total - last) // 255
    n_used = (hist > 0).sum(1)
    cum = hist.cumsum(1) - hist                                      # pixels below each value
    lut = (step[:, None] // 2 + cum) // step.clamp(min=1)[:, None]
    ident = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(((n_used <= 1) | (step == 0))[:, None], ident, lut).clamp(max=255)  # PIL clips LUT values
    return lut.view(b, c, 256).to(x.dtype)


def _autocontrast_lut(x: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0) lookup tables, (B, C, 256), computed in float64 as PIL does."""
    lo = x.amin(dim=(2, 3)).to(torch.float64)[..., None]
    hi = x.amax(dim=(2, 3)).to(torch.float64)[..., None]
    # true division: torch turns `255.0 / t` into reciprocal(t) * 255, which rounds differently from PIL's double
    scale = torch.full_like(hi, 255.0) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    offset = -lo * scale
    lut = torch.trunc(ident * scale + offset).clamp(0.0, 255.0)
    return torch.where(hi > lo, lut, ident.expand_as(lut)).to(x.dtype)


def _blend_lut(base: torch.Tensor, factor: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
    """``Image.blend(constant base, image, factor)`` per value: float32 maths, clip, truncate. (B, 1, 256)."""
    ident32 = ident.to(torch.float32)
    return _to_uint8_range(base + factor.to(torch.float32) * (ident32 - base))


def _lut_for(name: str, x: torch.Tensor, arg: torch.Tensor, ident: torch.Tensor, cache: dict) -> torch.Tensor:
    """Lookup tables (B, C or 1, 256) of one LUT op for every sample of the batch."""
    a = arg[:, None, None]
    if name == 'AutoContrast':
        return _autocontrast_lut(x, ident)
    if name == 'Equalize':
        return _equalize_lut(x)
    if name == 'Invert':
        return (255.0 - ident).to(x.dtype).expand(x.shape[0], 1, 256)
    if name.startswith('Posterize'):
        q = torch.exp2((8.0 - a).clamp(min=0.0))              # keep `bits` MSBs: i & ~(2**(8 - bits) - 1)
        return torch.where(a >= 8, ident, torch.floor(ident / q) * q).to(x.dtype)
    if name.startswith('Solarize') and name != 'SolarizeAdd':
        return torch.where(ident < a, ident, 255.0 - ident).to(x.dtype)
    if name == 'SolarizeAdd':
        return torch.where(ident < 128, (ident + a).clamp(max=255.0), ident).to(x.dtype)
    if name.startswith('Brightness'):
        return _blend_lut(torch.zeros_like(a, dtype=torch.float32), a, ident)
    if name.startswith('Contrast'):
        if 'grey_mean' not in cache:
            grey = _grey(x).reshape(x.shape[0], -1)
            total = grey.to(torch.float64).sum(1)
            mean = total / torch.full_like(total, grey.shape[1])      # ImageStat mean of L; true division
            cache['grey_mean'] = torch.floor(mean + 0.5).to(torch.float32)[:, None, None]
        return _blend_lut(cache['grey_mean'], a, ident)
    raise AssertionError(name)


def _affine_for(name: str, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 6) float64 affine (a, b, c, d, e, f): output (x, y) -> input (a x + b y + c, d x + e y + f), PIL style."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == 'ShearX':
        return torch.stack([one, arg, zero, zero, one, zero], 1)
    if name == 'ShearY':
        return torch.stack([one, zero, zero, arg, one, zero], 1)
    if name in ('TranslateX', 'TranslateXRel'):
        px = arg * width if name == 'TranslateXRel' else arg
        return torch.stack([one, zero, px, zero, one, zero], 1)
    if name in ('TranslateY', 'TranslateYRel'):
        px = arg * height if name == 'TranslateYRel' else arg
        return torch.stack([one, zero, zero, zero, one, px], 1)
    if name == 'Rotate':  # Image.rotate(deg) about the centre (w/2, h/2), no expand
        angle = -torch.deg2rad(arg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = width / 2.0, height / 2.0
        c = cos * -cx + sin * -cy + cx
        f = -sin * -cx + cos * -cy + cy
        return torch.stack([cos, sin, c, -sin, cos, f], 1)
    raise AssertionError(name)


def _cubic_pil(v1, v2, v3, v4, d):
    """Pillow Geometry.c BICUBIC (a = -1), in its Horner form."""
    p2 = v3 - v1
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def warp_affine(x: torch.Tensor, affine: torch.Tensor, fill: torch.Tensor, interpolation: str,
                precise: bool = True) -> torch.Tensor:
    """Per-sample affine warp with PIL ``Image.transform(AFFINE)`` semantics.

    Output pixel centre (x + 0.5, y + 0.5) maps to input coordinates through `affine`; a point outside
    [0, W) x [0, H) takes the fill colour, otherwise the 4x4 (bicubic, a = -1) or 2x2 (bilinear) neighbourhood,
    with edge-clamped taps, is interpolated and truncated to uint8.

    Args:
        x: (B, C, H, W) float tensor of uint8 values.
        affine: (B, 6) float64 affine coefficients.
        fill: (C,) fill colour (uint8 values).
        interpolation: 'bicubic' or 'bilinear'.
        precise: Interpolate in float64 like Pillow (bit-exact); float32 halves the memory traffic in eager mode
            but puts ~0.01-4% of the pixels one level off (results that land exactly on an integer, e.g. a
            translation by 9.8 px, are truncated to the level below).

    Returns:
        (B, C, H, W) float32 tensor of uint8 values.
    """
    b, c, h, w = x.shape
    wdt = torch.float64 if precise else torch.float32
    # Coordinates always in float64 (two (B, H, W) maps): in float32 x + 9.8 can cross a pixel boundary.
    a = affine.to(torch.float64)[:, :, None, None]
    ys = (torch.arange(h, device=x.device, dtype=torch.float64) + 0.5)[None, :, None]
    xs = (torch.arange(w, device=x.device, dtype=torch.float64) + 0.5)[None, None, :]
    sx = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]                     # (B, H, W)
    sy = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sx, sy = sx - 0.5, sy - 0.5
    x0, y0 = torch.floor(sx), torch.floor(sy)
    dx, dy = (sx - x0)[:, None].to(wdt), (sy - y0)[:, None].to(wdt)
    x0, y0 = x0.long(), y0.long()
    flat = x.reshape(b, c, h * w)

    def tap(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, idx).view(b, c, h, w).to(wdt)

    # 16 (bicubic) or 4 (bilinear) gathers over the whole batch: in eager mode each one is a (B, C, H, W) pass, so
    # at 224 px this is the most expensive op; torch.compile fuses it into a few kernels.
    if interpolation == 'bicubic':
        rows = []
        for ty in range(-1, 3):
            v = [tap(y0 + ty, x0 + tx) for tx in range(-1, 3)]
            rows.append(_cubic_pil(*v, dx))
        out = _cubic_pil(*rows, dy)
    elif interpolation == 'bilinear':
        rows = []
        for ty in range(2):
            v0, v1 = tap(y0 + ty, x0), tap(y0 + ty, x0 + 1)
            rows.append(v0 + (v1 - v0) * dx)
        out = rows[0] + (rows[1] - rows[0]) * dy
    else:
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got '{interpolation}'")
    out = _to_uint8_range(out).to(x.dtype)
    return torch.where(inside[:, None], out, fill.to(x.dtype).view(1, c, 1, 1))


def apply_ops(x: torch.Tensor, op_names: Sequence[str], op_id: torch.Tensor, arg: torch.Tensor,
              fill: torch.Tensor, interpolation: str = 'bicubic', precise: bool = True) -> torch.Tensor:
    """Apply one op per sample (or none) to a batch.

    Every op family present in `op_names` is computed for the whole batch and selected per sample with
    ``torch.where``. That costs a few extra elementwise passes per layer (one LUT gather, one blend, one warp),
    but needs no data-dependent shapes: gathering the samples of each op into its own sub-batch would need the
    sub-batch sizes on the host (a sync per op and layer) and many tiny kernels.

    Args:
        x: (B, C, H, W) float32 tensor of uint8 values.
        op_names: Static list of timm op names; `op_id` indexes it.
        op_id: (B,) int64 op index per sample, -1 = no op.
        arg: (B,) float64 op argument per sample (``level_to_arg``).
        fill: (C,) fill colour for geometric ops.
        interpolation: 'bicubic' or 'bilinear' for geometric ops.
        precise: float64 interpolation in geometric ops (``warp_affine``).

    Returns:
        (B, C, H, W) float32 tensor of uint8 values.
    """
    for name in op_names:
        if name not in SUPPORTED_OPS:
            raise ValueError(f"RandAugment op '{name}' is not supported on the device; supported: "
                             f"{sorted(SUPPORTED_OPS)}. Use the 'loader' placement (PIL) for this spec.")
    b, c, h, w = x.shape
    masks = {name: op_id == k for k, name in enumerate(op_names)}
    present = set(op_names)

    if present & _LUT_OPS:
        ident = torch.arange(256, device=x.device, dtype=torch.float64)
        lut = ident.to(x.dtype).expand(b, c, 256)
        cache: dict = {}
        for name in op_names:
            if name in _LUT_OPS:
                lut = torch.where(masks[name][:, None, None], _lut_for(name, x, arg, ident, cache), lut)
        x = lut.gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w)

    if present & _BLEND_OPS:
        degenerate, factor, used = x, torch.ones_like(arg), torch.zeros_like(op_id, dtype=torch.bool)
        grey = _grey(x) if present & {'Color', 'ColorIncreasing', 'Desaturate'} else None
        smooth = _smooth(x) if present & {'Sharpness', 'SharpnessIncreasing'} else None
        for name in op_names:
            if name in _BLEND_OPS:
                m = masks[name]
                degenerate = torch.where(m[:, None, None, None], smooth if name.startswith('Sharpness') else grey,
                                         degenerate)
                factor = torch.where(m, arg, factor)
                used = used | m
        f = factor.to(x.dtype)[:, None, None, None]
        x = torch.where(used[:, None, None, None], _to_uint8_range(degenerate + f * (x - degenerate)), x)

    if present & _GEOMETRIC_OPS:
        affine = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=x.device, dtype=torch.float64).expand(b, 6)
        used = torch.zeros_like(op_id, dtype=torch.bool)
        for name in op_names:
            if name in _GEOMETRIC_OPS:
                m = masks[name]
                affine = torch.where(m[:, None], _affine_for(name, arg, h, w), affine)
                used = used | m
        x = torch.where(used[:, None, None, None], warp_affine(x, affine, fill, interpolation, precise), x)
    return x


class BatchedRandAugment:
    """timm RandAugment, per sample and batched.

    The spec is parsed by timm (``rand_augment_transform``) with the hparams timm's ``create_transform`` passes
    (``translate_const = int(0.45 * img_size)``, ``img_mean`` fill, interpolation), and the resulting op list,
    probabilities, magnitudes, magnitude noise and choice weights are read back from timm's objects.

    Per sample and layer: an op is chosen uniformly with replacement (or, for weighted specs, without replacement
    in proportion to the weights, via Gumbel-top-k, like ``np.random.choice(replace=False, p=...)``), applied
    with the op's probability, with magnitude ``N(m, mstd)`` (``U(0, m)`` for mstd = inf) clipped to
    [0, mmax or 10], mapped to the argument with timm's level functions and a random sign.

    Args:
        spec: timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1'.
        img_size: Output image size (sets timm's ``translate_const``).
        fill_mean: Per-channel mean in [0, 1]; the fill colour of geometric ops is round(255 * mean).
        interpolation: 'bicubic' or 'bilinear' for geometric ops.
        precise: float64 interpolation in geometric ops (bit-exact with PIL); False: float32 (see ``warp_affine``).
    """

    def __init__(self, spec: str, img_size: int, fill_mean: Sequence[float], interpolation: str = 'bicubic',
                 precise: bool = True):
        from timm.data.auto_augment import RandAugment, rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        if not isinstance(spec, str) or not spec.startswith('rand'):
            raise ValueError(f"only timm RandAugment specs ('rand-...') run on the device, got {spec!r}; use the "
                             f"'loader' placement for AutoAugment / AugMix.")
        if interpolation not in _FILTER_SUPPORT:
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got '{interpolation}'")
        hparams = dict(
            translate_const=int(img_size * 0.45),
            img_mean=tuple(min(255, round(255 * v)) for v in fill_mean),
            interpolation=str_to_pil_interp(interpolation),
        )
        try:
            ra = rand_augment_transform(spec, hparams)
        except AssertionError as e:
            raise ValueError(f'timm could not parse the RandAugment spec {spec!r}: {e}') from e
        if not isinstance(ra, RandAugment):
            raise ValueError(f'{spec!r} did not produce a timm RandAugment')
        names = [op.name for op in ra.ops]
        bad = sorted(set(names) - SUPPORTED_OPS)
        if bad:
            raise ValueError(f"RandAugment spec {spec!r} uses ops not supported on the device: {bad}; supported: "
                             f"{sorted(SUPPORTED_OPS)}. Use the 'loader' placement (PIL) for this spec.")
        self.spec = spec
        self.timm_transform = ra
        self.op_names = names
        self.num_layers = int(ra.num_layers)
        self.choice_weights = None if ra.choice_weights is None else [float(p) for p in ra.choice_weights]
        if self.choice_weights is not None and self.num_layers > len(names):
            raise ValueError(f'{spec!r}: weighted choice is without replacement, so n ({self.num_layers}) must not '
                             f'exceed the number of ops ({len(names)})')
        self.prob = [float(op.prob) for op in ra.ops]
        self.magnitude = [float(op.magnitude) for op in ra.ops]
        self.magnitude_std = [float(op.magnitude_std) for op in ra.ops]
        self.magnitude_max = [float(op.magnitude_max or _LEVEL_DENOM) for op in ra.ops]
        self.translate_const = [float(op.hparams.get('translate_const', 250)) for op in ra.ops]
        self.translate_pct = [float(op.hparams.get('translate_pct', 0.45)) for op in ra.ops]
        self.fill = tuple(float(v) for v in hparams['img_mean'])
        self.interpolation = interpolation
        self.precise = precise
        resample = {op.kwargs['resample'] for op in ra.ops}
        if resample != {hparams['interpolation']}:
            raise ValueError(f'unexpected per-op interpolation {resample} from timm for {spec!r}')

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str = 'cpu') -> dict[str, torch.Tensor]:
        """Draw ops, application flags, magnitudes and arguments for `n` samples.

        Returns:
            Dict of (num_layers, n) tensors: 'op' (int64, chosen op index), 'applied' (bool), 'magnitude'
            (float64, clipped; meaningful where applied), 'arg' (float64 op argument).
        """
        nl, k = self.num_layers, len(self.op_names)
        if self.choice_weights is None:
            op = torch.floor(_rand((nl, n), generator, device) * k).long().clamp(max=k - 1)
        else:
            logw = torch.log(torch.tensor(self.choice_weights, device=device, dtype=torch.float64))
            u = _rand((n, k), generator, device).clamp(min=1e-300)
            op = torch.topk(logw - torch.log(-torch.log(u)), nl, dim=1).indices.T.contiguous()

        def per_sample(values: list[float]) -> torch.Tensor:   # a per-op setting, looked up for each draw
            return torch.tensor(values, device=device, dtype=torch.float64)[op]

        applied = _rand((nl, n), generator, device) < per_sample(self.prob)
        m, std = per_sample(self.magnitude), per_sample(self.magnitude_std)
        mmax = per_sample(self.magnitude_max)
        z = torch.randn((nl, n), generator=generator, device=device, dtype=torch.float64)
        u = _rand((nl, n), generator, device)
        finite = torch.isfinite(std)
        noisy = torch.where(finite, m + torch.where(finite, std, torch.zeros_like(std)) * z, u * m)
        magnitude = torch.where(std > 0, noisy, m)
        magnitude = torch.minimum(magnitude, mmax).clamp(min=0.0)
        sign = torch.where(_rand((nl, n), generator, device) < 0.5, -1.0, 1.0).to(torch.float64)
        arg = torch.zeros_like(magnitude)
        for i, name in enumerate(self.op_names):
            a = level_to_arg(name, magnitude, sign, self.translate_const[i], self.translate_pct[i])
            arg = torch.where(op == i, a, arg)
        return dict(op=op, applied=applied, magnitude=magnitude, arg=arg)

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the sampled layers to `x` ((B, C, H, W) float32 of uint8 values)."""
        fill = torch.tensor(self.fill, device=x.device, dtype=x.dtype)
        fill = fill[:x.shape[1]] if fill.numel() >= x.shape[1] else fill.expand(x.shape[1])
        for layer in range(self.num_layers):
            op_id = torch.where(params['applied'][layer], params['op'][layer], -1)
            x = apply_ops(x, self.op_names, op_id, params['arg'][layer], fill, self.interpolation, self.precise)
        return x


# --------------------------------------------------------------------------------------------------------------
# Random erasing (timm/data/random_erasing.py, vectorised)
# --------------------------------------------------------------------------------------------------------------

def sample_erasing(n: int, chans: int, height: int, width: int, probability: float, mode: str = 'pixel',
                   max_count: int = 1, generator: torch.Generator | None = None, device: torch.device | str = 'cpu',
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   attempts: int = 10) -> dict[str, torch.Tensor]:
    """Boxes and fill values for timm-style random erasing of `n` images.

    Returns:
        Dict with 'boxes' (n, K, 4) int64 (top, left, h, w), 'active' (n, K) bool, and 'fill': (n, C, H, W)
        normal noise ('pixel'), (n, K, C) normal colours ('rand') or (n, K, C) zeros ('const'); K = max_count.
    """
    if mode not in ('pixel', 'rand', 'const'):
        raise ValueError(f"re_mode must be 'pixel', 'rand' or 'const', got '{mode}'")
    k = max(1, int(max_count))
    area = height * width
    apply = _rand((n,), generator, device) < probability                 # timm erases unless random() > p
    if k > 1:  # timm draws the count uniformly in [1, max_count]
        count = torch.floor(_rand((n,), generator, device) * k) + 1
    else:
        count = torch.ones(n, device=device, dtype=torch.float64)
    u = _rand((n, k, attempts, 2), generator, device)
    target = (min_area + (max_area - min_area) * u[..., 0]) * area / count[:, None, None]
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    bh = torch.round(torch.sqrt(target * aspect))
    bw = torch.round(torch.sqrt(target / aspect))
    ok = (bw < width) & (bh < height)
    first = torch.argmax(ok.to(torch.int8), dim=2, keepdim=True)
    bh, bw = bh.gather(2, first).squeeze(2), bw.gather(2, first).squeeze(2)
    active = apply[:, None] & ok.any(2) & (torch.arange(k, device=device)[None, :] < count[:, None])
    off = _rand((n, k, 2), generator, device)
    top = torch.floor(off[..., 0] * (height - bh + 1))
    left = torch.floor(off[..., 1] * (width - bw + 1))
    boxes = torch.stack([top, left, bh, bw], dim=-1).long()
    if mode == 'pixel':
        # One noise image per sample: where boxes overlap the pixel is still one fresh N(0, 1) draw, as in timm.
        fill = torch.randn((n, chans, height, width), generator=generator, device=device)
    elif mode == 'rand':
        fill = torch.randn((n, k, chans), generator=generator, device=device)
    else:
        fill = torch.zeros((n, k, chans), device=device)
    return dict(boxes=boxes, active=active, fill=fill)


def apply_erasing(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Erase the sampled boxes of a normalised batch (B, C, H, W); later boxes overwrite earlier ones."""
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    boxes, active, fill = params['boxes'], params['active'], params['fill']
    for i in range(boxes.shape[1]):
        top, left, bh, bw = (boxes[:, i, j, None, None] for j in range(4))
        m = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw) & active[:, i, None, None]
        value = fill if fill.dim() == 4 else fill[:, i, :, None, None]
        x = torch.where(m[:, None], value.to(x.dtype), x)
    return x


# --------------------------------------------------------------------------------------------------------------
# Public transforms
# --------------------------------------------------------------------------------------------------------------

class DeviceAugment:
    """The timm/DeiT training transform, batched on the images' device with per-sample randomness.

    crop ('rrc' | 'pad_crop' | 'none') -> horizontal flip -> RandAugment (or, without it, optional colour jitter)
    -> normalise -> random erasing. Mixup/CutMix are applied later by the engine.

    Colour jitter (``cfg.color_jitter`` = j, only when ``cfg.rand_augment`` is null, as in timm) is torchvision's
    ``ColorJitter(j, j, j)`` on PIL images: brightness, contrast and saturation factors uniform in
    [max(0, 1 - j), 1 + j], applied in a random order per sample with ``ImageEnhance`` semantics.

    1-channel images: statistics with three entries are averaged (``resolve_channel_stats``); colour ops (Color,
    saturation) are the identity, as in PIL for 'L' images.

    Args:
        cfg: Augmentation section of the config.
        img_size: Output size (square).
        in_chans: Number of image channels (1 or 3).
        precise: float64 interpolation in RandAugment's geometric ops, bit-exact with PIL (default). False uses
            float32: about half the memory traffic of those ops in eager mode, with ~0.01-4% of the pixels of a
            warped image one uint8 level off. Under torch.compile the difference in cost is small.
    """

    def __init__(self, cfg: AugConfig, img_size: int, in_chans: int = 3, *, precise: bool = True):
        if in_chans not in (1, 3):
            raise ValueError(f'in_chans must be 1 or 3, got {in_chans}')
        if cfg.crop not in ('rrc', 'pad_crop', 'none'):
            raise ValueError(f"aug.crop must be 'rrc', 'pad_crop' or 'none', got '{cfg.crop}'")
        if cfg.interpolation not in _FILTER_SUPPORT:
            raise ValueError(f"aug.interpolation must be 'bicubic' or 'bilinear', got '{cfg.interpolation}'")
        scale, ratio = tuple(float(v) for v in cfg.scale), tuple(float(v) for v in cfg.ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f'aug.scale must be (min, max) with 0 < min <= max, got {cfg.scale}')
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f'aug.ratio must be (min, max) with 0 < min <= max, got {cfg.ratio}')
        if not 0.0 <= cfg.hflip <= 1.0 or not 0.0 <= cfg.re_prob <= 1.0:
            raise ValueError(f'aug.hflip and aug.re_prob must be probabilities, got {cfg.hflip}, {cfg.re_prob}')
        if cfg.re_mode not in ('pixel', 'rand', 'const') or cfg.re_count < 1:
            raise ValueError(f"aug.re_mode must be 'pixel', 'rand' or 'const' and aug.re_count >= 1, got "
                             f"'{cfg.re_mode}', {cfg.re_count}")
        if cfg.crop == 'pad_crop' and cfg.padding < 0:
            raise ValueError(f'aug.padding must be >= 0, got {cfg.padding}')
        self.cfg = cfg
        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.scale, self.ratio = scale, ratio
        self.mean = resolve_channel_stats(cfg.mean, in_chans, 'aug.mean')
        self.std = resolve_channel_stats(cfg.std, in_chans, 'aug.std')
        self.rand_augment = None
        if cfg.rand_augment:
            self.rand_augment = BatchedRandAugment(cfg.rand_augment, self.img_size, self.mean, cfg.interpolation,
                                                   precise)
        self.color_jitter = float(cfg.color_jitter) if (not cfg.rand_augment and cfg.color_jitter) else None

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f'images must be a (B, C, H, W) uint8 tensor, got {tuple(images.shape)} '
                             f'{images.dtype}')
        if images.shape[1] != self.in_chans:
            raise ValueError(f'images have {images.shape[1]} channels but DeviceAugment was built for '
                             f'in_chans={self.in_chans} (channels-first (B, C, H, W) expected)')
        if self.cfg.crop == 'pad_crop' and tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"aug.crop='pad_crop' needs images of the output size {self.img_size}x{self.img_size}, "
                             f"got {tuple(images.shape[-2:])}; use crop='rrc' or 'none' to change the size.")

    def sample_params(self, batch_size: int, in_size: tuple[int, int], device: torch.device | str,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw every random number of one batch (crop boxes, flips, RandAugment layers, jitter, erasing).

        Args:
            batch_size: Number of images B.
            in_size: (H, W) of the input images.
            device: Device to draw on (the images' device).
            generator: Random generator on `device` (None: global RNG).

        Returns:
            Dict of tensors: 'crop' (B, 4) int64 (top, left, h, w) in input pixels ('pad_crop': offsets into the
            padded image), 'crop_fallback' (B,), 'flip' (B,) bool, 'ra_op'/'ra_applied'/'ra_magnitude'/'ra_arg'
            (layers, B), 'cj_order' (3, B) / 'cj_factor' (3, B), 're_boxes'/'re_active'/'re_fill'.
        """
        device = torch.device(device)
        _check_generator(generator, device)
        n, (h, w), cfg = batch_size, in_size, self.cfg
        p: dict[str, torch.Tensor] = {}
        if cfg.crop == 'rrc':
            p['crop'], p['crop_fallback'] = sample_rrc_boxes(n, h, w, self.scale, self.ratio, generator, device)
        elif cfg.crop == 'pad_crop':
            span = 2 * cfg.padding + 1
            off = torch.floor(_rand((n, 2), generator, device) * span).long()
            size = torch.full((n, 2), self.img_size, device=device, dtype=torch.long)
            p['crop'] = torch.cat([off, size], 1)
        else:
            p['crop'] = torch.tensor([0, 0, h, w], device=device).expand(n, 4)
        p['flip'] = _rand((n,), generator, device) < cfg.hflip
        if self.rand_augment is not None:
            for key, value in self.rand_augment.sample(n, generator, device).items():
                p['ra_' + key] = value
        elif self.color_jitter is not None:
            j = self.color_jitter
            p['cj_order'] = torch.argsort(_rand((n, 3), generator, device), dim=1).T.contiguous()
            lo, hi = max(0.0, 1.0 - j), 1.0 + j
            p['cj_factor'] = lo + (hi - lo) * _rand((3, n), generator, device)   # per op: brightness, contrast, sat.
        if cfg.re_prob > 0:
            er = sample_erasing(n, self.in_chans, self.img_size, self.img_size, cfg.re_prob, cfg.re_mode,
                                cfg.re_count, generator, device)
            for key, value in er.items():
                p['re_' + key] = value
        return p

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Deterministic part: augment `images` ((B, C, H, W) uint8) with `params` from ``sample_params``.

        Returns:
            (B, C, img_size, img_size) float32, normalised.
        """
        self._check_images(images)
        b, c, h, w = images.shape
        s, cfg = self.img_size, self.cfg
        x = images.to(torch.float32)
        top, left, ch, cw = params['crop'].unbind(1)
        if cfg.crop == 'pad_crop':
            wy = _pad_crop_weights(s, h, top, cfg.padding)
            wx = _pad_crop_weights(s, w, left, cfg.padding)
        else:
            wy = resize_weights(s, h, top, ch, cfg.interpolation)
            wx = resize_weights(s, w, left, cw, cfg.interpolation)
        wx = torch.where(params['flip'][:, None, None], wx.flip(1), wx)    # flipping the output = reversed rows
        x = resample(x, wy, wx)

        if self.rand_augment is not None:
            x = self.rand_augment.apply(x, {k[3:]: v for k, v in params.items() if k.startswith('ra_')})
        elif 'cj_order' in params:
            names = ['Brightness', 'Contrast', 'Color']
            fill = torch.zeros(c, device=x.device)
            for pos in range(3):
                op_id = params['cj_order'][pos]
                arg = params['cj_factor'].gather(0, op_id[None]).squeeze(0)
                x = apply_ops(x, names, op_id, arg, fill)

        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        x = (x / 255.0 - mean) / std                     # ToTensor + Normalize
        if 're_boxes' in params:
            x = apply_erasing(x, {k[3:]: v for k, v in params.items() if k.startswith('re_')})
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: (B, C, H, W) uint8 on any device (C = in_chans).
            generator: torch.Generator on the images' device (None = global RNG); a step is reproducible from its
                seed.

        Returns:
            (B, C, img_size, img_size) float32, normalised with the configured mean/std, augmented per sample.
        """
        self._check_images(images)
        params = self.sample_params(images.shape[0], tuple(images.shape[-2:]), images.device, generator)
        return self.apply(images, params)


class DeviceEvalTransform:
    """timm's eval transform on a batch: resize the short side to ``floor(img_size / crop_pct)`` (PIL-style,
    antialiased when downscaling), centre crop `img_size`, normalise. An identity resize is skipped.

    Args:
        img_size: Output size (square).
        crop_pct: Fraction of the resized image kept, in (0, 1].
        interpolation: 'bicubic' or 'bilinear'.
        mean: Normalisation mean (per channel, or 3 entries averaged for 1-channel input).
        std: Normalisation std.
    """

    def __init__(self, img_size: int, crop_pct: float, interpolation: str, mean, std):
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
        if interpolation not in _FILTER_SUPPORT:
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got '{interpolation}'")
        self.img_size = int(img_size)
        self.crop_pct = float(crop_pct)
        self.scale_size = math.floor(self.img_size / self.crop_pct)
        self.interpolation = interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache: dict = {}

    def _weights(self, h: int, w: int, device: torch.device):
        key = (h, w, str(device))
        if key not in self._cache:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.scale_size, int(self.scale_size * long / short)   # torchvision Resize(int)
            nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            top = int(round((nh - self.img_size) / 2.0))                                  # torchvision CenterCrop
            left = int(round((nw - self.img_size) / 2.0))
            zero = torch.zeros(1, dtype=torch.long, device=device)
            wy = resize_weights(nh, h, zero, zero + h, self.interpolation)[:, top:top + self.img_size]
            wx = resize_weights(nw, w, zero, zero + w, self.interpolation)[:, left:left + self.img_size]
            self._cache[key] = (nh, nw, top, left, wy, wx)
        return self._cache[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images: (B, C, H, W) uint8. Returns: (B, C, img_size, img_size) float32, normalised."""
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f'images must be a (B, C, H, W) uint8 tensor, got {tuple(images.shape)} '
                             f'{images.dtype}')
        b, c, h, w = images.shape
        nh, nw, top, left, wy, wx = self._weights(h, w, images.device)
        x = images.to(torch.float32)
        if (nh, nw) == (h, w):          # PIL copies on an identity resize; only the crop remains
            x = x[:, :, top:top + self.img_size, left:left + self.img_size]
        else:
            x = resample(x, wy.expand(b, -1, -1), wx.expand(b, -1, -1))
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f'image of {h}x{w} is too small for a {self.img_size} crop')
        mean = torch.tensor(resolve_channel_stats(self.mean, c, 'mean'), device=x.device).view(1, c, 1, 1)
        std = torch.tensor(resolve_channel_stats(self.std, c, 'std'), device=x.device).view(1, c, 1, 1)
        return (x / 255.0 - mean) / std
