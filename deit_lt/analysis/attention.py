"""Mean attention distance of a vision transformer's heads, read from the model's own attention blocks.

Definition (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, appendix D.7 and Fig. 7): for a query
patch i, the attention-weighted mean of the pixel distance d(i, j) between the centre of patch i and the centre of
every key patch j; averaged over the query patches of an image, then over the images, per block and head. DeiT-LT
(Rangwani et al., CVPR 2024) reads it per block and head to argue that distillation from a CNN makes the early
blocks attend locally.

The attention matrix of a timm `Attention` block spans the prefix tokens (CLS, and DIST for distilled students)
and the patch tokens, and a prefix token has no position in the image. What is used here, exactly:

- rows: the patch-token queries only (the CLS / DIST query rows have no position, so no distance);
- columns: the patch-token keys, with each query row renormalised over them, i.e. the distance is the expected
  distance given that the query attends to a patch;
- the share of each patch query's attention that goes to the prefix columns (CLS, DIST) is reported beside it
  (`prefix_attention`, averaged like the distance), so no part of the CLS-and-patch attention is dropped silently.

Distances are Euclidean, in pixels of the model's input, between patch centres ((r + 1/2) p_h, (c + 1/2) p_w).

The maps come from the model's own blocks: timm's `Attention.forward` computes the softmax matrix only on its
unfused path (`fused_attn = False`), where it passes through `attn_drop` (identity in eval mode), so a forward hook on
`attn_drop` sees it (timm 1.0.31, `timm/layers/attention.py` lines 123-137; `tests/test_analysis.py` checks the
captured maps against softmax(q k^T / sqrt(d)) of each block's own projections). `attention_hooks` switches the fused
path off for the duration and restores it after; the meter reduces each map as soon as it is produced, so no
(B, H, T, T) tensor outlives its block.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from timm.layers import Attention
from torch import nn

from ..models.factory import unwrap_model

__all__ = ['attention_modules', 'attention_hooks', 'patch_centres', 'patch_distances', 'mean_attention_distance',
           'AttentionDistanceMeter']


def attention_modules(model: nn.Module) -> list[tuple[str, Attention]]:
    """The timm `Attention` modules of `model`, in forward order (one per transformer block); [] for CNNs."""
    return [(name, m) for name, m in unwrap_model(model).named_modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def attention_hooks(model: nn.Module, fn: Callable[[int, torch.Tensor], None]) -> Iterator[int]:
    """Call `fn(block index, attention (B, H, T, T))` for every attention map the model computes inside the block.

    The softmax maps are post-softmax probabilities (rows sum to 1) over all T = prefix + patch tokens. Yields the
    number of attention modules found. The model should be in eval mode (otherwise attention dropout alters them).
    """
    modules = [m for _, m in attention_modules(model)]
    fused = [m.fused_attn for m in modules]
    handles = []
    try:
        for i, m in enumerate(modules):
            m.fused_attn = False   # the only path on which timm materialises the attention matrix
            handles.append(m.attn_drop.register_forward_hook(lambda _m, _inp, out, i=i: fn(i, out)))
        yield len(modules)
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(modules, fused):
            m.fused_attn = f


def patch_centres(grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """(N, 2) pixel coordinates (row, column) of the patch centres, patches in row-major order (timm's
    `PatchEmbed` flattening), N = grid_h * grid_w."""
    gh, gw = grid_size
    ph, pw = patch_size
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5) * ph
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5) * pw
    r, c = torch.meshgrid(rows, cols, indexing='ij')
    return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)


def patch_distances(grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean pixel distances between patch centres (float64)."""
    centres = patch_centres(grid_size, patch_size)
    return torch.cdist(centres, centres)


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor, num_prefix_tokens: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention distance and prefix-token attention share of every image and head.

    Args:
        attn: (B, H, T, T) attention probabilities, T = num_prefix_tokens + N; row = query, column = key.
        distances: (N, N) pixel distances between patch centres (`patch_distances`).
        num_prefix_tokens: P, the CLS (and DIST) tokens that precede the patches.

    Returns:
        (distance (B, H), prefix share (B, H)): per image and head, the mean over patch queries i of
        sum_j a_ij d_ij / sum_j a_ij (j over patch keys), and the mean over patch queries of sum_{k < P} a_ik.
    """
    p = num_prefix_tokens
    n = distances.shape[0]
    if attn.shape[-1] != p + n or attn.shape[-2] != p + n:
        raise ValueError(f'attention over {attn.shape[-1]} tokens, but {p} prefix + {n} patch tokens expected')
    a = attn[:, :, p:, :]                                      # (B, H, N, P + N): patch queries only
    to_patches = a[..., p:]                                    # (B, H, N, N)
    # reductions in the map's own precision (no float64 copy of the map), per-query results in float64
    prefix = a[..., :p].sum(-1).double()                       # (B, H, N)
    mass = to_patches.sum(-1).double()
    weighted = torch.einsum('bhij,ij->bhi', to_patches, distances.to(a.device, a.dtype)).double()   # sum_j a_ij d_ij
    dist = weighted / mass.clamp_min(torch.finfo(torch.float64).tiny)
    return dist.mean(-1), prefix.mean(-1)


class AttentionDistanceMeter:
    """Running mean attention distance per block and head of one ViT over the images it is shown.

    Args:
        num_blocks: transformer blocks (attention modules) L.
        num_heads: heads per block H.
        num_prefix_tokens: CLS (+ DIST) tokens before the patches.
        grid_size: patch grid (rows, columns).
        patch_size: patch size in pixels (rows, columns).
        device: where the maps arrive (sums stay there until `result`, so updates never synchronise).
    """

    def __init__(self, num_blocks: int, num_heads: int, num_prefix_tokens: int, grid_size: tuple[int, int],
                 patch_size: tuple[int, int], device: torch.device | str = 'cpu'):
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size)
        self.patch_size = tuple(patch_size)
        self.distances = patch_distances(grid_size, patch_size).to(device)
        self.dist_sum = torch.zeros(num_blocks, num_heads, dtype=torch.float64, device=device)
        self.prefix_sum = torch.zeros_like(self.dist_sum)
        self.count = torch.zeros(num_blocks, dtype=torch.long)

    def update(self, block: int, attn: torch.Tensor) -> None:
        """Add the images of one block's (B, H, T, T) attention map."""
        dist, prefix = mean_attention_distance(attn.detach(), self.distances, self.num_prefix_tokens)
        self.dist_sum[block] += dist.sum(0)
        self.prefix_sum[block] += prefix.sum(0)
        self.count[block] += len(attn)

    def result(self) -> dict:
        """{'distance': (L, H) nested list in pixels, 'prefix_attention': (L, H) shares, 'num_images', grid and
        patch sizes, 'max_distance': the largest patch-centre distance}."""
        if int(self.count.min()) == 0 or int(self.count.max()) != int(self.count.min()):
            raise RuntimeError(f'attention maps seen per block: {self.count.tolist()}; expected the same non-zero '
                               f'count for every block')
        n = self.count[:, None].to(torch.float64)
        return {
            'distance': (self.dist_sum.cpu() / n).tolist(),
            'prefix_attention': (self.prefix_sum.cpu() / n).tolist(),
            'num_images': int(self.count[0]),
            'grid_size': list(self.grid_size),
            'patch_size': list(self.patch_size),
            'num_prefix_tokens': self.num_prefix_tokens,
            'max_distance': float(self.distances.max()),
            'uniform_distance': float(self.distances.mean()),   # what attention spread evenly would give
            'image_size': [g * p for g, p in zip(self.grid_size, self.patch_size)],
        }
