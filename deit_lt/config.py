"""Typed run configuration: YAML files plus dotted command-line overrides.

A config file is plain data. It may name one or more ``base`` files (paths relative to itself) that are
merged first, so a table row is a small file that says only how it differs. Command-line overrides use
dotted keys (``optim.lr=1e-3``, ``aug.scale=[0.2,1.0]``). Every key is checked against the dataclass
schema of the tool that reads it: an unknown or misspelled key stops the run with its dotted name and the
closest valid key, never silently ignored. Values are coerced to the annotated type of their field.

The resolved config is written beside every run's outputs (``save_config``), so a run can be repeated
from its own folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError

__all__ = [
    'ConfigError', 'DataConfig', 'EvalAugConfig', 'AugConfig', 'MixAugConfig', 'EvalRuntimeConfig', 'RuntimeConfig',
    'WandbConfig', 'OptimConfig', 'ModelConfig', 'TeacherConfig', 'DistillConfig', 'TrainConfig', 'load_config',
    'load_yaml_with_bases', 'apply_overrides', 'from_dict', 'to_dict', 'save_config', 'scale_schedule',
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------------------
# Sections shared by every tool. A key means the same thing in every tool that reads it; a tool's schema holds
# only the keys it reads (a subclass below changes defaults, or adds the keys of one recipe).
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DataConfig:
    """Which long-tailed dataset, where it is, and how classes are grouped into head / mid / tail."""
    # cifar10_lt | cifar100_lt | imagenet_lt | inat2018 | places_lt | image_list | image_folder | digits_lt
    name: str = 'cifar10_lt'
    # Folder holding the data: `cifar-10-batches-py/`, `cifar-100-python/`, `cifar10_jpeg.npz` (or the .npz path
    # itself) for CIFAR; the image root for list-file datasets. Not needed for digits_lt.
    root: str | None = None
    imb_factor: float = 100.0           # n_max / n_min; 1 = balanced (CIFAR-LT, digits_lt)
    # List files (`relative/path label` per line) for list-file datasets; relative paths resolve against
    # `list_dir` (default: root). The standard names are used when left empty.
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    list_dir: str | None = None
    sort_classes: bool = True           # renumber classes by descending train count (ImageNet-LT, iNat, lists)
    # Head/mid/tail: 'threshold' (many > many_threshold, few < few_threshold train images), 'index'
    # (class-index ranges [0,a) [a,b) [b,C) in sorted label space, as DeiT-LT reports), or 'auto' (index for
    # datasets with published DeiT-LT ranges, threshold otherwise).
    split: Literal['auto', 'threshold', 'index'] = 'auto'
    many_threshold: int = 100
    few_threshold: int = 20
    split_bounds: list[int] | None = None   # [a, b] for split='index'; dataset default when empty
    # Validation images per class, taken only from images the long-tailed subset does not use (CIFAR leftovers,
    # digits' reserve), so the training split never changes; a class with fewer leftovers (CIFAR's class 0 has
    # none) gives what it has, with a warning. 0 = no validation split. List and folder datasets refuse it: their
    # training list is the subset itself (give `val_list` or a val/ folder).
    val_per_class: int = 0
    test_per_class: int = 40            # digits_lt only: balanced test images per class
    cache_dir: str | None = None        # decoded-image cache (default ~/.cache/deit_lt)
    preload: bool = False               # list datasets: decode every image once and keep it in memory
    preload_size: int | None = None     # ... resized so that the short side is this many pixels
    in_memory_max_mb: int = 4096        # refuse to put more than this on the device for the device pipeline
    # Checks of list / folder datasets before training, so that a bad file fails in seconds, not hours in:
    # 'exists' stats every listed file (each missing one is named by list file and line), 'decode' also decodes
    # every image (in threads, with a progress bar; it reads all the data), 'none' checks only the first file.
    verify: Literal['none', 'exists', 'decode'] = 'exists'
    # An image that cannot be read or decoded: 'error' stops with its list file and line; 'skip' reads the next
    # readable image of the same class in its place (batch shapes and exact resume unchanged) and lists it in
    # skipped_images.json in the run folder.
    bad_images: Literal['error', 'skip'] = 'error'


@dataclasses.dataclass
class EvalAugConfig:
    """The evaluation transform (resize, centre crop, normalise) and where it runs."""
    interpolation: Literal['bilinear', 'bicubic'] = 'bicubic'
    eval_crop_pct: float | None = None  # eval: resize to size/crop_pct then centre crop; default 0.875 at 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Where augmentation runs: 'device' (dataset held decoded on the device, batched augmentation there),
    # 'loader' (per-image PIL augmentation in DataLoader workers), 'auto' (device for in-memory datasets).
    placement: Literal['auto', 'device', 'loader'] = 'auto'
    num_workers: int | None = None      # loader placement: worker processes (default: the cores per process, <= 8)


@dataclasses.dataclass
class AugConfig(EvalAugConfig):
    """Training augmentation of one image (the DeiT recipe by default) and repeated augmentation."""
    crop: Literal['rrc', 'pad_crop', 'none'] = 'rrc'  # RandomResizedCrop | pad-and-crop (CIFAR CNNs) | none
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = 4                    # pad_crop only
    hflip: float = 0.5
    rotate: float = 0.0                 # random rotation in [-rotate, rotate] degrees (RIDE / MDCS CIFAR recipes)
    rand_augment: str | None = 'rand-m9-mstd0.5-inc1'   # timm RandAugment spec, null = off
    # AutoAugment policy (torchvision's 'cifar10' / 'imagenet' / 'svhn'; instead of rand_augment), loader placement
    auto_augment: Literal['cifar10', 'imagenet', 'svhn'] | None = None
    color_jitter: float | None = None   # only without rand_augment / auto_augment (timm behaviour)
    re_prob: float = 0.25               # random erasing probability
    re_mode: Literal['pixel', 'rand', 'const'] = 'pixel'
    re_count: int = 1
    cutout: int = 0                     # Cutout (DeVries & Taylor 2017): one zeroed square of this side, 0 = off
    # Which images an epoch visits (Kang et al., ICLR 2020): 'instance' (each once; with repeated_aug > 1 DeiT's
    # repeated augmentation), 'class_balanced', 'sqrt' (square-root), 'progressive' (instance -> balanced).
    sampler: Literal['instance', 'class_balanced', 'sqrt', 'progressive'] = 'instance'
    samples_per_class: int = 4          # class_balanced: consecutive images per visit of a class
    repeated_aug: int = 3               # repeated augmentation (RASampler) repeats; 1 = off


@dataclasses.dataclass
class MixAugConfig(AugConfig):
    """`AugConfig` plus the batch-level mixing of the DeiT recipe (Mixup / CutMix with label smoothing)."""
    mixup: float = 0.8                  # Mixup alpha (0 = off)
    cutmix: float = 1.0                 # CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal['batch', 'pair', 'elem'] = 'batch'
    smoothing: float = 0.1              # label smoothing inside the mixed targets


@dataclasses.dataclass
class EvalRuntimeConfig:
    """Device, precision and outputs of a tool that only evaluates or fits on frozen features."""
    seed: int = 0
    output_dir: str = 'runs/default'
    cpu: bool = False                   # force CPU even when a GPU is present
    mixed_precision: Literal['auto', 'no', 'bf16', 'fp16'] = 'auto'   # auto: bf16 on GPU (fp16 without bf16)
    eval_batch_size: int = 256
    progress: bool = True               # progress bar on a terminal, periodic progress lines otherwise


@dataclasses.dataclass
class RuntimeConfig(EvalRuntimeConfig):
    """`EvalRuntimeConfig` plus what a training run needs: speed switches, evaluation cadence, checkpoints."""
    compile: Literal['auto', 'on', 'off'] = 'auto'    # torch.compile the training step model (auto: on GPU)
    channels_last: bool = True          # CNNs in channels-last memory format on GPU
    eval_every: int = 1                 # epochs between evaluations (the last epoch is always evaluated)
    # Split that picks `best.safetensors`: 'auto' = val when the data has a validation split, else test (what the
    # published code does: DeiT-LT and Saddle-LongTail select on the test set).
    select_on: Literal['auto', 'val', 'test'] = 'auto'
    save_every: int = 1                 # epochs between resumable checkpoints
    save_every_steps: int = 0           # also checkpoint every N optimizer updates inside an epoch (0 = off)
    keep_checkpoints: int = 1           # resumable checkpoints kept besides best / last
    resume: str | None = None           # 'auto' (latest in output_dir, if any) or a checkpoint folder
    overwrite: bool = False             # start afresh in an output_dir that holds a run (its run files are removed)
    log_every: int = 50                 # optimizer updates between train scalars (the only host syncs)
    max_steps: int | None = None        # stop after this many optimizer updates (tests, smoke runs)


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases logging. Never required: 'disabled' works without wandb installed."""
    mode: Literal['offline', 'online', 'disabled'] = 'offline'
    project: str = 'deit-lt'
    entity: str | None = None
    name: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    dir: str | None = None              # default: the run's output_dir


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule of every training recipe.

    `batch_size` is the GLOBAL batch of one optimizer update: all processes together, all `accum_steps`
    micro-batches together. Each process runs micro-batches of batch_size / (processes x accum_steps) images, so the
    recipe (and its learning rate) does not change with the number of GPUs.
    """
    opt: str = 'adamw'                  # any timm optimizer name (adamw, sgd, ...)
    lr: float = 2.5e-4                  # peak lr, for a global batch of `lr_base_batch` (null: as given)
    lr_base_batch: int | None = 1024    # lr scales linearly with batch_size / lr_base_batch
    weight_decay: float = 0.05
    # false (timm / DeiT): no decay on norms, biases, position embedding and tokens; true (LDAM-DRW / Saddle-LongTail
    # CNN teachers): decay on every parameter. Layers may exempt their own (APA's kappa / lambda).
    decay_norm_and_bias: bool = False
    momentum: float = 0.9               # SGD only
    nesterov: bool = False              # SGD only
    clip_grad: float | None = None
    fused: bool | None = None           # fused AdamW / SGD kernel (default: on GPU)
    epochs: int = 1200
    # Shrink (or stretch) the whole recipe in time: epochs, warmup, milestones and every epoch-valued setting of the
    # config (DRW epoch, SAM radius steps, evaluation and checkpoint cadence) are multiplied by it when the config is
    # loaded, so `optim.epochs_scale=0.01` is a short run of the same recipe (1200 -> 12 epochs, DRW 1100 -> 11).
    epochs_scale: float = 1.0
    batch_size: int = 1024              # global batch per optimizer update (see the class docstring)
    accum_steps: int = 4                # micro-batches per optimizer update (gradient accumulation)
    sched: Literal['cosine', 'multistep', 'constant'] = 'cosine'
    sched_unit: Literal['update', 'epoch'] = 'update'   # the lr changes after every update, or once per epoch
    warmup_epochs: float = 5            # linear warmup length (epochs)
    # Warmup start. null: lr / warmup_epochs, so that epoch e (0-based) of an epoch-wise warmup runs at
    # lr * (e + 1) / warmup_epochs (LDAM-DRW / Saddle-LongTail); a number: start there (DeiT: 1e-6).
    warmup_lr: float | None = 1e-6
    warmup_prefix: bool = False         # cosine: false = over the whole schedule (timm, DeiT); true = after warmup
    min_lr: float = 1e-5                # cosine: the final lr
    milestones: list[int] = dataclasses.field(default_factory=list)   # multistep: epochs where lr x= decay_rate
    decay_rate: float = 0.1             # multistep


# --------------------------------------------------------------------------------------------------------------
# Student (tools/train.py)
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelConfig:
    """The student: a timm model name plus keyword arguments for `timm.create_model`."""
    name: str = 'deit_base_distilled_patch16_224'
    img_size: int | None = None         # default: the model's own
    drop_path_rate: float = 0.1
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TeacherConfig:
    """The CNN teacher the DIST head learns from."""
    checkpoint: str | None = None       # our .safetensors export, a plain state dict, or a PaCo/MoCo checkpoint
    arch: str | None = None             # model name; read from our checkpoints when empty
    format: Literal['auto', 'deit_lt', 'state_dict', 'paco'] = 'auto'
    num_classes: int | None = None      # checked against the data; read from the checkpoint when empty
    use_norm: bool | None = None        # cosine (LDAM) head; read from our checkpoints when empty
    img_size: int | None = None         # teacher input size; the student's batch is resized to it
    # 'mixed': the teacher sees the student's augmented, mixed batch (out-of-distribution distillation);
    # 'clean': it sees the un-augmented image (ablation).
    input: Literal['mixed', 'clean'] = 'mixed'
    mean: tuple[float, ...] | None = None   # normalisation the teacher was trained with (default: the student's)
    std: tuple[float, ...] | None = None
    map_targets: bool = False           # map the teacher's class ids through the sorted-class map (PaCo IN-LT/iNat)
    # Multiply the teacher's logits before soft distillation. null: 1, the raw outputs as the official code uses them
    # (an LDAM teacher's cosines); 'auto': the scale recorded in the teacher's file (30 for an LDAM cosine head); or a
    # number. Hard distillation (argmax) ignores it.
    logit_scale: float | Literal['auto'] | None = None
    # Multi-expert teachers (RIDE) with a trained router: distil from the experts the router picks per image
    # instead of the full ensemble.
    routed: bool = False


@dataclasses.dataclass
class DistillConfig:
    """DeiT-LT loss: CLS on ground truth, DIST on the teacher, DRW re-weighting of the DIST term."""
    type: Literal['hard', 'soft', 'none'] = 'hard'   # none: DIST head learns the ground truth (no teacher)
    alpha: float = 0.5                  # L = (1 - alpha) * L_cls + alpha * L_dist
    tau: float = 1.0                    # soft distillation temperature
    drw_epoch: int | None = 1100        # from this (0-based) epoch on the DIST term is re-weighted; null = never
    beta: float = 0.9999                # effective-number beta of the DRW weights
    no_mixup_drw: bool = True           # after drw_epoch: no Mixup/CutMix, CLS on plain CE (CIFAR recipe)


@dataclasses.dataclass
class TrainConfig:
    """Everything tools/train.py reads."""
    name: str = 'deit_lt'
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    aug: MixAugConfig = dataclasses.field(default_factory=MixAugConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

def load_yaml_with_bases(path: str | os.PathLike, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping and merge the files named by its `base` key (relative to it) underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    key = str(path.resolve())
    if key in _seen:
        raise ConfigError(f'config bases form a cycle: {" -> ".join(_seen + (key,))}')
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f'{path}: not valid YAML: {e}') from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: the top level must be a mapping, got {type(raw).__name__}')
    bases = raw.pop('base', None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, load_yaml_with_bases(path.parent / base, _seen + (key,)))
    return _deep_merge(merged, raw)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], schema: type | None = None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict. Values are YAML scalars/lists (`null`, `[1,2]`, `1e-3`).

    With `schema`, a key that is not a field is reported right away with its dotted name.
    """
    raw = dict(raw)
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} is not of the form key.sub=value')
        key, _, text = item.partition('=')
        key = key.strip().lstrip('-')
        parts = key.split('.')
        if schema is not None:
            _check_path(schema, parts)
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = _parse_value(text)
    return raw


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ''
    except yaml.YAMLError:
        return text


