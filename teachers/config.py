"""Configuration of teacher training (`tools/train_teacher.py`).

`TeacherTrainConfig` composes the shared sections of `deit_lt.config` (data, augmentation, runtime, W&B) with the
teacher's own: model, loss (CE / LDAM + DRW), SAM and the SGD optimizer with its schedule. Defaults are the
Saddle-LongTail CIFAR LDAM+DRW+SAM recipe (teachers_sam.md sections 4-7); the YAML files under
`configs/teachers/` state each published teacher. `validate_config` turns impossible settings into a ConfigError
before any data is read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from deit_lt.config import AugConfig, ConfigError, DataConfig, RuntimeConfig, WandbConfig

__all__ = ['TeacherModelConfig', 'TeacherLossConfig', 'SamConfig', 'TeacherOptimConfig', 'TeacherAugConfig',
           'TeacherTrainConfig', 'validate_config']


@dataclasses.dataclass
class TeacherModelConfig:
    """The teacher CNN: a timm name plus keyword arguments (never pretrained)."""
    arch: str = 'resnet32'              # resnet32 (CIFAR), resnet50 (ImageNet-LT / iNat), or any timm CNN
    use_norm: bool | None = None        # cosine (NormedLinear) head; null = auto (on for LDAM, as the originals)
    img_size: int | None = None         # null: the data's own size for in-memory sets (32 CIFAR, 8 digits), else 224
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)   # more timm.create_model arguments


@dataclasses.dataclass
class TeacherLossConfig:
    """CE or LDAM, with deferred re-weighting (DRW) by class-balanced weights."""
    type: Literal['ce', 'ldam'] = 'ldam'
    drw_epoch: int | None = 160         # 0-based epoch from which the loss is re-weighted; null = never
    beta: float = 0.9999                # effective-number beta of the DRW weights
    max_m: float = 0.5                  # largest LDAM margin (0.5 CIFAR, 0.3 ImageNet-LT / iNat)
    s: float = 30.0                     # LDAM logit scale (also scales CE on a cosine head)


@dataclasses.dataclass
class SamConfig:
    """Sharpness-aware minimisation around SGD (Foret et al., ICLR 2021), as in Saddle-LongTail."""
    enabled: bool = True
    rho: float = 0.05                   # radius for schedule=constant
    # 'step': rho_steps[k] for 1-based epochs in (step_epochs[k-1], step_epochs[k]] (Saddle's --rho_steps with
    # boundaries 5 / 60 / 75: r0 for t <= 5, r1 for 6..60, r2 for 61..75, r3 from 76).
    schedule: Literal['constant', 'step'] = 'constant'
    rho_steps: list[float] = dataclasses.field(default_factory=lambda: [0.05, 0.1, 0.5, 0.5])
    step_epochs: list[int] = dataclasses.field(default_factory=lambda: [5, 60, 75])
    adaptive: bool = False              # ASAM (not used by the published teachers)
    # BatchNorm running statistics in the second (perturbed) pass: 'update' as Saddle-LongTail does, or 'freeze'
    # (momentum 0 during that pass; the common SAM practice).
    bn_second_pass: Literal['update', 'freeze'] = 'update'


@dataclasses.dataclass
class TeacherOptimConfig:
    """SGD with momentum (inside SAM when enabled) and a per-epoch learning-rate schedule."""
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4          # on every parameter (BN, biases and the head included), as the originals
    epochs: int = 200
    batch_size: int = 128               # GLOBAL batch, split evenly over processes (the recipes' batch)
    # Linear warmup over the first `warmup_epochs` epochs: lr = base * (e + 1) / warmup_epochs, e 0-based.
    warmup_epochs: int = 5
    # 'multistep': x decay_rate at each 0-based epoch in `milestones` (CIFAR: x0.01 at 160, x0.0001 at 180);
    # 'cosine': cosine to min_lr over the epochs after warmup, stepped once per epoch (ImageNet-LT / iNat).
    sched: Literal['multistep', 'cosine'] = 'multistep'
    milestones: list[int] = dataclasses.field(default_factory=lambda: [160, 180])
    decay_rate: float = 0.01
    min_lr: float = 0.0


@dataclasses.dataclass
class TeacherAugConfig(AugConfig):
    """`AugConfig` with the CIFAR teacher recipe as defaults: pad-and-crop + flip, nothing else."""
    crop: Literal['rrc', 'pad_crop', 'none'] = 'pad_crop'
    rand_augment: str | None = None
    re_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    repeated_aug: int = 1


@dataclasses.dataclass
class TeacherTrainConfig:
    """Everything tools/train_teacher.py reads."""
    name: str = 'teacher'
    # Split that picks the "best" checkpoint: 'test' is what Saddle-LongTail did (the released teachers are
    # test-selected); 'val' needs data.val_per_class > 0 or a val list. The last epoch is always saved too.
    select_on: Literal['test', 'val'] = 'test'
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: TeacherModelConfig = dataclasses.field(default_factory=TeacherModelConfig)
    loss: TeacherLossConfig = dataclasses.field(default_factory=TeacherLossConfig)
    sam: SamConfig = dataclasses.field(default_factory=SamConfig)
    optim: TeacherOptimConfig = dataclasses.field(default_factory=TeacherOptimConfig)
    aug: TeacherAugConfig = dataclasses.field(default_factory=TeacherAugConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=lambda: RuntimeConfig(output_dir='runs/teacher'))
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


def validate_config(cfg: TeacherTrainConfig) -> None:
    """Reject settings that cannot train, naming the key and what to do. Data-dependent checks (class counts,
    batch vs. dataset size) happen once the data is loaded."""
    o, loss, sam = cfg.optim, cfg.loss, cfg.sam
    errors = []
    if o.epochs < 1:
        errors.append(f'optim.epochs must be >= 1, got {o.epochs}')
    if o.batch_size < 1:
        errors.append(f'optim.batch_size must be >= 1, got {o.batch_size}')
    if o.lr <= 0:
        errors.append(f'optim.lr must be > 0, got {o.lr}')
    if not 0 <= o.momentum < 1:
        errors.append(f'optim.momentum must be in [0, 1), got {o.momentum}')
    if o.nesterov and o.momentum == 0:
        errors.append('optim.nesterov needs optim.momentum > 0')
    if o.weight_decay < 0:
        errors.append(f'optim.weight_decay must be >= 0, got {o.weight_decay}')
    if not 0 <= o.warmup_epochs < max(o.epochs, 1):
        errors.append(f'optim.warmup_epochs must be in [0, optim.epochs={o.epochs}), got {o.warmup_epochs}')
    if o.sched == 'multistep':
        if any(m < 1 for m in o.milestones) or list(o.milestones) != sorted(o.milestones):
            errors.append(f'optim.milestones must be non-decreasing positive epochs, got {o.milestones}')
        if not 0 < o.decay_rate <= 1:
            errors.append(f'optim.decay_rate must be in (0, 1], got {o.decay_rate}')
    if o.min_lr < 0 or o.min_lr > o.lr:
        errors.append(f'optim.min_lr must be in [0, optim.lr], got {o.min_lr}')
    if loss.drw_epoch is not None and not 0 <= loss.drw_epoch < o.epochs:
        errors.append(f'loss.drw_epoch={loss.drw_epoch} is outside the schedule of optim.epochs={o.epochs} epochs '
                      f'(0-based epochs 0..{o.epochs - 1}): DRW would never switch on. Lower it, or set '
                      f'loss.drw_epoch=null for no re-weighting')
    if not 0 <= loss.beta < 1:
        errors.append(f'loss.beta must be in [0, 1), got {loss.beta}')
    if loss.type == 'ldam' and loss.max_m <= 0:
        errors.append(f'loss.max_m must be > 0 for LDAM, got {loss.max_m}')
    if loss.s <= 0:
        errors.append(f'loss.s must be > 0, got {loss.s}')
    if sam.rho < 0:
        errors.append(f'sam.rho is a radius and must be >= 0, got {sam.rho} (sam.enabled=false turns SAM off)')
    if any(r < 0 for r in sam.rho_steps):
        errors.append(f'sam.rho_steps are radii and must be >= 0, got {sam.rho_steps}')
    if sam.schedule == 'step':
        if len(sam.rho_steps) != len(sam.step_epochs) + 1:
            errors.append(f'sam.rho_steps needs one more entry than sam.step_epochs: got {len(sam.rho_steps)} '
                          f'radii for {len(sam.step_epochs)} boundaries')
        if any(b < 1 for b in sam.step_epochs) or list(sam.step_epochs) != sorted(set(sam.step_epochs)):
            errors.append(f'sam.step_epochs must be increasing 1-based epochs, got {sam.step_epochs}')
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        errors.append('teachers train without Mixup/CutMix (the published recipes): set aug.mixup=0 aug.cutmix=0')
    if cfg.aug.repeated_aug < 1:
        errors.append(f'aug.repeated_aug must be >= 1, got {cfg.aug.repeated_aug}')
    if sam.enabled and cfg.runtime.mixed_precision == 'fp16':
        errors.append(_FP16_SAM)
    if cfg.model.img_size is not None and cfg.model.img_size < 1:
        errors.append(f'model.img_size must be >= 1, got {cfg.model.img_size}')
    if errors:
        raise ConfigError('invalid teacher config:\n  - ' + '\n  - '.join(errors))
    from deit_lt.models.cnn import check_arch   # late: importing the factory registers the teacher models in timm
    try:
        check_arch(cfg.model.arch)
    except ValueError as e:
        raise ConfigError(f'model.arch: {e}') from None


_FP16_SAM = ('SAM cannot run under fp16 mixed precision: a GradScaler would have to unscale the first-pass gradient '
             'before the perturbation (no library does this). Use runtime.mixed_precision=bf16 (or no), or '
             'sam.enabled=false')
