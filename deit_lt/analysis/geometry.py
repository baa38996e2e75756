"""Classifier geometry: the weight norm of every class in every linear head, against the class's training count.

Kang et al. ("Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020, Fig. 2) show that
a jointly trained classifier's per-class weight norms ||w_j|| grow with the class's training count, which biases
the decision towards head classes, and that re-balancing (cRT, tau-norm, LWS) flattens them. Given a model and its
re-balanced version (`tools/rebalance.py`, kind 'rebalanced'), the two sets of norms show that before / after
picture for each head.

Heads, named by what they read: 'cls' (the CLS-token head of a student or of a plain ViT), 'dist' (the DIST-token
head), 'cnn' (a CNN teacher's classifier), 'pooled' (a transformer without a class token). For nn.Linear the norm
of class j is that of row j of the (C, d) weight; a cosine head (`NormedLinear`, LDAM teachers) stores (d, C) and
normalises its columns in the forward pass, so its norms are reported but have no effect on its logits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..models.factory import unwrap_model
from ..models.layers.normed_linear import NormedLinear
from ..rebalance.features import model_heads

__all__ = ['head_role', 'classifier_norms', 'spearman']


def head_role(model: nn.Module, predictor: str) -> str:
    """'cls' / 'dist' for a student's heads, 'cls' for a plain ViT's token head, 'cnn' for CNNs, else 'pooled'."""
    if predictor in ('cls', 'dist'):
        return predictor
    m = unwrap_model(model)
    if getattr(m, 'blocks', None) is None:
        return 'cnn'
    return 'cls' if getattr(m, 'cls_token', None) is not None and getattr(m, 'global_pool', '') == 'token' \
        else 'pooled'


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """0-based ranks of `a`, tied values sharing the mean of their ranks."""
    ranks = np.empty(len(a))
    ranks[np.argsort(a, kind='stable')] = np.arange(len(a), dtype=float)
    _, inverse = np.unique(a, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two sequences (Pearson correlation of their average ranks); NaN when either is
    constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float('nan')
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def classifier_norms(model: nn.Module, train_counts: Sequence[int]) -> dict:
    """Per-class weight norms of every classifier head.

    Args:
        model: a deit-lt model (student, teacher or re-balanced).
        train_counts: (C,) training images per class.

    Returns:
        {role: {'module': state-dict name, 'type': 'linear' | 'cosine', 'norms': (C,) list, 'bias': (C,) list or
        None, 'spearman_norm_vs_count': float}} for every head whose weight layout is known.
    """
    try:
        heads = model_heads(model)
    except ValueError:   # no timm-style classifier to read (model_heads says why)
        return {}
    out = {}
    for spec in heads:
        mod = spec.module
        if isinstance(mod, nn.Linear):
            kind, norms = 'linear', mod.weight.detach().float().norm(dim=1)
        elif isinstance(mod, NormedLinear):
            kind, norms = 'cosine', mod.weight.detach().float().norm(dim=0)
        else:
            continue
        bias = getattr(mod, 'bias', None)
        norms = norms.cpu()
        out[head_role(model, spec.name)] = {
            'module': spec.module_name, 'type': kind, 'norms': norms.tolist(),
            'bias': None if not isinstance(bias, torch.Tensor) else bias.detach().float().cpu().tolist(),
            'spearman_norm_vs_count': spearman(norms.tolist(), train_counts),
        }
    return out
