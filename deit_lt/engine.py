"""The DeiT-LT training step and epoch (after facebookresearch/deit `engine.py`, DeiT-LT's `engine.py`).

Per micro-batch: reseed the step's random streams, mix the batch (Mixup/CutMix, off in CIFAR's DRW phase), let
the frozen teacher label the *same mixed batch* resized to its input (out-of-distribution distillation), compute the
DeiT-LT loss and accumulate gradients; every `accum_steps` micro-batches take an optimizer step and set the next
learning rate. Running sums stay on the device; the host reads them only every `log_every` optimizer steps
(the single synchronisation point, which is also where a non-finite loss is detected).

Bugs of the official engine that are not reproduced (deit_lt.md section 10): samples always reach the device before
mixing; the teacher's class ids are permuted as logits (so soft distillation is mapped too); no per-step
`torch.cuda.synchronize()` or `.item()`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.pipeline import TrainBatches
from .losses import DistillationLoss
from .runtime import NonFiniteLossError, seed_step

__all__ = ['TeacherAdapter', 'EpochState', 'train_one_epoch', 'updates_per_epoch']


class TeacherAdapter(nn.Module):
    """A frozen teacher that reads the student's input batch.

    The batch is resized to the teacher's input size (bicubic, no antialiasing: what torchvision 0.15's tensor
    Resize did in the official code), re-normalised when the teacher was trained with another mean/std, and put in
    channels-last memory format on GPU. Teacher logits can be scaled (LDAM cosine heads output cosines; soft
    distillation wants them x30) and permuted into the student's sorted label space (`class_map`).
    """

    def __init__(self, model: nn.Module, img_size: int | None, student_norm: tuple[Sequence[float], Sequence[float]],
                 teacher_norm: tuple[Sequence[float], Sequence[float]] | None = None, logit_scale: float = 1.0,
                 class_map: Sequence[int] | None = None, channels_last: bool = False):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.img_size = img_size
        self.logit_scale = logit_scale
        s_mean, s_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in student_norm)
        self.renorm = teacher_norm is not None and (list(teacher_norm[0]) != list(student_norm[0]) or
                                                    list(teacher_norm[1]) != list(student_norm[1]))
        t_mean, t_std = ((torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in teacher_norm)
                         if self.renorm else (s_mean, s_std))
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t as one affine map
        self.register_buffer('scale', s_std / t_std, persistent=False)
        self.register_buffer('shift', (s_mean - t_mean) / t_std, persistent=False)
        if class_map is not None:
            # class_map[original id] = student label; column r of the student-space logits is original id of rank r
            self.register_buffer('perm', torch.argsort(torch.as_tensor(class_map)), persistent=False)
        else:
            self.perm = None
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):  # the teacher stays in eval mode (BatchNorm running statistics)
        return super().train(False)

    @torch.no_grad()  # not inference_mode: the result feeds the student's loss, which is differentiated
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode='bicubic', align_corners=False,
                              antialias=False)
        if self.renorm:
            x = x * self.scale + self.shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.perm is not None:
            logits = logits[:, self.perm]
        return logits


@dataclass
class EpochState:
    """Where training stands: the next micro-step of `epoch`, optimizer updates done so far."""
    epoch: int
    step: int = 0
    updates: int = 0
    sums: dict[str, float] = field(default_factory=dict)


def _windows(num_steps: int, accum: int, step: int) -> tuple[int, bool]:
    """Length of the accumulation window that contains `step`, and whether `step` ends it."""
    start = step - step % accum
    length = min(accum, num_steps - start)
    return length, step == start + length - 1


def train_one_epoch(model: nn.Module, criterion: DistillationLoss, batches: TrainBatches, optimizer, scheduler,
                    accelerator, state: EpochState, *, teacher: TeacherAdapter | None = None,
                    teacher_input: str = 'mixed', mixup_fn: Callable | None = None, no_mixup_drw: bool = True,
                    smoothing: float = 0.0, num_classes: int | None = None, accum_steps: int = 1,
                    clip_grad: float | None = None, seed: int = 0, log_every: int = 50,
                    max_updates: int | None = None, on_log: Callable[[dict, int], None] | None = None,
                    on_update: Callable[[EpochState], None] | None = None, progress=None) -> dict[str, float]:
    """Train from `state.step` to the end of `state.epoch` (or until `max_updates`); returns epoch averages.

    `state` is advanced in place (step, updates). `on_update(state)` runs after every optimizer step (used for
    step checkpoints); `on_log(metrics, updates)` every `log_every` steps and at the end.
    """
    model.train()
    criterion.set_epoch(state.epoch)
    use_mixup = mixup_fn is not None and not (criterion.drw_active and no_mixup_drw)
    smooth = smoothing if (not criterion.drw_active or not no_mixup_drw) else 0.0
    device = accelerator.device
    n_steps = len(batches)
    rank = accelerator.process_index
    sums = {k: torch.zeros((), device=device) for k in ('loss', 'cls', 'dist')}
    bad = torch.zeros((), dtype=torch.bool, device=device)
    count = 0
    window_count = 0
    t_log, n_log = time.perf_counter(), 0
    out: dict[str, float] = {}

    def flush() -> None:
        nonlocal window_count, t_log, n_log
        if bad.item():  # the one host sync of the log interval
            raise NonFiniteLossError(f'non-finite training loss in epoch {state.epoch} before optimizer update '
                                     f'{state.updates}; stopping (the last good checkpoint is kept)')
        if window_count == 0:
            return
        vals = {k: (v / window_count).item() for k, v in sums.items()}
        dt = time.perf_counter() - t_log
        metrics = {'train/loss': vals['loss'], 'train/loss_cls': vals['cls'], 'train/loss_dist': vals['dist'],
                   'train/lr': optimizer.param_groups[0]['lr'], 'train/epoch': state.epoch + state.step / n_steps,
                   'train/img_per_s': n_log * accelerator.num_processes / max(dt, 1e-9)}
        for k in sums:
            out[k] = out.get(k, 0.0) + vals[k] * window_count
            sums[k].zero_()
        out['_n'] = out.get('_n', 0) + window_count
        if on_log is not None:
            on_log(metrics, state.updates)
        if progress is not None:
            progress.set_postfix(loss=f'{vals["loss"]:.3f}', lr=f'{metrics["train/lr"]:.2e}')
        window_count, t_log, n_log = 0, time.perf_counter(), 0

    if state.step % accum_steps:
        raise ValueError(f'resume step {state.step} is not at an accumulation-window boundary ({accum_steps})')
    for batch in batches.iter_epoch(state.epoch, start_step=state.step):
        step = state.step
        seed_step(seed, state.epoch, step, rank)
        x, y = batch.x, batch.y
        if use_mixup:
            x, targets = mixup_fn(x, y)
        elif smooth > 0:
            targets = torch.full((len(y), num_classes), smooth / num_classes, device=device)
            targets.scatter_(1, y[:, None], 1.0 - smooth + smooth / num_classes)
        else:
            targets = y
        teacher_logits = None
        if teacher is not None:
            with accelerator.autocast():
                teacher_logits = teacher(x if teacher_input == 'mixed' else batch.x_clean)
        window_len, sync = _windows(n_steps, accum_steps, step)
        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
        with ctx:
            with accelerator.autocast():
                outputs = model(x)
                cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
                loss, parts = criterion(cls_logits, dist_logits, targets, teacher_logits)
            accelerator.backward(loss / window_len)
        sums['loss'] += loss.detach()
        sums['cls'] += parts['cls']
        sums['dist'] += parts.get('dist', torch.zeros((), device=device))
        bad |= ~torch.isfinite(loss.detach())
        count += 1
        window_count += 1
        n_log += len(y)
        state.step = step + 1
        if progress is not None:
            progress.update(1)
        if sync:
            if clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.updates += 1
            scheduler.step_update(state.updates)
            last = state.step == n_steps or (max_updates is not None and state.updates >= max_updates)
            if state.updates % log_every == 0 or last:
                flush()
            if on_update is not None:
                on_update(state)
            if max_updates is not None and state.updates >= max_updates:
                break
    flush()
    n = max(out.pop('_n', 0), 1)
    return {k: v / n for k, v in out.items()} | {'steps': count}


def updates_per_epoch(num_steps: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `num_steps` micro-batches (a trailing partial window still steps)."""
    return math.ceil(num_steps / accum_steps)
