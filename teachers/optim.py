"""SGD (optionally inside SAM), the per-epoch learning-rate schedule and the SAM radius schedule.

SAM is `pytorch_optimizer.SAM` (ECOSYSTEM.md section 3): it builds the SGD base optimizer on the *same* param
groups, so the radius lives in each group (`group['rho']`, set per epoch here), LR schedulers see the usual
groups, and the state dict carries the momentum buffers. Its first step perturbs every parameter by
rho * g / (||g|| + 1e-12) with the global norm over all groups; the second restores the weights by copy and takes
the SGD step with the gradient from the perturbed point (teachers_sam.md section 5.1). The package is imported
only when SAM is on, so plain-SGD runs work where it is not installed.

Learning rate (teachers_sam.md section 6), torch schedulers stepped once per epoch:
- warmup: `LinearLR` from 1/W to 1 over W epochs, i.e. lr = base * (e + 1) / W for 0-based e < W;
- 'multistep': `MultiStepLR(milestones, decay_rate)`; CIFAR: x0.01 from e = 160, x0.0001 from e = 180;
- 'cosine': `CosineAnnealingLR` to min_lr, starting at the last warmup epoch (no warmup for ImageNet-LT / iNat:
  lr = base * (1 + cos(pi * e / epochs)) / 2).
"""
from __future__ import annotations

import bisect

import torch
from torch import nn
from torch.optim.lr_scheduler import ChainedScheduler, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, \
    SequentialLR

from .config import SamConfig, TeacherOptimConfig

__all__ = ['import_sam', 'create_optimizer', 'create_lr_scheduler', 'sam_rho', 'set_rho', 'base_optimizer']


def import_sam():
    """`pytorch_optimizer.SAM`, or an ImportError that says how to proceed."""
    try:
        from pytorch_optimizer import SAM
    except ImportError as e:
        raise ImportError('sam.enabled=true needs the pytorch-optimizer package (pip install pytorch-optimizer), '
                          'which is not importable here; install it or set sam.enabled=false') from e
    return SAM


def create_optimizer(model: nn.Module, optim: TeacherOptimConfig, sam: SamConfig) -> torch.optim.Optimizer:
    """SGD with momentum over all parameters (one group, weight decay everywhere as the originals), wrapped in SAM
    when `sam.enabled`. The radius starts at epoch 0's value."""
    sgd_kwargs = dict(lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    params = [p for p in model.parameters() if p.requires_grad]
    if not sam.enabled:
        return torch.optim.SGD(params, **sgd_kwargs)
    SAM = import_sam()
    return SAM(params, base_optimizer=torch.optim.SGD, rho=sam_rho(sam, 0), adaptive=sam.adaptive, **sgd_kwargs)


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose `step()` applies the update: SAM's inner SGD, or the optimizer itself. LR schedulers
    attach to it so that their step-order check sees the SGD step that SAM's `second_step` takes."""
    return getattr(optimizer, 'base_optimizer', optimizer)


def create_lr_scheduler(optimizer: torch.optim.Optimizer, optim: TeacherOptimConfig) -> LRScheduler:
    """The per-epoch schedule; call `.step()` once at the end of every epoch."""
    opt = base_optimizer(optimizer)
    warm = optim.warmup_epochs
    if optim.sched == 'multistep':
        main = MultiStepLR(opt, milestones=list(optim.milestones), gamma=optim.decay_rate)
        if warm < 2:  # W = 1 is lr = base from epoch 0: no warmup at all
            return main
        # Both factors are multiplicative, so chaining gives warmup(e) * decay(e) exactly.
        return ChainedScheduler([LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1),
                                 main], optimizer=opt)
    if optim.sched == 'cosine':
        if warm < 2:
            return CosineAnnealingLR(opt, T_max=optim.epochs, eta_min=optim.min_lr)
        # The cosine starts at the last warmup epoch (where the warmup reaches the base lr), so no epoch repeats it.
        warmup = LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1)
        cosine = CosineAnnealingLR(opt, T_max=optim.epochs - warm + 1, eta_min=optim.min_lr)
        return SequentialLR(opt, [warmup, cosine], milestones=[warm - 1])
    raise ValueError(f'unknown optim.sched {optim.sched!r} (multistep | cosine)')


def sam_rho(sam: SamConfig, epoch: int) -> float:
    """The SAM radius for 0-based `epoch`: constant, or the step schedule on the 1-based epoch t = epoch + 1
    (rho_steps[k] where k = number of step_epochs boundaries below t)."""
    if sam.schedule == 'constant':
        return float(sam.rho)
    return float(sam.rho_steps[bisect.bisect_left(list(sam.step_epochs), epoch + 1)])


def set_rho(optimizer: torch.optim.Optimizer, rho: float) -> None:
    """Set the SAM radius of every param group (SAM reads it from the groups at each first step)."""
    for group in optimizer.param_groups:
        group['rho'] = rho