def _check_path(schema: type, parts: list[str]) -> None:
    cls = schema
    for i, p in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            return  # free-form dict field (model.kwargs.*)
        hints = typing.get_type_hints(cls)
        if p not in hints:
            _unknown_key('.'.join(parts[:i + 1]), p, list(hints))
        cls = _dataclass_of(hints[p])


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for a in get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def _unknown_key(dotted: str, key: str, valid: list[str]) -> None:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f' Did you mean {near[0]!r}?' if near else ''
    raise ConfigError(f'unknown config key {dotted!r}.{hint} Valid keys here: {", ".join(sorted(valid))}.')


def from_dict(cls: type, raw: dict[str, Any] | None, prefix: str = '') -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and coercing values to the annotated types."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f'{prefix or "config"} must be a mapping, got {raw!r}')
    hints = typing.get_type_hints(cls)
    for k in raw:
        if k not in hints:
            _unknown_key(f'{prefix}{k}', k, list(hints))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], f'{prefix}{f.name}')
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + '.')
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ('null', 'none', '~')):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f'{key}: cannot be {value!r}')
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            value = next((c for c in (('on', 'true', 'yes') if value else ('off', 'false', 'no')) if c in choices),
                         value)
        if value not in choices:
            raise ConfigError(f'{key}: {value!r} is not one of {", ".join(map(repr, choices))}')
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_value(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f'{key}: expected {len(args)} values, got {list(value)!r}')
            return tuple(_coerce(v, a, f'{key}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f'{key}[{i}]') for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'{key}: expected a mapping, got {value!r}')
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'yes', 'on', '1', 'false', 'no', 'off', '0'):
            return value.lower() in ('true', 'yes', 'on', '1')
        raise ConfigError(f'{key}: expected true/false, got {value!r}')
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f'{key}: expected an integer, got {value!r}')
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f'{key}: expected an integer, got {value!r}') from None
        if not f.is_integer():
            raise ConfigError(f'{key}: expected an integer, got {value!r}')
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f'{key}: expected a number, got {value!r}')
        try:
            return float(value)  # also PyYAML's '1e-3' strings
        except (TypeError, ValueError):
            raise ConfigError(f'{key}: expected a number, got {value!r}') from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f'{key}: expected a string, got {value!r}')
        return str(value)
    return value


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Any:
    """Load `cls` (a config dataclass) from an optional YAML file with bases, then apply dotted overrides and
    `optim.epochs_scale` (the resolved config holds the scaled schedule and epochs_scale 1)."""
    raw = load_yaml_with_bases(path) if path else {}
    raw = apply_overrides(raw, list(overrides), schema=cls)
    return scale_schedule(from_dict(cls, raw))


