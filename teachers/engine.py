"""One training epoch of a teacher: plain SGD steps or two-pass SAM steps.

SAM step (Foret et al., ICLR 2021; Saddle-LongTail `cifar_train_sam.py`), on one augmented batch:
  1. loss at w, backward (under DDP the gradient is all-reduced, so the perturbation uses the global batch);
  2. `first_step`: w <- w + rho * g / ||g||;
  3. loss at the perturbed weights on the same batch, backward (all-reduced again);
  4. `second_step`: restore w, SGD-momentum step (weight decay at w) with the perturbed-point gradient.
BatchNorm runs in train mode in both passes; with `bn_second_pass='freeze'` its momentum is 0 during pass 2 so the
running statistics come from the unperturbed weights only (pytorch_optimizer's helpers).

The logged training loss / accuracy are those of pass 1 (the loss at the weights being trained). Host syncs
(`.item()`) happen only every `log_every` steps and at the end of the epoch.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from deit_lt.data.pipeline import TrainBatches
from deit_lt.runtime import NonFiniteLossError, seed_step

__all__ = ['sam_update', 'sgd_update', 'train_one_epoch']


def sam_update(model: nn.Module, criterion: Callable, sam, x: torch.Tensor, y: torch.Tensor, *,
               backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
               bn_second_pass: str = 'update') -> tuple[torch.Tensor, torch.Tensor]:
    """One SAM step. `sam` is the unwrapped `pytorch_optimizer.SAM` (under accelerate: `optimizer.optimizer`).

    Returns:
        (loss at w, logits at w (B, C)), detached.
    """
    logits = model(x)
    loss = criterion(logits, y)
    backward(loss)
    sam.first_step(zero_grad=True)
    if bn_second_pass == 'freeze':
        from pytorch_optimizer import disable_running_stats, enable_running_stats
        disable_running_stats(model)
        try:
            backward(criterion(model(x), y))
        finally:
            enable_running_stats(model)
    else:
        backward(criterion(model(x), y))
    sam.second_step(zero_grad=True)
    return loss.detach(), logits.detach()


def sgd_update(model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, *, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain optimizer step. Returns (loss, logits (B, C)), detached."""
    logits = model(x)
    loss = criterion(logits, y)
    backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


def train_one_epoch(model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer, batches: TrainBatches,
                    *, epoch: int, start_step: int = 0, seed: int = 0, rank: int = 0, use_sam: bool = True,
                    bn_second_pass: str = 'update', backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                    log_every: int = 50, log: Callable[[dict, int], None] | None = None,
                    after_step: Callable[[int], bool] | None = None) -> dict:
    """Train over the micro-batches of `epoch` from `start_step`.

    Args:
        optimizer: the optimizer as prepared by accelerate (or plain); SAM is reached through `.optimizer`.
        seed, rank: every step reseeds the global RNGs from (seed, epoch, step, rank), for exact resume.
        backward: `accelerator.backward` under accelerate.
        log: called with ({'train/loss', 'train/acc'} over the last window, step-in-epoch) every `log_every` steps,
            after `after_step`.
        after_step: called with the step-in-epoch just finished; returning True stops the epoch there.

    Returns:
        {'loss', 'acc' (pass-1, this process, steps run here), 'steps', 'stopped', 'time_s'}.
    """
    model.train()
    sam = getattr(optimizer, 'optimizer', optimizer) if use_sam else None
    device = next(model.parameters()).device
    totals = torch.zeros(3, device=device, dtype=torch.float64)   # loss sum, correct, samples (on device: no sync)
    window = torch.zeros(3, device=device, dtype=torch.float64)
    steps, stopped, t0 = 0, False, time.perf_counter()
    for step, batch in enumerate(batches.iter_epoch(epoch, start_step=start_step), start=start_step):
        seed_step(seed, epoch, step, rank)
        if sam is not None:
            loss, logits = sam_update(model, criterion, sam, batch.x, batch.y, backward=backward,
                                      bn_second_pass=bn_second_pass)
        else:
            loss, logits = sgd_update(model, criterion, optimizer, batch.x, batch.y, backward=backward)
        n = batch.y.shape[0]
        # the sample count as a device-side fill, not a host->device copy of a Python number
        count = torch.full((), float(n), device=device, dtype=torch.float64)
        stats = torch.stack([loss.double() * n, (logits.argmax(1) == batch.y).sum().double(), count])
        totals += stats
        window += stats
        steps += 1
        stop = after_step is not None and after_step(step)
        if log is not None and log_every > 0 and (step + 1) % log_every == 0:
            w = window.tolist()   # host sync, once per log window
            _check_finite(w[0] / w[2], epoch, step)
            log({'train/loss': w[0] / w[2], 'train/acc': 100.0 * w[1] / w[2]}, step)
            window.zero_()
        if stop:
            stopped = True
            break
    t = totals.tolist()
    n = max(t[2], 1.0)
    if steps:
        _check_finite(t[0] / n, epoch, start_step + steps - 1)
    return {'loss': t[0] / n, 'acc': 100.0 * t[1] / n, 'steps': steps, 'stopped': stopped,
            'time_s': time.perf_counter() - t0}


def _check_finite(value: float, epoch: int, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f'training loss became {value} in epoch {epoch + 1} by step {step + 1}; the last '
                                 f'saved checkpoint is intact. Lower optim.lr or sam.rho and resume.')
