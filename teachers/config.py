"""Configuration of teacher training (`tools/train_teacher.py`).

`TeacherTrainConfig` uses the shared sections of `deit_lt.config` (data, augmentation, optimizer, runtime, W&B; the
same keys mean the same things as for the student) with the teacher's own defaults, plus its model, loss (CE / LDAM
+ DRW) and SAM sections. Defaults are the Saddle-LongTail CIFAR LDAM+DRW+SAM recipe (Rangwani et al., "Escaping
Saddle Points for Effective Generalization on Class-Imbalanced Data", NeurIPS 2022; val-iisc/Saddle-LongTail
`cifar_train_sam.py`, `run.sh`); the YAML files under `configs/teachers/` state each published teacher.
`validate_config` turns impossible settings into one ConfigError before any data is read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from deit_lt.config import DataConfig, MixAugConfig, OptimConfig, RuntimeConfig, WandbConfig
from deit_lt.errors import ConfigError

__all__ = ['TeacherModelConfig', 'TeacherLossConfig', 'SamConfig', 'TeacherOptimConfig', 'TeacherAugConfig',
           'TeacherTrainConfig', 'validate_config', 'FP16_SAM']


@dataclasses.dataclass
class TeacherModelConfig:
    """The teacher CNN: a timm name plus keyword arguments (never pretrained)."""
    name: str = 'resnet32'              # resnet32 (CIFAR), resnet50 (ImageNet-LT / iNat), or any timm CNN
    use_norm: bool | None = None        # cosine head; null = the method's default (on for LDAM, as the originals)
    img_size: int | None = None         # null: the data's own size for in-memory sets (32 CIFAR, 8 digits), else 224
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)   # more timm.create_model arguments
    # A model file whose weights start the run (a second stage: RIDE's router, SHIKE's classifier re-training)
    init_from: str | None = None


@dataclasses.dataclass
class TeacherLossConfig:
    """The training method and its loss: CE or LDAM with deferred re-weighting (DRW), or a registered multi-expert
    method (`teachers.methods`: ride, ride_router, mdcs, shike, shike_stage2)."""
    type: str = 'ldam'
    drw_epoch: int | None = 160         # 0-based epoch from which the loss is re-weighted; null = never
    beta: float = 0.9999                # effective-number beta of the DRW weights
    max_m: float = 0.5                  # largest LDAM margin (0.5 CIFAR, 0.3 ImageNet-LT / iNat)
    s: float = 30.0                     # logit scale of a cosine head (LDAM; also CE on a cosine head)
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)   # options of the method's own loss


@dataclasses.dataclass
class SamConfig:
    """Sharpness-aware minimisation around the optimizer (Foret et al., ICLR 2021), as in Saddle-LongTail."""
    enabled: bool = True
    # 'pytorch_optimizer' (pytorch-optimizer's SAM: per-group radius, ASAM, resumable) or 'sam_pytorch' (the
    # sam-pytorch package: one parameter group, no ASAM; see teachers/optim.py for what is guarded)
    backend: Literal['pytorch_optimizer', 'sam_pytorch'] = 'pytorch_optimizer'
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
class TeacherOptimConfig(OptimConfig):
    """`OptimConfig` with the CIFAR teacher recipe as defaults: SGD with momentum, weight decay on every parameter,
    global batch 128, 200 epochs, an epoch-wise 5-epoch warmup (lr * (e + 1) / 5) and x0.01 at epochs 160 and 180."""
    opt: str = 'sgd'
    lr: float = 0.1
    lr_base_batch: int | None = None    # the recipes give the lr for their batch: no scaling
    weight_decay: float = 2e-4
    decay_norm_and_bias: bool = True    # as the originals
    epochs: int = 200
    batch_size: int = 128
    accum_steps: int = 1
    sched: Literal['cosine', 'multistep', 'constant'] = 'multistep'
    sched_unit: Literal['update', 'epoch'] = 'epoch'
    warmup_epochs: float = 5
    warmup_lr: float | None = None
    min_lr: float = 0.0
    milestones: list[int] = dataclasses.field(default_factory=lambda: [160, 180])
    decay_rate: float = 0.01


@dataclasses.dataclass
class TeacherAugConfig(MixAugConfig):
    """The augmentation keys of the student with the CIFAR teacher recipe as defaults: pad-and-crop + flip, nothing
    else (no RandAugment, erasing, Mixup / CutMix or smoothing)."""
    crop: Literal['rrc', 'pad_crop', 'none'] = 'pad_crop'
    rand_augment: str | None = None
    re_prob: float = 0.0
    repeated_aug: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0


@dataclasses.dataclass
class TeacherTrainConfig:
    """Everything tools/train_teacher.py reads."""
    name: str = 'teacher'
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: TeacherModelConfig = dataclasses.field(default_factory=TeacherModelConfig)
    loss: TeacherLossConfig = dataclasses.field(default_factory=TeacherLossConfig)
    sam: SamConfig = dataclasses.field(default_factory=SamConfig)
    optim: TeacherOptimConfig = dataclasses.field(default_factory=TeacherOptimConfig)
    aug: TeacherAugConfig = dataclasses.field(default_factory=TeacherAugConfig)
    # the second augmented view of each image, for methods that read two (MDCS's strong view); null otherwise
    aug2: TeacherAugConfig | None = None
    # post-hoc logit adjustment, evaluated beside the plain logits as the predictor 'logits_<name>': 'prior' adds
    # ln(N / n_c) (Menon et al., 2021; the evaluation of APA's published numbers), 'iif' adds ln((N - n_c) / n_c)
    posthoc_adjust: list[Literal['iif', 'prior']] = dataclasses.field(default_factory=list)
    runtime: RuntimeConfig = dataclasses.field(default_factory=lambda: RuntimeConfig(output_dir='runs/teacher'))
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


FP16_SAM = ('SAM cannot run under fp16 mixed precision: a GradScaler would have to unscale the first-pass gradient '
            'before the perturbation (no library does this). Use runtime.mixed_precision=bf16 (or no), or '
            'sam.enabled=false')


def validate_config(cfg: TeacherTrainConfig) -> None:
    """Reject settings that cannot train, naming the key and what to do (all problems in one error). Data-dependent
    checks (class counts, batch vs. dataset size) happen once the data is loaded."""
    o, loss = cfg.optim, cfg.loss
    errors = []
    if o.epochs < 1:
        errors.append(f'optim.epochs must be >= 1, got {o.epochs}')
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
    if o.sched_unit == 'epoch' and o.warmup_epochs != int(o.warmup_epochs):
        errors.append(f'optim.warmup_epochs={o.warmup_epochs} must be whole epochs with optim.sched_unit=epoch')
    if o.sched == 'multistep':
        if any(m < 1 for m in o.milestones) or list(o.milestones) != sorted(o.milestones):
            errors.append(f'optim.milestones must be non-decreasing positive epochs, got {o.milestones}')
        if not 0 < o.decay_rate <= 1:
            errors.append(f'optim.decay_rate must be in (0, 1], got {o.decay_rate}')
    if o.min_lr < 0 or o.min_lr > o.lr:
        errors.append(f'optim.min_lr must be in [0, optim.lr], got {o.min_lr}')
    if loss.drw_epoch is not None and not 0 <= loss.drw_epoch < o.epochs:
        errors.append(f'loss.drw_epoch={loss.drw_epoch} is outside the schedule of optim.epochs={o.epochs} epochs '
                      f'(0-based epochs 0..{o.epochs - 1}): DRW would never switch on; lower it, or set '
                      f'loss.drw_epoch=null for no re-weighting')
    if not 0 <= loss.beta < 1:
        errors.append(f'loss.beta must be in [0, 1), got {loss.beta}')
    if loss.type == 'ldam' and loss.max_m <= 0:
        errors.append(f'loss.max_m must be > 0 for LDAM, got {loss.max_m}')
    if loss.s <= 0:
        errors.append(f'loss.s must be > 0, got {loss.s}')
    errors += _sam_errors(cfg)
    errors += _method_errors(cfg)
    if cfg.aug.repeated_aug < 1:
        errors.append(f'aug.repeated_aug must be >= 1, got {cfg.aug.repeated_aug}')
    if cfg.model.img_size is not None and cfg.model.img_size < 1:
        errors.append(f'model.img_size must be >= 1, got {cfg.model.img_size}')
    if errors:
        raise ConfigError('invalid teacher config: ' + '; '.join(errors))
    from deit_lt.models.cnn import check_arch
    try:
        check_arch(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f'model.name: {e}') from None


def _method_errors(cfg: TeacherTrainConfig) -> list[str]:
    from .methods import get_method
    try:
        method = get_method(cfg.loss.type)
    except ConfigError as e:
        return [str(e)]
    errors = []
    mixing = cfg.aug.mixup > 0 or cfg.aug.cutmix > 0
    if mixing and not method.mixing:
        errors.append(f'loss.type={cfg.loss.type} takes class labels: Mixup/CutMix (aug.mixup, aug.cutmix) must be 0')
    if method.views > 1 and cfg.aug2 is None:
        errors.append(f'loss.type={cfg.loss.type} reads two augmented views of each image: set the aug2 section '
                      f'(the second view\'s augmentation)')
    if method.views == 1 and cfg.aug2 is not None:
        errors.append(f'loss.type={cfg.loss.type} reads one view of each image: remove the aug2 section')
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).is_file():
        errors.append(f'model.init_from={cfg.model.init_from}: no such model file')
    return errors


def _sam_errors(cfg: TeacherTrainConfig) -> list[str]:
    sam, o = cfg.sam, cfg.optim
    if not sam.enabled:
        return []
    errors = []
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
    if o.accum_steps != 1:
        errors.append('SAM perturbs the weights with the gradient of one batch: optim.accum_steps must be 1 with '
                      'sam.enabled=true')
    if o.clip_grad:
        errors.append('optim.clip_grad is not applied inside SAM\'s two passes; unset it or set sam.enabled=false')
    if cfg.runtime.mixed_precision == 'fp16':
        errors.append(FP16_SAM)
    if sam.backend == 'sam_pytorch':
        if sam.adaptive:
            errors.append('sam.backend=sam_pytorch has no adaptive (ASAM) mode; use sam.backend=pytorch_optimizer')
        radii = [sam.rho] if sam.schedule == 'constant' else sam.rho_steps
        if any(r <= 0 for r in radii):
            errors.append('sam.backend=sam_pytorch needs radii > 0 (it refuses rho=0)')
    return errors
