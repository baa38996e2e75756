"""Random erasing (timm/data/random_erasing.py), vectorised: per-sample boxes and fills, masks by broadcasting."""
from __future__ import annotations

import math

import torch

from ._common import _rand

__all__ = ['sample_erasing', 'apply_erasing']


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
