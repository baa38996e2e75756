"""The DeiT-LT student recipe: what `tools/train.py` trains (the part of DeiT's `main.py` that builds things).

Per micro-batch (`prepare`, after the step's random streams are seeded): Mixup / CutMix with label smoothing
(off in the DRW phase of the CIFAR recipe), then the frozen teacher labels the *same mixed batch* resized to its
input (out-of-distribution distillation); `loss_fn` runs the student and the DeiT-LT loss (`deit_lt.losses`).
Everything it checks, it checks before the first step: class counts of teacher and data, the teacher file, image
size against the model, batch against the dataset, the DRW epoch against the schedule.

Not reproduced from the official engine (val-iisc/DeiT-LT@bc36970 `engine.py`): samples reach the device before
mixing in every phase (its DRW-with-Mixup branch mixed on the CPU and crashed); the teacher's class ids are
permuted as logits, so soft distillation is mapped too; no per-step `torch.cuda.synchronize()` or `.item()`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import Mixup
from torch import nn

from .config import TrainConfig
from .data.pipeline import Batch
from .data.transforms import resolve_norm
from .engine import PlainUpdate, RunParts, fit, updates_per_epoch
from .errors import ConfigError
from .losses import DistillationLoss
from .models.factory import is_distilled, unwrap_model
from .models.teacher import TeacherAdapter, load_teacher
from .optim import create_optimizer, create_scheduler, scaled_lr
from .recipe import RunData, create_run_data, load_datasets, model_meta
from .runtime import create_accelerator, want_compile
from .seeding import seed_step
from .tracking import check_wandb

__all__ = ['build_student', 'StudentStep', 'student_parts', 'train']


def build_student(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """timm.create_model for the student, with a readable error when the image size does not fit the model."""
    kwargs: dict[str, Any] = dict(cfg.model.kwargs)
    if cfg.model.img_size is not None:
        kwargs['img_size'] = cfg.model.img_size
    try:
        model = timm.create_model(cfg.model.name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                  drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            ours = timm.list_models('deit_*_patch*_32*') + timm.list_models('deit_micro*')
            raise ConfigError(f'unknown model {cfg.model.name!r} (any timm model name, or one of ours: '
                              f'{", ".join(ours)})') from None
        raise
    except TypeError as e:
        raise ConfigError(f'model {cfg.model.name!r}: {e} (check model.kwargs)') from None
    pe = getattr(model, 'patch_embed', None)
    if pe is not None:
        size, patch = tuple(pe.img_size), tuple(pe.patch_size)
        if any(s % p for s, p in zip(size, patch)):
            raise ConfigError(f'image size {size} is not a multiple of the patch size {patch} of '
                              f'{cfg.model.name}; choose model.img_size divisible by {patch[0]}')
    if hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(True)
    return model


def _model_img_size(model: nn.Module) -> int:
    pe = getattr(unwrap_model(model), 'patch_embed', None)
    if pe is not None:
        return int(pe.img_size[0])
    return int(unwrap_model(model).pretrained_cfg['input_size'][-1])


def _check_config(cfg: TrainConfig) -> None:
    o, d = cfg.optim, cfg.distill
    if o.epochs < 1:
        raise ConfigError('optim.epochs must be >= 1')
    if d.drw_epoch is not None and not 0 <= d.drw_epoch < o.epochs:
        raise ConfigError(f'distill.drw_epoch={d.drw_epoch} is past the last epoch (optim.epochs={o.epochs}); '
                          f'set it below {o.epochs} or to null')
    if d.type != 'none' and not cfg.teacher.checkpoint:
        raise ConfigError(f'distill.type={d.type} needs teacher.checkpoint (a trained teacher; see '
                          f'tools/train_teacher.py), or distill.type=none for the no-teacher baseline')
    if d.type != 'none' and not Path(cfg.teacher.checkpoint).is_file():
        raise ConfigError(f'teacher checkpoint not found: {cfg.teacher.checkpoint} (train one with '
                          f'tools/train_teacher.py, or point teacher.checkpoint at its .safetensors file)')


def _teacher(cfg: TrainConfig, data: RunData, device, channels_last: bool) -> TeacherAdapter:
    tc = cfg.teacher
    num_classes = data.num_classes
    if (tc.num_classes or num_classes) != num_classes:
        raise ConfigError(f'teacher.num_classes={tc.num_classes} but the data has {num_classes} classes')
    model, meta = load_teacher(tc.checkpoint, num_classes=num_classes, arch=tc.arch, format=tc.format,
                               use_norm=tc.use_norm, in_chans=data.in_chans, device=device)
    mean, std = tc.mean or meta.get('mean'), tc.std or meta.get('std')
    teacher_norm = resolve_norm(mean, std, data.in_chans) if mean and std else None
    return TeacherAdapter(model, tc.img_size or meta.get('img_size'), (data.mean, data.std), teacher_norm,
                          logit_scale=float(meta.get('logit_scale') or 1.0) if tc.logit_scale == 'auto'
                          else float(tc.logit_scale or 1.0),
                          class_map=data.train.class_map if tc.map_targets else None,
                          channels_last=channels_last, routed=tc.routed).to(device)


@dataclasses.dataclass
class StudentInputs:
    """A prepared micro-batch: the (mixed) images, their targets (labels or probabilities), the teacher's logits."""
    x: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None


