"""LWS, learnable weight scaling (Kang et al., ICLR 2020, Sec. 4; official `models/TauNormClassifier.py`, which
despite its name implements LWS, and `config/*/cls_lws.yaml`).

The stage-1 classifier is loaded and frozen; only one scale per class, initialised to 1, is learnt with
cross-entropy under class-balanced sampling: z_j = s_j * (<w_j, f> + b_j). As in the official code the scale
multiplies the bias too, and weight decay acts on the scales (it pulls them towards 0; kept for fidelity). The
learnt classifier is the linear head (diag(s) W, s * b), so it saves as an ordinary model file. A distilled student
gets one scale vector per head (2C scales), each head trained on the ground-truth labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearHead, LinearResult, linear_head, select_heads
from .config import LWSConfig
from .features import FeatureSet, HeadSpec
from .training import train_heads

__all__ = ['ScaledLinear', 'fit']


class ScaledLinear(nn.Module):
    """A frozen linear classifier with learnable per-class scales: (B, d) -> (B, C) = s * (x W^T + b)."""

    def __init__(self, head: LinearHead):
        super().__init__()
        self.register_buffer('weight', head.weight.clone())
        self.register_buffer('bias', head.bias.clone() if head.bias is not None else None)
        self.scale = nn.Parameter(torch.ones(head.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(x, self.weight, self.bias)

    def as_linear_head(self, feature: str, module_name: str) -> LinearHead:
        s = self.scale.detach()
        return LinearHead(self.weight * s[:, None], None if self.bias is None else self.bias * s, feature,
                          module_name)


def fit(train: FeatureSet, heads: list[HeadSpec], cfg: LWSConfig, *, val: FeatureSet | None = None,
        groups: dict[str, list[int]] | None = None, device: torch.device | str = 'cpu', seed: int = 0
        ) -> LinearResult:
    """Learn per-class scales of the selected (linear) heads on cached features.

    Args:
        train: training features (eval transform) and labels.
        heads: the model's heads; all must be nn.Linear.
        cfg: the `lws` config section.
        val: validation features for best-epoch selection, or None (last epoch).
        groups: unused (same signature as the other methods).
        device: where to train.
        seed: sampler seed.

    Returns:
        LinearResult of the scaled heads; `info` holds the learnt scales and the training record.
    """
    chosen = select_heads(heads, cfg.heads, 'lws.heads')
    modules = nn.ModuleDict({h.name: ScaledLinear(linear_head(h, 'lws')) for h in chosen})
    record = train_heads(modules, {h.name: h.feature for h in chosen}, train, cfg, option='lws', val=val,
                         device=device, seed=seed)
    out = {}
    for h in heads:
        out[h.name] = (modules[h.name].as_linear_head(h.feature, h.module_name) if h.name in modules
                       else linear_head(h, 'lws (a head kept unchanged)'))
    scales = {name: [round(v, 6) for v in m.scale.detach().cpu().tolist()] for name, m in modules.items()}
    info = {'scales': scales, 'trained_heads': [h.name for h in chosen], 'sampler': cfg.sampler,
            'epochs': cfg.epochs, 'batch_size': cfg.batch_size, **record}
    return LinearResult('lws', out, info)
