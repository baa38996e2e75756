"""The CNN-teacher recipe: what `tools/train_teacher.py` trains, on the run loop every recipe shares.

It reproduces the Saddle-LongTail recipes (CE / LDAM + DRW, SGD inside SAM, step or cosine schedules; Rangwani et
al., NeurIPS 2022, val-iisc/Saddle-LongTail) on the project's shared pieces: the same long-tailed split and label
space as the student (so teacher and student labels agree), the same evaluation, model files and resumable states.

Outputs in `runtime.output_dir`: `best.safetensors` (best top-1 on the selection split) and `last.safetensors`
(final weights), deit-lt model files with kind 'teacher' that `teacher.checkpoint` of a student run takes;
`config.yaml`, `class_counts.json`, `per_class_accuracy.png`, `report.json`, `log.jsonl` and `checkpoints/`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deit_lt.data.pipeline import Batch
from deit_lt.engine import PlainUpdate, RunParts, fit, updates_per_epoch
from deit_lt.errors import ConfigError
from deit_lt.models.cnn import create_teacher_model, display_arch
from deit_lt.optim import create_optimizer, create_scheduler
from deit_lt.recipe import create_run_data, load_datasets, model_meta
from deit_lt.runtime import create_accelerator, want_compile
from deit_lt.seeding import seed_step

from .config import FP16_SAM, TeacherTrainConfig, validate_config
from .losses import TeacherLoss
from .optim import create_sam_optimizer, sam_rho, set_rho

__all__ = ['teacher_parts', 'train_teacher']


def teacher_parts(cfg: TeacherTrainConfig, accelerator) -> RunParts:
    """Build the teacher run (CNN, loss, SGD/SAM, schedules, data) for `deit_lt.engine.fit`."""
    validate_config(cfg)
    if cfg.sam.enabled and accelerator.mixed_precision == 'fp16':
        raise ConfigError(FP16_SAM + f' (runtime.mixed_precision={cfg.runtime.mixed_precision} resolved to fp16)')
    device = accelerator.device
    sets = load_datasets(cfg.data)
    train = sets['train']
    num_classes, in_chans = train.num_classes, train.in_chans
    img_size = cfg.model.img_size or (train.image_size[0] if train.image_size else 224)

    # model and loss, initialised from runtime.seed: identical on every rank and in every repeat
    seed_step(cfg.runtime.seed)
    use_norm = cfg.model.use_norm if cfg.model.use_norm is not None else cfg.loss.type == 'ldam'
    model_kwargs = dict(cfg.model.kwargs)
    if cfg.model.drop_rate:
        model_kwargs['drop_rate'] = cfg.model.drop_rate
    try:
        model, arch, model_kwargs = create_teacher_model(cfg.model.name, num_classes, use_norm=use_norm,
                                                         in_chans=in_chans, **model_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f'model: {e}') from None
    try:
        criterion = TeacherLoss(train.train_counts, cfg.loss.type, drw_epoch=cfg.loss.drw_epoch, beta=cfg.loss.beta,
                                max_m=cfg.loss.max_m, s=cfg.loss.s, cosine_head=use_norm).to(device)
    except ValueError as e:
        raise ConfigError(f'loss: {e}') from None
    if cfg.runtime.channels_last and device.type == 'cuda':
        model.to(memory_format=torch.channels_last)

    # no Mixup in the teacher recipes: keep the last partial batch, as the originals' loaders do (97 steps of
    # CIFAR-10-LT IF100 at batch 128, not 96)
    data = create_run_data(sets, cfg.data, cfg.aug, cfg.optim, accelerator=accelerator, seed=cfg.runtime.seed,
                           img_size=img_size, eval_batch_size=cfg.runtime.eval_batch_size, drop_last=False)
    if cfg.sam.enabled:
        optimizer, update = create_sam_optimizer(model, cfg.optim, cfg.sam, device)
    else:
        optimizer, update = create_optimizer(model, cfg.optim, device), PlainUpdate(cfg.optim.clip_grad)
    scheduler = create_scheduler(optimizer, cfg.optim, updates_per_epoch(len(data.train_batches),
                                                                          cfg.optim.accum_steps))

    def on_epoch(epoch: int) -> dict[str, Any]:
        criterion.set_epoch(epoch)
        rho = sam_rho(cfg.sam, epoch) if cfg.sam.enabled else 0.0
        if cfg.sam.enabled:
            set_rho(optimizer, rho)
        return {'drw': criterion.drw_active, 'rho': rho}

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch.x)
        loss = criterion(logits, batch.y)
        return loss, {'acc': (logits.detach().argmax(1) == batch.y).float().mean() * 100.0}

    meta = model_meta(data, cfg.data, arch=arch, model_kwargs=model_kwargs, img_size=img_size, config=cfg,
                      kind='teacher', use_norm=bool(use_norm), logit_scale=cfg.loss.s if use_norm else 1.0,
                      loss={'type': cfg.loss.type, 'drw_epoch': cfg.loss.drw_epoch, 'sam': cfg.sam.enabled})
    drw = f'+DRW@{cfg.loss.drw_epoch}' if cfg.loss.drw_epoch is not None else ''
    sam = f'+SAM({cfg.sam.backend})' if cfg.sam.enabled else ''
    description = (f'{display_arch(arch, model_kwargs)} ({"cosine" if use_norm else "linear"} head) @ {img_size} px, '
                   f'{cfg.loss.type.upper()}{drw}{sam}; {cfg.data.name}: {len(train)} train images, {num_classes} '
                   f'classes; augmentation on the {data.placement}; global batch {cfg.optim.batch_size} '
                   f'(micro-batch {data.micro_batch} x {cfg.optim.accum_steps} accumulation x '
                   f'{accelerator.num_processes} process(es)), lr {cfg.optim.lr:g}')
    return RunParts(kind='teacher', model=model, optimizer=optimizer, scheduler=scheduler,
                    train_batches=data.train_batches, eval_batches=data.eval_batches, loss_fn=loss_fn, meta=meta,
                    train_counts=train.train_counts.tolist(), groups=train.splits.groups,
                    class_names=train.class_names, on_epoch=on_epoch, update=update,
                    accum_steps=cfg.optim.accum_steps, description=description,
                    compile=want_compile(cfg.runtime.compile, device),
                    files={'class_map': {'student_label_of_original_id': train.class_map.tolist()}}
                    if train.class_map is not None else {})


def train_teacher(cfg: TeacherTrainConfig, accelerator=None) -> dict:
    """Train (or resume) the teacher of `cfg`; returns the final report (also written to report.json).

    Args:
        cfg: the resolved config.
        accelerator: an `accelerate.Accelerator` (default: `deit_lt.runtime.create_accelerator(cfg.runtime)`).
    """
    validate_config(cfg)
    accelerator = accelerator or create_accelerator(cfg.runtime)
    parts = teacher_parts(cfg, accelerator)
    return fit(parts, cfg.runtime, cfg.wandb, accelerator, name=cfg.name, epochs=cfg.optim.epochs, config=cfg)