class StudentStep:
    """What the DeiT-LT student does per epoch and micro-batch.

    `on_epoch`: the DRW switch, and in the CIFAR recipe's DRW phase plain images and hard labels (no Mixup, no
    smoothing). `prepare` (once per micro-batch, after the step's random streams are seeded): Mixup / CutMix with
    label smoothing, then the frozen teacher labels the *same mixed batch* resized to its input. `loss`: the student
    and the DeiT-LT loss (`deit_lt.losses.DistillationLoss`).
    """

    def __init__(self, cfg: TrainConfig, train_counts, num_classes: int, teacher: nn.Module | None, accelerator):
        d, a = cfg.distill, cfg.aug
        self.cfg, self.num_classes, self.teacher, self.acc = cfg, num_classes, teacher, accelerator
        self.criterion = DistillationLoss(train_counts, distill=d.type, alpha=d.alpha, tau=d.tau,
                                          drw_epoch=d.drw_epoch, beta=d.beta).to(accelerator.device)
        self.mixing = a.mixup > 0 or a.cutmix > 0
        self.mixup_fn = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                              switch_prob=a.mixup_switch_prob, mode=a.mixup_mode, label_smoothing=a.smoothing,
                              num_classes=num_classes) if self.mixing else None
        self.mix, self.smoothing = self.mixing, a.smoothing

    def on_epoch(self, epoch: int) -> dict[str, Any]:
        self.criterion.set_epoch(epoch)
        plain = self.criterion.drw_active and self.cfg.distill.no_mixup_drw
        self.mix = self.mixing and not plain
        self.smoothing = 0.0 if plain else self.cfg.aug.smoothing
        return {'drw': self.criterion.drw_active, 'mixup': self.mix}

    def prepare(self, batch: Batch) -> StudentInputs:
        x, y, c = batch.x, batch.y, self.num_classes
        if self.mix:
            x, targets = self.mixup_fn(x, y)
        elif self.smoothing > 0:
            targets = torch.full((len(y), c), self.smoothing / c, device=y.device)
            targets.scatter_(1, y[:, None], 1.0 - self.smoothing + self.smoothing / c)
        else:
            targets = y
        teacher_logits = None
        if self.teacher is not None:
            with self.acc.autocast():
                teacher_logits = self.teacher(x if self.cfg.teacher.input == 'mixed' else batch.x_clean)
        return StudentInputs(x, targets, teacher_logits)

    def loss(self, model: nn.Module, inputs: StudentInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = model(inputs.x)
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        return self.criterion(cls_logits, dist_logits, inputs.targets, inputs.teacher_logits)


def student_parts(cfg: TrainConfig, accelerator, sets: dict | None = None) -> RunParts:
    """Build the DeiT-LT student run (model, teacher, data, loss, optimizer, schedule) for `deit_lt.engine.fit`.

    `sets` ({'train', 'test'[, 'val']} datasets) replaces the data of `cfg.data` (benchmarks use synthetic data).
    """
    _check_config(cfg)
    device = accelerator.device
    compile_ = want_compile(cfg.runtime.compile, device)
    sets = sets if sets is not None else load_datasets(cfg.data)
    num_classes, in_chans = sets['train'].num_classes, sets['train'].in_chans
    seed_step(cfg.runtime.seed, 0x1A17, 0, 0)   # initial weights from the run's seed, identical on every rank
    model = build_student(cfg, num_classes, in_chans)
    img_size = _model_img_size(model)
    distilled = is_distilled(model)
    if cfg.distill.type != 'none' and not distilled:
        raise ConfigError(f'{cfg.model.name} has no DIST token: use a *_distilled_* model, or '
                          f'distill.type=none for the ViT baseline')
    data = create_run_data(sets, cfg.data, cfg.aug, cfg.optim, accelerator=accelerator, seed=cfg.runtime.seed,
                           img_size=img_size, eval_batch_size=cfg.runtime.eval_batch_size,
                           return_clean=cfg.distill.type != 'none' and cfg.teacher.input == 'clean',
                           compile=compile_)
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and data.micro_batch % 2:
        raise ConfigError(f'Mixup/CutMix pair images within a micro-batch: its size {data.micro_batch} '
                          f'(optim.batch_size / processes / optim.accum_steps) must be even')
    channels_last = cfg.runtime.channels_last and device.type == 'cuda'
    teacher = _teacher(cfg, data, device, channels_last) if cfg.distill.type != 'none' else None
    if teacher is not None and compile_:
        teacher = torch.compile(teacher)   # forward only (no_grad inside); a ResNet-32 is launch-bound eager

    optimizer = create_optimizer(model, cfg.optim, device)
    upe = updates_per_epoch(len(data.train_batches), cfg.optim.accum_steps)
    scheduler = create_scheduler(optimizer, cfg.optim, upe)
    step = StudentStep(cfg, data.train.train_counts, num_classes, teacher, accelerator)

    model_kwargs = dict(cfg.model.kwargs, in_chans=in_chans,
                        **({'img_size': cfg.model.img_size} if cfg.model.img_size else {}))
    meta = model_meta(data, cfg.data, arch=cfg.model.name, model_kwargs=model_kwargs, img_size=img_size, config=cfg,
                      kind='student')
    teacher_text = f'teacher {cfg.teacher.checkpoint} ({cfg.distill.type})' if teacher is not None else 'no teacher'
    drw = f', DRW from epoch {cfg.distill.drw_epoch}' if cfg.distill.drw_epoch is not None else ''
    description = (f'{cfg.model.name} @ {img_size} px, {teacher_text}{drw}; {cfg.data.name}: {len(data.train)} '
                   f'train images, {num_classes} classes; augmentation on the {data.placement}; global batch '
                   f'{cfg.optim.batch_size} (micro-batch {data.micro_batch} x {cfg.optim.accum_steps} accumulation '
                   f'x {accelerator.num_processes} process(es)), peak lr {scaled_lr(cfg.optim):.3g}')
    files = {}
    if data.train.class_map is not None:
        files['class_map'] = {'student_label_of_original_id': data.train.class_map.tolist()}
    return RunParts(kind='student', model=model, optimizer=optimizer, scheduler=scheduler,
                    train_batches=data.train_batches, eval_batches=data.eval_batches, loss_fn=step.loss, meta=meta,
                    train_counts=data.train.train_counts.tolist(), groups=data.train.splits.groups,
                    class_names=data.train.class_names, prepare=step.prepare, on_epoch=step.on_epoch,
                    update=PlainUpdate(cfg.optim.clip_grad), accum_steps=cfg.optim.accum_steps,
                    description=description, compile=compile_, files=files)


def train(cfg: TrainConfig, accelerator=None) -> dict:
    """Train (or resume) the student of `cfg`; returns the final report (also written to report.json).

    Args:
        cfg: the resolved config.
        accelerator: an `accelerate.Accelerator` (default: `deit_lt.runtime.create_accelerator(cfg.runtime)`).
    """
    check_wandb(cfg.wandb)     # before any data or model work
    accelerator = accelerator or create_accelerator(cfg.runtime)
    parts = student_parts(cfg, accelerator)
    return fit(parts, cfg.runtime, cfg.wandb, accelerator, name=cfg.name, epochs=cfg.optim.epochs, config=cfg)
