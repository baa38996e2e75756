"""tau-normalisation (Kang et al., ICLR 2020, Sec. 4; official `tau_norm.py`).

Each class vector of the stage-1 classifier is divided by its norm to the power tau, w~_j = w_j / ||w_j||^tau,
which removes the head-class bias that shows up as larger ||w_j|| for frequent classes; no training. tau is chosen
on the val split over a grid (0..2 step 0.1 by default), never on the test split.

Bias handling (`tau_norm.bias`):
- 'drop' (the original): logits z_j = <w~_j, f>. tau = 0 gives the stage-1 logits *minus the bias* (so the
  stage-1 predictions only when the bias is zero), and tau = 1 gives z_j = ||f|| cos(w_j, f): exactly cosine
  classification (the per-sample factor ||f|| changes no argmax).
- 'keep': z_j = <w~_j, f> + b_j with the stage-1 bias unscaled. tau = 0 gives the stage-1 logits exactly; tau = 1
  is cosine classification plus the bias.

Because z_j(tau) = <w_j, f> / ||w_j||^tau, the sweep computes the dot products once and rescales columns per tau.
For a distilled student every head gets its own tau: each chosen on its own val accuracy ('per_head'), or the pair
that maximises the val accuracy of the averaged prediction ('avg', a full grid x grid search).
"""
from __future__ import annotations

import itertools
from typing import Mapping

import torch

from ..metrics import per_class_accuracy, split_accuracy
from .base import LinearHead, LinearResult, linear_head, select_heads
from ..errors import ConfigError
from .config import TauNormConfig
from .features import FeatureSet, HeadSpec

__all__ = ['tau_normalize', 'tau_logits', 'sweep', 'fit']


def tau_normalize(head: LinearHead, tau: float, bias: str = 'drop') -> LinearHead:
    """w_j / ||w_j||^tau for every class vector (rows of the (C, d) weight); bias dropped or kept unchanged."""
    if bias not in ('drop', 'keep'):
        raise ConfigError(f"tau_norm.bias must be 'drop' or 'keep', got {bias!r}")
    norms = head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)   # a zero vector stays zero
    return LinearHead(head.weight / norms.pow(tau), head.bias if bias == 'keep' else None, head.feature,
                      head.module_name)


def tau_logits(dots: torch.Tensor, norms: torch.Tensor, tau: float, bias: torch.Tensor | None) -> torch.Tensor:
    """(N, C) tau-normalised logits from the stage-1 dot products `dots` = f @ W.T and the class norms (C,)."""
    z = dots / norms.pow(tau)
    return z if bias is None else z + bias


def _scores(logits: torch.Tensor, targets: torch.Tensor, groups: Mapping[str, list[int]] | None) -> dict:
    """Selection accuracy (mean per-class, = top-1 on balanced splits), top-1 and the split accuracies."""
    preds = logits.argmax(1).cpu()
    targets = targets.cpu()
    class_acc = per_class_accuracy(preds, targets, logits.shape[1])
    out = {'acc': float(torch.nanmean(class_acc).item()),
           'top1': 100.0 * (preds == targets).double().mean().item()}
    if groups:
        out.update(split_accuracy(class_acc, groups))
    return out


def _prepare(head: LinearHead, feats: FeatureSet, bias: str):
    x = feats.features[head.feature]
    dots = x @ head.weight.to(x.device).T
    norms = head.weight.norm(dim=1).clamp_min(1e-12).to(x.device)
    b = head.bias.to(x.device) if (bias == 'keep' and head.bias is not None) else None
    return dots, norms, b


