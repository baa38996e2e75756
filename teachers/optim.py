"""SAM around the recipe's optimizer, its radius schedule, and the two-pass update rule the run loop calls.

SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021), as the
Saddle-LongTail teachers use it (val-iisc/Saddle-LongTail `cifar_train_sam.py`), on one batch:
  1. loss at w, backward (under DDP the gradient is all-reduced, so the perturbation uses the global batch);
  2. w <- w + rho * g / ||g|| (global norm over all parameters);
  3. loss at the perturbed weights on the same batch, backward (all-reduced again);
  4. restore w, then the base optimizer's step (weight decay at w) with the perturbed-point gradient.
The run loop does step 1 like any other step; the update rules here do 2-4.

Backends:
- 'pytorch_optimizer' (default): `pytorch_optimizer.SAM` builds the base optimizer on the *same* param groups, so
  the radius lives in each group (`group['rho']`, set per epoch here), LR schedulers see the usual groups, and the
  state dict carries the momentum buffers (exact resume).
- 'sam_pytorch': the `sam` package of sam-pytorch (moskomule/sam.pytorch). Its faults are guarded here: it refuses
  more than one parameter group (so does this module, with the reason); an LR scheduler attached to its wrapper
  fails (the schedule is attached to the base optimizer instead); a zero gradient norm turns every weight into NaN
  (checked on the host before each step: the perturbation is skipped, as pytorch-optimizer's SAM does for a zero
  gradient); its closure must zero the gradients itself (done here). It has no ASAM mode (refused by the config).
Both packages are imported only when SAM is on, so plain runs work where they are not installed.
"""
from __future__ import annotations

import bisect
import contextlib
import torch
from torch import nn

from deit_lt.config import OptimConfig
from deit_lt.engine import UpdateContext
from deit_lt.errors import ConfigError
from deit_lt.optim import optimizer_spec, param_groups

from .config import SamConfig

__all__ = ['create_sam_optimizer', 'base_optimizer', 'sam_rho', 'set_rho', 'SamUpdate', 'SamPytorchUpdate']


def create_sam_optimizer(model: nn.Module, optim: OptimConfig, sam: SamConfig, device: torch.device
                         ) -> tuple[torch.optim.Optimizer, 'SamUpdate']:
    """(optimizer the run loop steps and saves, the SAM update rule). The radius starts at epoch 0's value."""
    cls, kwargs = optimizer_spec(optim, device)
    kwargs.pop('fused', None)   # SAM's second step must see the restored weights; no fused kernels inside it
    groups = param_groups(model, optim.weight_decay, decay_norm_and_bias=optim.decay_norm_and_bias)
    rho = sam_rho(sam, 0)
    if sam.backend == 'pytorch_optimizer':
        SAM = _import('pytorch_optimizer', 'pytorch-optimizer').SAM
        optimizer = SAM(groups, base_optimizer=cls, rho=rho, adaptive=sam.adaptive, **kwargs)
        return optimizer, SamUpdate(sam.bn_second_pass)
    if len(groups) != 1:
        raise ConfigError('sam.backend=sam_pytorch takes a single parameter group, but this model needs '
                          f'{len(groups)} (weight decay off for some parameters: optim.decay_norm_and_bias=false or '
                          'layers that exempt their own); use sam.backend=pytorch_optimizer')
    wrapper_cls = _import('sam', 'sam-pytorch').SAM
    inner = cls(groups, **kwargs)
    wrapper = wrapper_cls(inner.param_groups[0]['params'], inner, rho=rho)
    # the loop saves and schedules the inner optimizer (its param groups carry 'lr'; the wrapper's do not)
    return inner, SamPytorchUpdate(wrapper, sam.bn_second_pass)


def _import(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ConfigError(f'sam.enabled=true with this backend needs the {package} package (pip install {package}); '
                          f'install it, choose the other sam.backend, or set sam.enabled=false') from e


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose `step()` applies the update: SAM's inner one, or the optimizer itself."""
    optimizer = getattr(optimizer, 'optimizer', optimizer)   # accelerate's wrapper
    return getattr(optimizer, 'base_optimizer', optimizer)


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


@contextlib.contextmanager
def _bn_frozen(model: nn.Module, mode: str):
    """BatchNorm running statistics kept from the first pass during the second one (`bn_second_pass='freeze'`)."""
    if mode != 'freeze':
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom


class SamUpdate:
    """SAM's perturb / recompute / restore-and-step with pytorch-optimizer's SAM (steps 2-4 of the module doc).

    Args:
        bn_second_pass: 'update' (BatchNorm statistics also move in the perturbed pass, as Saddle-LongTail) or
            'freeze' (they do not).
    """

    def __init__(self, bn_second_pass: str = 'update'):
        self.bn_second_pass = bn_second_pass

    def __call__(self, ctx: UpdateContext) -> None:
        sam = getattr(ctx.optimizer, 'optimizer', ctx.optimizer)   # under accelerate's wrapper
        sam.first_step(zero_grad=True)
        with _bn_frozen(ctx.model, self.bn_second_pass):
            ctx.recompute()
        sam.second_step(zero_grad=False)


class SamPytorchUpdate:
    """The same update with sam-pytorch's closure-only `SAM.step` (see the module doc for the guarded faults).

    Its step calls the closure once at w (we hand back the gradients the run loop already computed there) and once
    at the perturbed point (we zero the gradients and recompute), then steps the base optimizer.
    """

    def __init__(self, wrapper: torch.optim.Optimizer, bn_second_pass: str = 'update'):
        self.wrapper = wrapper
        self.bn_second_pass = bn_second_pass

    def __call__(self, ctx: UpdateContext) -> None:
        params = [p for p in self.wrapper.param_groups[0]['params'] if p.grad is not None]
        # one host sync per step: sam-pytorch divides by the gradient norm unguarded
        if not params or float(torch.stack([p.grad.detach().norm() for p in params]).norm()) == 0.0:
            with _bn_frozen(ctx.model, self.bn_second_pass):
                self._zero()
                ctx.recompute()
            self.wrapper.optim.step()
            return
        calls = {'n': 0}

        def closure() -> torch.Tensor:
            calls['n'] += 1
            if calls['n'] > 1:      # the perturbed point: fresh gradients
                self._zero()
                with _bn_frozen(ctx.model, self.bn_second_pass):
                    ctx.recompute()
            return torch.zeros(())
        self.wrapper.step(closure)

    def _zero(self) -> None:
        for p in self.wrapper.param_groups[0]['params']:
            p.grad = None
