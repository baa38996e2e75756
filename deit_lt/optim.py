"""Optimizers, their weight-decay groups and learning-rate schedules, shared by every training recipe.

Two conventions meet here. timm's (`timm.optim.param_groups_weight_decay`, used by DeiT): no decay on 1-D
parameters (norms, biases) and on the names a model lists in `no_weight_decay()` (position embedding, CLS and
DIST tokens). The CNN-teacher recipes of LDAM-DRW / Saddle-LongTail: weight decay on *every* parameter. Both
exempt the parameters a layer declares in its class attribute `no_weight_decay_names` (for example the kappa and
lambda of an adaptive activation, which APA trains without decay).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .config import OptimConfig
from .errors import ConfigError

__all__ = ['no_weight_decay_names', 'param_groups', 'scaled_lr', 'optimizer_spec', 'create_optimizer',
           'create_scheduler']


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Dotted names of the parameters that layers exempt from weight decay (`no_weight_decay_names`)."""
    names = set()
    for prefix, module in model.named_modules():
        for local in getattr(module, 'no_weight_decay_names', ()):
            if getattr(module, local, None) is not None:
                names.add(f'{prefix}.{local}' if prefix else local)
    return names


def param_groups(model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group.

    Args:
        model: the module whose trainable parameters are optimised.
        weight_decay: decay of the decayed group.
        decay_norm_and_bias: False (timm / DeiT): 1-D parameters, biases and `model.no_weight_decay()` names are
            not decayed. True (the CNN-teacher recipes): every parameter is decayed.
            Either way, layer-declared `no_weight_decay_names` are never decayed.

    Returns:
        `[{'params': decayed, 'weight_decay': weight_decay}, {'params': others, 'weight_decay': 0.0}]`, empty
        groups left out.
    """
    exempt = no_weight_decay_names(model)
    if not decay_norm_and_bias:
        listed = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
        exempt |= set(listed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = name in exempt or (not decay_norm_and_bias and (p.ndim <= 1 or name.endswith('.bias')))
        (no_decay if skip else decay).append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return [g for g in groups if g['params']]


# --------------------------------------------------------------------------------------------------------------
# Optimizers and learning-rate schedules
# --------------------------------------------------------------------------------------------------------------

# Optimizers built from torch directly (their options are what the recipes give: SGD's `nesterov` flag, fused
# kernels); any other name goes through timm's factory (whose 'sgd' would silently mean Nesterov SGD).
_TORCH_OPTIMIZERS = {'sgd': torch.optim.SGD, 'adamw': torch.optim.AdamW, 'adam': torch.optim.Adam}


def scaled_lr(cfg: OptimConfig) -> float:
    """The peak learning rate for the configured global batch: `lr * batch_size / lr_base_batch` (linear scaling,
    DeiT's rule), or `lr` itself when `lr_base_batch` is null."""
    return cfg.lr if cfg.lr_base_batch is None else cfg.lr * cfg.batch_size / cfg.lr_base_batch


def optimizer_spec(cfg: OptimConfig, device: torch.device) -> tuple[type, dict[str, Any]]:
    """(torch optimizer class, keyword arguments without params / weight decay) for `cfg.opt`; SAM wraps these."""
    name = cfg.opt.lower()
    if name not in _TORCH_OPTIMIZERS:
        raise ConfigError(f'optim.opt={cfg.opt!r}: SAM and the explicit options need one of '
                          f'{", ".join(_TORCH_OPTIMIZERS)}; other timm optimizers are built by create_optimizer')
    fused = cfg.fused if cfg.fused is not None else device.type == 'cuda'
    kwargs: dict[str, Any] = {'lr': scaled_lr(cfg)}
    if name == 'sgd':
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    if fused:
        kwargs['fused'] = True
    return _TORCH_OPTIMIZERS[name], kwargs


def create_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str = 'cpu'
                     ) -> torch.optim.Optimizer:
    """The optimizer of `cfg` over `model`'s trainable parameters, with the weight-decay groups of `param_groups`."""
    device = torch.device(device)
    groups = param_groups(model, cfg.weight_decay, decay_norm_and_bias=cfg.decay_norm_and_bias)
    if not groups:
        raise ConfigError('the model has no trainable parameters')
    if cfg.opt.lower() in _TORCH_OPTIMIZERS:
        cls, kwargs = optimizer_spec(cfg, device)
        return cls(groups, **kwargs)
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=scaled_lr(cfg), momentum=cfg.momentum)
    except (AssertionError, ValueError, KeyError) as e:   # timm's messages for unknown names
        raise ConfigError(f'optim.opt={cfg.opt!r}: {e}') from None


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, updates_per_epoch: int) -> Scheduler:
    """The learning-rate schedule of `cfg` as a timm scheduler, a pure function of the epoch and the update count.

    The run loop calls `step(epoch)` at every epoch start and `step_update(updates)` after every optimizer update;
    the one matching `cfg.sched_unit` sets the learning rate, the other does nothing. Nothing needs to be saved for
    an exact resume: both calls with the resumed counters restore the learning rate.

    Warmup: over `warmup_epochs`, linearly from `warmup_lr` to the peak lr. With `warmup_lr` null the warmup starts
    at lr / W and reaches lr at its last epoch (LDAM-DRW / Saddle-LongTail: lr * (e + 1) / W for e < W, 0-based).
    Cosine (to `min_lr`) runs over the whole schedule as in timm / DeiT (`warmup_prefix` false: the warmup replaces
    its start) or after the warmup (true). Multistep multiplies by `decay_rate` at each 0-based epoch of
    `milestones` (absolute epochs, as torch's MultiStepLR).
    """
    per = updates_per_epoch if cfg.sched_unit == 'update' else 1
    total = cfg.epochs * per
    lr = optimizer.param_groups[0]['lr']
    warm = round(cfg.warmup_epochs * per)
    if cfg.warmup_lr is None and warm > 0:
        # start at lr / W and reach lr at the last warmup step: timm's warmup then ends one step earlier
        warmup = dict(warmup_t=warm - 1, warmup_lr_init=lr / warm)
    else:
        warmup = dict(warmup_t=warm, warmup_lr_init=cfg.warmup_lr or 0.0)
    in_epochs = cfg.sched_unit == 'epoch'
    if cfg.sched == 'multistep':
        # timm applies milestone m at t == m - 1 (its historical convention); +1 gives torch's MultiStepLR
        return MultiStepLRScheduler(optimizer, decay_t=[m * per + 1 for m in cfg.milestones],
                                    decay_rate=cfg.decay_rate, warmup_prefix=False, t_in_epochs=in_epochs, **warmup)
    if cfg.sched == 'cosine':
        length = total - warmup['warmup_t'] if cfg.warmup_prefix else total
        return CosineLRScheduler(optimizer, t_initial=max(length, 1), lr_min=cfg.min_lr,
                                 warmup_prefix=cfg.warmup_prefix, t_in_epochs=in_epochs, **warmup)
    # constant: a cosine whose floor is the peak
    return CosineLRScheduler(optimizer, t_initial=max(total, 1), lr_min=lr, t_in_epochs=in_epochs, **warmup)