def sweep(heads: Mapping[str, LinearHead], feats: FeatureSet, grid: list[float], bias: str = 'drop',
          groups: Mapping[str, list[int]] | None = None, pairs: bool = False) -> dict:
    """Accuracy of every tau of `grid` for every head on one split.

    Args:
        heads: stage-1 linear heads by predictor name.
        feats: the split's cached features.
        grid: tau values.
        bias: 'drop' or 'keep'.
        groups: head/mid/tail class groups for split accuracies (optional).
        pairs: also score the averaged prediction of ('cls', 'dist') for every pair of taus.

    Returns:
        {'heads': {name: [{'tau', 'acc', 'top1', 'head', 'mid', 'tail'}, ...]},
         'avg': [[acc of (grid[i], grid[j]) ...] ...] (only with pairs)}.
    """
    prepared = {name: _prepare(h, feats, bias) for name, h in heads.items()}
    out: dict = {'heads': {}}
    for name, (dots, norms, b) in prepared.items():
        out['heads'][name] = [{'tau': t, **_scores(tau_logits(dots, norms, t, b), feats.targets, groups)}
                              for t in grid]
    if pairs:
        if not {'cls', 'dist'} <= set(prepared):
            raise ConfigError("tau_norm.select=avg needs a distilled student (CLS and DIST heads)")
        zc = [tau_logits(*prepared['cls'][:2], t, prepared['cls'][2]) for t in grid]
        (dd, nd, bd) = prepared['dist']
        acc = [[0.0] * len(grid) for _ in grid]
        for j, td in enumerate(grid):
            z_dist = tau_logits(dd, nd, td, bd)
            for i in range(len(grid)):
                acc[i][j] = _scores((zc[i] + z_dist) / 2, feats.targets, None)['acc']
        out['avg'] = acc
    return out


def _first_best(values: list[float]) -> int:
    """Index of the first maximum (ties go to the smaller tau of an ascending grid)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def fit(train: FeatureSet, heads: list[HeadSpec], cfg: TauNormConfig, *, val: FeatureSet | None = None,
        groups: dict[str, list[int]] | None = None, device: torch.device | str = 'cpu', seed: int = 0
        ) -> LinearResult:
    """Choose tau per head on `val` and return the tau-normalised heads (unselected heads stay unchanged).

    Args:
        train: unused (tau-norm needs no training data; same signature as the other methods).
        heads: the model's heads; every selected one must be nn.Linear.
        cfg: the `tau_norm` config section.
        val: validation features (required: tau is never chosen on the test split).
        groups: head/mid/tail groups, recorded in the sweep.
        device: where to compute the sweep.
        seed: unused.

    Returns:
        LinearResult; `info` holds the chosen taus and the full val sweep.
    """
    grid = [float(t) for t in cfg.grid]
    if not grid:
        raise ConfigError('tau_norm.grid is empty; give values, e.g. tau_norm.grid=[0.0,0.5,1.0]')
    chosen = select_heads(heads, cfg.heads, 'tau_norm.heads')
    stage1 = {h.name: linear_head(h, 'tau_norm') for h in chosen}
    if val is None:
        raise ConfigError('tau_norm chooses tau on a validation split and this dataset has none: set '
                             'data.val_per_class=N (a balanced hold-out of training-distribution images the '
                             'long-tailed subset did not use) or give data.val_list')
    pairs = cfg.select == 'avg'
    if pairs and {h.name for h in chosen} != {'cls', 'dist'}:
        raise ConfigError('tau_norm.select=avg needs a distilled student with both heads selected; '
                             'use tau_norm.select=per_head')
    val_d = val.to(device)
    result = sweep({k: h for k, h in stage1.items()}, val_d, grid, cfg.bias, groups, pairs=pairs)
    if pairs:
        flat = [(result['avg'][i][j], i, j) for i, j in itertools.product(range(len(grid)), repeat=2)]
        best = max(flat, key=lambda t: (t[0], -t[1], -t[2]))
        taus = {'cls': grid[best[1]], 'dist': grid[best[2]]}
    else:
        taus = {name: grid[_first_best([r['acc'] for r in rows])] for name, rows in result['heads'].items()}
    out = {}
    for h in heads:
        out[h.name] = (tau_normalize(stage1[h.name], taus[h.name], cfg.bias) if h.name in stage1
                       else linear_head(h, 'tau_norm (a head kept unchanged)'))
    info = {'tau': taus, 'bias': cfg.bias, 'select': cfg.select, 'grid': grid, 'val_sweep': result}
    return LinearResult('tau_norm', out, info)
