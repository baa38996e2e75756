"""Rebuild models from deit-lt checkpoints, and read every predictor a model offers.

A deit-lt model file (see `deit_lt.checkpoint`) records `arch` (a timm registry name), `num_classes` and
`model_kwargs`; `timm.create_model(arch, pretrained=False, num_classes=..., **model_kwargs)` rebuilds the exact
module, students and CNNs alike (`deit_lt.models` registers all of them in timm).
"""
from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import nn

from ..checkpoint import load_model_file
from ..errors import CheckpointError

__all__ = ['unwrap_model', 'is_distilled', 'model_outputs', 'model_predictors', 'headline_predictor',
           'create_model_from_meta', 'create_model_from_checkpoint', 'load_state_dict_checked']


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def is_distilled(model: nn.Module) -> bool:
    """True for students with a DIST token and head (timm `VisionTransformerDistilled`)."""
    return hasattr(unwrap_model(model), 'head_dist')


def model_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS logits, DIST logits) of a student in eval mode; a single-head model gives its logits twice.

    timm's distilled forward averages the two heads outside distilled training, so the heads are applied to the
    CLS and DIST tokens here (DeiT-LT reports CLS, DIST and their average separately).
    """
    m = unwrap_model(model)
    if not hasattr(m, 'head_dist'):
        out = model(x)
        return out, out
    tokens = m.forward_features(x)
    return m.head(m.head_drop(tokens[:, 0])), m.head_dist(m.head_drop(tokens[:, 1]))


def model_predictors(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every prediction a model offers, as logits (B, C) by name.

    - distilled students: 'cls', 'dist' and 'avg' = (cls + dist) / 2 (DeiT-LT's three predictors);
    - multi-expert CNNs (a `forward_experts` method returning {'logits': (E, B, C), ...}): 'logits' = the mean over
      experts (the ensemble) and 'expert0', 'expert1', ...;
    - any other model: 'logits'.
    """
    m = unwrap_model(model)
    if hasattr(m, 'head_dist'):
        z_cls, z_dist = model_outputs(model, x)
        return {'cls': z_cls, 'dist': z_dist, 'avg': (z_cls + z_dist) / 2}
    if hasattr(m, 'forward_experts'):
        experts = m.forward_experts(x)['logits']
        return {'logits': experts.mean(0), **{f'expert{i}': z for i, z in enumerate(experts)}}
    return {'logits': model(x)}


def headline_predictor(model: nn.Module) -> str:
    """The predictor a run is judged and selected by: AVG for distilled students (as DeiT-LT), else 'logits'."""
    return 'avg' if is_distilled(model) else 'logits'


def create_model_from_meta(meta: dict[str, Any], **overrides) -> nn.Module:
    """`timm.create_model` from a checkpoint's metadata (never downloads weights). Every architecture of the project
    is registered in timm by `deit_lt.models/__init__.py`, which runs before this module."""
    if not meta or 'arch' not in meta:
        raise CheckpointError('checkpoint metadata has no architecture (arch); is this a deit-lt checkpoint?')
    kwargs = dict(meta.get('model_kwargs') or {})
    kwargs.update(overrides)
    try:
        return timm.create_model(meta['arch'], pretrained=False, num_classes=int(meta['num_classes']), **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise CheckpointError(f'unknown architecture {meta["arch"]!r} in checkpoint metadata') from None
        raise


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names what differs (missing / unexpected keys, shape mismatches)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append('shape mismatch ' + '; '.join(shapes[:5]))
        if missing:
            parts.append(f'missing keys {missing[:5]}{"..." if len(missing) > 5 else ""}')
        if unexpected:
            parts.append(f'unexpected keys {unexpected[:5]}{"..." if len(unexpected) > 5 else ""}')
        raise CheckpointError(f'{source} does not fit the model: ' + ', '.join(parts))
    model.load_state_dict(state_dict, strict=True)


def create_model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = 'cpu',
                                 **overrides) -> tuple[nn.Module, dict[str, Any]]:
    """Load a deit-lt model file (.safetensors): returns (model in eval mode on `device`, metadata)."""
    state_dict, meta = load_model_file(path)
    if meta is None:
        raise CheckpointError(f'{path} has no deit-lt metadata; load plain state dicts through the teacher loader '
                              f'(teachers.load_teacher) or give the architecture explicitly')
    if meta.get('kind') == 'ncm':
        raise CheckpointError(f'{path} holds nearest-class-mean centroids, not a network; load it with '
                              f'deit_lt.rebalance.load_ncm')
    if meta.get('arch') == 'p2ot_cluster':   # a clustering run's model (tools/cluster.py): its own loader
        from ..cluster.model import load_cluster_model
        return load_cluster_model(path, device=device)
    model = create_model_from_meta(meta, **overrides)
    load_state_dict_checked(model, state_dict, str(path))
    return model.to(device).eval(), meta
