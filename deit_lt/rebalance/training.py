"""The stage-2 training loop shared by cRT and LWS: SGD on cached features under a re-balancing sampler.

As in the official classifier-balancing code, an epoch is floor(N / batch) iterations for every sampler, here
realised by asking the sampler for exactly that many indices (`num_samples`), which is the prefix the original
trainer consumed before breaking out of its loader. Batches are index slices of the cached feature tensors, so an
epoch costs a few matrix products.

Departures from the official code, on purpose: the cosine schedule is per step from lr to 0 (the original steps a
per-epoch scheduler at the start of each epoch, so its first epoch already runs below lr and its last at lr 0:
facebookresearch/classifier-balancing `run_networks.py`, scheduler stepped before the epoch's batches); the best
epoch on the val split is kept per head (the original keeps one best epoch for its single classifier).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.samplers import create_sampler
from ..metrics import per_class_accuracy
from ..errors import ConfigError
from .config import HeadTrainingConfig
from .features import FeatureSet

__all__ = ['balanced_accuracy', 'steps_per_epoch', 'train_heads']

_logger = logging.getLogger(__name__)


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean per-class top-1 accuracy in percent (equals top-1 on a balanced split); the selection metric."""
    acc = per_class_accuracy(logits.argmax(1).cpu(), targets.cpu(), logits.shape[1])
    return float(torch.nanmean(acc).item())


def steps_per_epoch(num_samples: int, batch_size: int, option: str) -> int:
    """floor(N / B); a batch larger than the training set is an error, not a silent zero-step epoch."""
    if batch_size < 1:
        raise ConfigError(f'{option}.batch_size must be >= 1, got {batch_size}')
    steps = num_samples // batch_size
    if steps == 0:
        raise ConfigError(f'{option}.batch_size={batch_size} is larger than the training split ({num_samples} '
                             f'samples); lower {option}.batch_size')
    return steps


def train_heads(heads: nn.ModuleDict, feature_of: Mapping[str, str], train: FeatureSet, cfg: HeadTrainingConfig, *,
                option: str, val: FeatureSet | None = None, device: torch.device | str = 'cpu', seed: int = 0
                ) -> dict[str, Any]:
    """Train `heads` (each maps its feature (B, d) to (B, C) logits) with summed cross-entropy.

    The heads share batches but not parameters, so summing their losses trains each as if alone. After the run
    each head holds the weights of its best epoch on `val` (mean per-class accuracy) when `cfg.select_epoch` and
    `val` are given, else those of the last epoch.

    Args:
        heads: head name -> module; only its parameters with requires_grad are trained.
        feature_of: head name -> feature name in `train` / `val`.
        train: cached training features (any device; moved to `device`).
        cfg: the method's training section.
        option: the config section's name, for error messages ('crt', 'lws').
        val: cached validation features, or None.
        device: where to train.
        seed: sampler seed (the sampler draws each epoch from (seed, epoch)).

    Returns:
        JSON-able record: steps per epoch, scaled lr, per-epoch history, chosen epoch per head.
    """
    if cfg.epochs < 1:
        raise ConfigError(f'{option}.epochs must be >= 1, got {cfg.epochs}')
    device = torch.device(device)
    train_d = train.to(device)
    val_d = val.to(device) if val is not None else None
    heads = heads.to(device)
    bsz = cfg.batch_size
    steps = steps_per_epoch(len(train), bsz, option)
    lr = cfg.lr * bsz / cfg.lr_base_batch
    params = [p for p in heads.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f'{option}: nothing to train')
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps * cfg.epochs, eta_min=0.0)
    sampler = create_sampler(cfg.sampler, train.targets.cpu().numpy(), seed=seed, num_samples=steps * bsz,
                             samples_per_class=cfg.samples_per_class, total_epochs=cfg.epochs)
    select = cfg.select_epoch and val_d is not None
    best = {name: (-math.inf, -1, None) for name in heads}   # (val accuracy, epoch, state)
    history = []
    for epoch in range(cfg.epochs):
        heads.train()
        sampler.set_epoch(epoch)
        order = torch.from_numpy(np.fromiter(iter(sampler), dtype=np.int64, count=steps * bsz)).to(device)
        loss_sum = torch.zeros((), device=device)
        for step in range(steps):
            idx = order[step * bsz:(step + 1) * bsz]
            y = train_d.targets[idx]
            loss = sum(F.cross_entropy(heads[name](train_d.features[feature_of[name]][idx]), y) for name in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
        record = {'epoch': epoch, 'loss': loss_sum.item() / steps}   # one host sync per epoch
        if val_d is not None:
            heads.eval()
            with torch.no_grad():
                accs = {name: balanced_accuracy(heads[name](val_d.features[feature_of[name]]), val_d.targets)
                        for name in heads}
            record['val_acc'] = accs
            if select:
                for name, acc in accs.items():
                    if acc > best[name][0]:   # strict: the earliest epoch wins ties
                        state = {k: v.detach().clone() for k, v in heads[name].state_dict().items()}
                        best[name] = (acc, epoch, state)
        history.append(record)
        _logger.info('%s epoch %d/%d: loss %.4f%s', option, epoch + 1, cfg.epochs, record['loss'],
                     ''.join(f', val {k} {v:.2f}' for k, v in record.get('val_acc', {}).items()))
    chosen = {}
    for name in heads:
        if select:
            heads[name].load_state_dict(best[name][2])
            chosen[name] = best[name][1]
        else:
            chosen[name] = cfg.epochs - 1
    heads.eval()
    return {'steps_per_epoch': steps, 'lr': lr, 'history': history, 'epoch': chosen,
            'selected_on': 'val' if select else 'last epoch'}
