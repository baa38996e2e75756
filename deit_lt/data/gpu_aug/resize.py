"""Pillow's resize (Resample.c) as per-sample weight matrices, and per-sample crop boxes (timm's
RandomResizedCrop parameters, pad-and-crop). Every sum is exact in float64, so the result equals Pillow's."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._common import _rand, _round_half_up

__all__ = ['resize_weights', 'resample', 'sample_rrc_boxes']

_FILTER_SUPPORT = {'bicubic': 2.0, 'bilinear': 1.0}
_PIL_PRECISION_BITS = 22      # Pillow Resample.c: fixed-point coefficients for 8-bit images


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