def scale_schedule(cfg: Any) -> Any:
    """Multiply every epoch-valued setting of a training config by `cfg.optim.epochs_scale` (in place), then set
    the scale to 1. Epochs and cadences stay >= 1, 0-based switch epochs stay inside the schedule, step boundaries
    stay increasing. Method options under `loss.kwargs` are not touched."""
    optim = getattr(cfg, 'optim', None)
    s = getattr(optim, 'epochs_scale', 1.0)
    if optim is None or s == 1.0:
        return cfg
    if s <= 0:
        raise ConfigError(f'optim.epochs_scale must be > 0, got {s}')
    epochs = max(1, round(optim.epochs * s))

    def inside(e: int | None) -> int | None:
        return None if e is None else min(max(0, round(e * s)), epochs - 1)
    optim.epochs = epochs
    optim.warmup_epochs = optim.warmup_epochs * s
    if optim.sched_unit == 'epoch':
        optim.warmup_epochs = float(min(round(optim.warmup_epochs), epochs - 1))
    # a decay step stays after the first epoch, and one that falls outside the shorter schedule is dropped
    optim.milestones = [m for m in (max(1, round(m * s)) for m in optim.milestones) if m < epochs]
    for section in ('distill', 'loss'):
        if hasattr(getattr(cfg, section, None), 'drw_epoch'):
            getattr(cfg, section).drw_epoch = inside(getattr(cfg, section).drw_epoch)
    sam = getattr(cfg, 'sam', None)
    if sam is not None and getattr(sam, 'step_epochs', None):
        bounds, last = [], 0
        for b in sam.step_epochs:               # 1-based boundaries: strictly increasing
            last = max(last + 1, round(b * s))
            bounds.append(last)
        sam.step_epochs = bounds
    cluster = getattr(cfg, 'cluster', None)
    if hasattr(cluster, 'bank_start_epoch'):
        cluster.bank_start_epoch = inside(cluster.bank_start_epoch)
    runtime = getattr(cfg, 'runtime', None)
    for key in ('eval_every', 'save_every'):
        if hasattr(runtime, key):
            setattr(runtime, key, max(1, round(getattr(runtime, key) * s)))
    optim.epochs_scale = 1.0
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically) so the run can be repeated from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w') as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
