"""timm's RandAugment ops with PIL semantics, batched with per-sample ops, magnitudes and signs."""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import _rand, _round_half_up, _to_uint8_range
from .resize import _FILTER_SUPPORT

__all__ = ['BatchedRandAugment', 'GEOMETRIC_OPS', 'SUPPORTED_OPS', 'apply_ops', 'level_to_arg']

_LEVEL_DENOM = 10.0             # timm: magnitude M maps to the op argument through M / 10

# Ops grouped by how they are computed; each sample applies at most one op per layer, so the groups never overlap.
_LUT_OPS = frozenset({
    'AutoContrast', 'Equalize', 'Invert', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal', 'Solarize',
    'SolarizeIncreasing', 'SolarizeAdd', 'Brightness', 'BrightnessIncreasing', 'Contrast', 'ContrastIncreasing',
})
_BLEND_OPS = frozenset({'Color', 'ColorIncreasing', 'Sharpness', 'SharpnessIncreasing', 'Desaturate'})
GEOMETRIC_OPS = frozenset({
    'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel',
})
SUPPORTED_OPS = _LUT_OPS | _BLEND_OPS | GEOMETRIC_OPS


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

    if present & GEOMETRIC_OPS:
        affine = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=x.device, dtype=torch.float64).expand(b, 6)
        used = torch.zeros_like(op_id, dtype=torch.bool)
        for name in op_names:
            if name in GEOMETRIC_OPS:
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
