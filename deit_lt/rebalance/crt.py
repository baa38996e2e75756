"""cRT, classifier re-training (Kang et al., ICLR 2020, Sec. 4; official `config/*/cls_crt.yaml`).

The stage-1 classifier is discarded: a fresh `nn.Linear` (PyTorch's default init, as the official code, which
deliberately does not load the stage-1 classifier) is trained with cross-entropy on the frozen features under
class-balanced sampling (4 images per class visit). For a distilled student both heads are re-initialised and
trained on the ground-truth labels by default ("cRT-both"); `crt.heads=[cls]` re-trains only the CLS head and keeps
the DIST head, which DeiT-LT already re-balances with DRW ("cRT-CLS"; DeiT-LT's own ViT + cRT baseline re-trains
the classifier of a single-head ViT). The result is a linear head per predictor, so it saves as an ordinary model
file.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LinearHead, LinearResult, linear_head, select_heads
from .config import CRTConfig
from .features import FeatureSet, HeadSpec
from .training import train_heads

__all__ = ['fit']


def fit(train: FeatureSet, heads: list[HeadSpec], cfg: CRTConfig, *, val: FeatureSet | None = None,
        groups: dict[str, list[int]] | None = None, device: torch.device | str = 'cpu', seed: int = 0
        ) -> LinearResult:
    """Re-initialise and re-train the selected heads on cached features.

    Args:
        train: training features (eval transform) and labels.
        heads: the model's heads; the ones in `cfg.heads` (all by default) are re-trained, the others must be
            linear and are kept unchanged.
        cfg: the `crt` config section.
        val: features of the val split for best-epoch selection, or None (last epoch).
        groups: unused (same signature as the other methods).
        device: where to train.
        seed: initialisation and sampler seed.

    Returns:
        LinearResult with one linear head per predictor; `info` holds the training record.
    """
    chosen = select_heads(heads, cfg.heads, 'crt.heads')
    num_classes = heads[0].num_classes
    with torch.random.fork_rng(devices=[]):   # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        modules = nn.ModuleDict({h.name: nn.Linear(train.features[h.feature].shape[1], num_classes)
                                 for h in chosen})
    record = train_heads(modules, {h.name: h.feature for h in chosen}, train, cfg, option='crt', val=val,
                         device=device, seed=seed)
    out = {}
    for h in heads:
        if h.name in modules:
            m = modules[h.name]
            out[h.name] = LinearHead(m.weight.detach(), m.bias.detach(), h.feature, h.module_name)
        else:
            out[h.name] = linear_head(h, 'crt (a head kept unchanged)')
    info = {'retrained_heads': [h.name for h in chosen], 'sampler': cfg.sampler, 'epochs': cfg.epochs,
            'batch_size': cfg.batch_size, **record}
    return LinearResult('crt', out, info)

