"""The CNN-teacher recipe: what `tools/train_teacher.py` trains, on the run loop every recipe shares.

It reproduces the Saddle-LongTail recipes (CE / LDAM + DRW, SGD inside SAM, step or cosine schedules; Rangwani et
al., NeurIPS 2022, val-iisc/Saddle-LongTail) and the multi-expert methods (`teachers.methods`) on the project's
shared pieces: the same long-tailed split and label space as the student (so teacher and student labels agree),
the same evaluation, model files and resumable states. A method supplies the loss of a micro-batch; this module
builds the rest: data (with a second augmented view when the method reads two), the CNN, Mixup / CutMix when
configured, SGD or SAM, the schedule, and the post-hoc logit adjustments evaluated beside the plain logits.

Outputs in `runtime.output_dir`: `best.safetensors` (best top-1 on the selection split) and `last.safetensors`
(final weights), deit-lt model files with kind 'teacher' that `teacher.checkpoint` of a student run takes;
`config.yaml`, `class_counts.json`, `per_class_accuracy.png`, `report.json`, `log.jsonl` and `checkpoints/`.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from torch import nn

from deit_lt.checkpoint import load_model_file
from deit_lt.data.pipeline import Batch
from deit_lt.engine import PlainUpdate, RunParts, fit, updates_per_epoch
from deit_lt.errors import ConfigError
from deit_lt.models.cnn import create_teacher_model, display_arch, has_cosine_head
from deit_lt.optim import create_optimizer, create_scheduler
from deit_lt.recipe import create_run_data, load_datasets, model_meta
from deit_lt.runtime import create_accelerator, want_compile
from deit_lt.seeding import seed_step
from deit_lt.tracking import check_wandb

from .config import FP16_SAM, TeacherTrainConfig, validate_config
from .methods import get_method
from .optim import create_sam_optimizer, sam_rho, set_rho

__all__ = ['teacher_parts', 'train_teacher', 'posthoc_offsets']


def posthoc_offsets(names: list[str], train_counts) -> dict[str, torch.Tensor]:
    """Per-class offsets added to the logits at evaluation: 'prior' = -ln(n_c / N) = ln(N / n_c) (logit adjustment
    with tau = 1, Menon et al., "Long-tail learning via logit adjustment", ICLR 2021; also the 'raw' inverse image
    frequency that APA's published evaluation adds, kostas1515/AGLU `custom.py`), 'iif' = ln((N - n_c) / n_c) (the
    'rel' variant of the same code)."""
    n = torch.as_tensor(train_counts, dtype=torch.float64).clamp_min(1)
    total = n.sum()
    table = {'iif': torch.log((total - n) / n), 'prior': -torch.log(n / total)}
    return {name: table[name].float() for name in names}


def _model(cfg: TeacherTrainConfig, num_classes: int, in_chans: int):
    use_norm = cfg.model.use_norm if cfg.model.use_norm is not None else get_method(cfg.loss.type).default_use_norm
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.drop_rate:
        kwargs['drop_rate'] = cfg.model.drop_rate
    try:
        return create_teacher_model(cfg.model.name, num_classes, use_norm=use_norm, in_chans=in_chans, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f'model: {e}') from None


def teacher_parts(cfg: TeacherTrainConfig, accelerator) -> RunParts:
    """Build the teacher run (CNN, method, SGD/SAM, schedules, data) for `deit_lt.engine.fit`."""
    validate_config(cfg)
    if cfg.sam.enabled and accelerator.mixed_precision == 'fp16':
        raise ConfigError(FP16_SAM + f' (runtime.mixed_precision={cfg.runtime.mixed_precision} resolved to fp16)')
    device = accelerator.device
    sets = load_datasets(cfg.data)
    train = sets['train']
    num_classes, in_chans = train.num_classes, train.in_chans
    img_size = cfg.model.img_size or (train.image_size[0] if train.image_size else 224)
    method_cls = get_method(cfg.loss.type)

    # model and method, initialised from runtime.seed: identical on every rank and in every repeat
    seed_step(cfg.runtime.seed)
    model, arch, model_kwargs = _model(cfg, num_classes, in_chans)
    method = method_cls(cfg, train.train_counts, model)
    if cfg.model.init_from:
        state_dict, _ = load_model_file(cfg.model.init_from)
        method.init_weights(model, state_dict, cfg.model.init_from)
    method.setup(model)
    method.to(device)
    if cfg.runtime.channels_last and device.type == 'cuda':
        model.to(memory_format=torch.channels_last)

    mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
    # the published teacher recipes keep the last partial batch, as their loaders do (97 steps of CIFAR-10-LT IF100
    # at batch 128, not 96); Mixup pairs images within a batch and needs full ones
    data = create_run_data(sets, cfg.data, cfg.aug, cfg.optim, accelerator=accelerator, seed=cfg.runtime.seed,
                           img_size=img_size, eval_batch_size=cfg.runtime.eval_batch_size, drop_last=mixing,
                           extra_views=[cfg.aug2] if cfg.aug2 is not None else [])
    if mixing and data.micro_batch % 2:
        raise ConfigError(f'Mixup/CutMix pair images within a micro-batch: its size {data.micro_batch} must be even')
    if cfg.sam.enabled:
        optimizer, update = create_sam_optimizer(model, cfg.optim, cfg.sam, device)
    else:
        optimizer, update = create_optimizer(model, cfg.optim, device), PlainUpdate(cfg.optim.clip_grad)
    scheduler = create_scheduler(optimizer, cfg.optim, updates_per_epoch(len(data.train_batches),
                                                                          cfg.optim.accum_steps))
    mixup_fn = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                     switch_prob=cfg.aug.mixup_switch_prob, mode=cfg.aug.mixup_mode,
                     label_smoothing=cfg.aug.smoothing, num_classes=num_classes) if mixing else None

    def on_epoch(epoch: int) -> dict[str, Any]:
        scalars = method.on_epoch(epoch)
        rho = sam_rho(cfg.sam, epoch) if cfg.sam.enabled else 0.0
        if cfg.sam.enabled:
            set_rho(optimizer, rho)
        return scalars | {'rho': rho}

    def prepare(batch: Batch) -> tuple[Batch, torch.Tensor]:
        if mixup_fn is None:
            return batch, batch.y
        x, targets = mixup_fn(batch.x, batch.y)
        return Batch(x, batch.y, batch.x_clean, batch.views), targets

    def loss_fn(model: nn.Module, inputs: tuple[Batch, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return method.loss(model, *inputs)

    meta = model_meta(data, cfg.data, arch=arch, model_kwargs=model_kwargs, img_size=img_size, config=cfg,
                      kind='teacher', use_norm=bool(method.cosine_logits or has_cosine_head(model)),
                      logit_scale=cfg.loss.s if method.cosine_logits else 1.0,
                      loss={'type': cfg.loss.type, 'drw_epoch': cfg.loss.drw_epoch, 'sam': cfg.sam.enabled})
    drw = f'+DRW@{cfg.loss.drw_epoch}' if cfg.loss.drw_epoch is not None else ''
    sam = f'+SAM({cfg.sam.backend})' if cfg.sam.enabled else ''
    head = 'cosine' if (method.cosine_logits or has_cosine_head(model)) else 'linear'
    description = (f'{display_arch(arch, model_kwargs)} ({head} head) @ {img_size} px, {cfg.loss.type.upper()}{drw}'
                   f'{sam}{" + Mixup/CutMix" if mixing else ""}; {cfg.data.name}: {len(train)} train images, '
                   f'{num_classes} classes; augmentation on the {data.placement}; global batch '
                   f'{cfg.optim.batch_size} (micro-batch {data.micro_batch} x {cfg.optim.accum_steps} accumulation x '
                   f'{accelerator.num_processes} process(es)), lr {cfg.optim.lr:g}')
    return RunParts(kind='teacher', model=model, optimizer=optimizer, scheduler=scheduler,
                    train_batches=data.train_batches, eval_batches=data.eval_batches, loss_fn=loss_fn, meta=meta,
                    train_counts=train.train_counts.tolist(), groups=train.splits.groups,
                    class_names=train.class_names, prepare=prepare, on_epoch=on_epoch, update=update,
                    accum_steps=cfg.optim.accum_steps, description=description,
                    compile=want_compile(cfg.runtime.compile, device),
                    logit_adjust=posthoc_offsets(cfg.posthoc_adjust, train.train_counts),
                    files={'class_map': {'student_label_of_original_id': train.class_map.tolist()}}
                    if train.class_map is not None else {})


def train_teacher(cfg: TeacherTrainConfig, accelerator=None) -> dict:
    """Train (or resume) the teacher of `cfg`; returns the final report (also written to report.json).

    Args:
        cfg: the resolved config.
        accelerator: an `accelerate.Accelerator` (default: `deit_lt.runtime.create_accelerator(cfg.runtime)`).
    """
    validate_config(cfg)
    check_wandb(cfg.wandb)     # before any data or model work
    accelerator = accelerator or create_accelerator(cfg.runtime)
    parts = teacher_parts(cfg, accelerator)
    return fit(parts, cfg.runtime, cfg.wandb, accelerator, name=cfg.name, epochs=cfg.optim.epochs, config=cfg)
