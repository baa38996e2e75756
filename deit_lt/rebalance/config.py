"""Configuration of the classifier re-balancing tool (Decoupling, Kang et al., ICLR 2020).

`RebalanceConfig` is the top-level dataclass `tools/rebalance.py` reads. Its `data` and `aug` sections start from the
checkpoint's own training config (so the model is re-balanced on the data it was trained on) and the YAML file and
dotted command-line overrides are applied on top: `load_rebalance_config` does that merge on plain dicts before the
dataclasses are built, so an override never silently loses to the checkpoint and unknown keys still fail.

The defaults are the ImageNet-LT recipe of the official code (`config/ImageNet_LT/cls_crt.yaml`, `cls_lws.yaml`,
`tau_norm.py`, `--knn`): cRT 10 epochs, LWS 5 epochs, SGD momentum 0.9, lr 0.2 at batch 512 (cosine to 0), weight
decay 5e-4, class-aware sampling with 4 images per class, tau grid 0..2 step 0.1, NCM on centred L2-normalised
features with squared Euclidean distance.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Literal

from ..checkpoint import read_model_meta
from ..config import (ConfigError, DataConfig, EvalAugConfig, EvalRuntimeConfig, WandbConfig, apply_overrides,
                      from_dict, load_yaml_with_bases)

__all__ = ['METHOD_NAMES', 'FeatureConfig', 'HeadTrainingConfig', 'CRTConfig', 'LWSConfig',
           'TauNormConfig', 'NCMConfig', 'RebalanceConfig', 'resolve_methods', 'load_rebalance_config',
           'default_output_dir']

_logger = logging.getLogger(__name__)

METHOD_NAMES = ('crt', 'tau_norm', 'lws', 'ncm')


def _tau_grid() -> list[float]:
    return [round(0.1 * i, 1) for i in range(21)]   # 0.0, 0.1, ..., 2.0 as in the official tau_norm.py


@dataclasses.dataclass
class FeatureConfig:
    """Frozen-backbone features, computed once with the eval transform."""
    cache: bool = True                  # keep them under <output_dir>/features, keyed by checkpoint and split


@dataclasses.dataclass
class HeadTrainingConfig:
    """Training a classifier (cRT) or its scales (LWS) on cached features with a re-balancing sampler."""
    # Heads to train: 'cls' and/or 'dist' for distilled students, 'logits' for single-head models; null = all.
    # Heads left out keep their stage-1 weights (cRT-CLS of the DeiT-LT notes: heads=[cls]).
    heads: list[str] | None = None
    epochs: int = 10
    batch_size: int = 512
    lr: float = 0.2                     # at batch `lr_base_batch`; scaled linearly with batch_size
    lr_base_batch: int = 512
    momentum: float = 0.9
    weight_decay: float = 5e-4          # LWS: acts on the scales too, as in the official code
    sampler: Literal['class_balanced', 'instance', 'sqrt', 'progressive'] = 'class_balanced'
    samples_per_class: int = 4          # class_balanced: consecutive images per class visit
    select_epoch: bool = True           # keep each head's best epoch on the val split (when there is one)


@dataclasses.dataclass
class CRTConfig(HeadTrainingConfig):
    """cRT: a re-initialised linear classifier trained with class-balanced sampling."""


@dataclasses.dataclass
class LWSConfig(HeadTrainingConfig):
    """LWS: per-class scales of the frozen stage-1 classifier, trained with class-balanced sampling."""
    epochs: int = 5


@dataclasses.dataclass
class TauNormConfig:
    """tau-normalisation: w_j / ||w_j||^tau, tau picked on the val split."""
    grid: list[float] = dataclasses.field(default_factory=_tau_grid)
    bias: Literal['drop', 'keep'] = 'drop'   # drop: the original method; keep: stage-1 bias added unchanged
    # per_head: each head takes the tau that is best for its own val top-1; avg: (distilled students) the
    # (tau_cls, tau_dist) pair that is best for the averaged prediction, searched on the full grid x grid.
    select: Literal['per_head', 'avg'] = 'per_head'
    heads: list[str] | None = None      # heads to normalise; null = all


@dataclasses.dataclass
class NCMConfig:
    """Nearest class mean on the frozen features."""
    features: list[str] | None = None   # 'cls', 'dist', 'concat' (students), 'feat' (single head); null = all
    feat_type: Literal['un', 'l2n', 'cl2n'] = 'cl2n'   # raw | L2-normalised | centred then L2-normalised
    dist: Literal['l2', 'cos'] = 'l2'   # squared Euclidean distance | cosine similarity to the centroids


@dataclasses.dataclass
class RebalanceConfig:
    """Everything tools/rebalance.py reads."""
    checkpoint: str | None = None       # a deit-lt model file (.safetensors): student or teacher
    methods: list[str] = dataclasses.field(default_factory=lambda: ['all'])
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    aug: EvalAugConfig = dataclasses.field(default_factory=EvalAugConfig)   # features use the eval transform
    # output_dir '' = runs/rebalance/<checkpoint folder>_<checkpoint name>
    runtime: EvalRuntimeConfig = dataclasses.field(default_factory=lambda: EvalRuntimeConfig(output_dir=''))
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    crt: CRTConfig = dataclasses.field(default_factory=CRTConfig)
    tau_norm: TauNormConfig = dataclasses.field(default_factory=TauNormConfig)
    lws: LWSConfig = dataclasses.field(default_factory=LWSConfig)
    ncm: NCMConfig = dataclasses.field(default_factory=NCMConfig)
    save_models: bool = True            # write the re-balanced model files (and NCM centroids)


def resolve_methods(methods: Iterable[str] | str) -> list[str]:
    """Expand 'all' and comma lists into method names in a fixed order; an unknown name is an error."""
    if isinstance(methods, str):
        methods = [methods]
    names = [m.strip() for item in methods for m in str(item).split(',') if m.strip()]
    if not names:
        raise ConfigError(f'no method given; choose from {", ".join(METHOD_NAMES)} or all')
    unknown = [m for m in names if m not in METHOD_NAMES + ('all',)]
    if unknown:
        raise ConfigError(f'unknown method {unknown[0]!r}; choose from {", ".join(METHOD_NAMES)} or all')
    if 'all' in names:
        return list(METHOD_NAMES)
    return [m for m in METHOD_NAMES if m in names]


def default_output_dir(checkpoint: str | os.PathLike) -> Path:
    """runs/rebalance/<folder>_<name>: checkpoints are often all called model.safetensors, so the folder is kept."""
    p = Path(checkpoint)
    return Path('runs') / 'rebalance' / f'{p.parent.name}_{p.stem}'.lstrip('_')


def _section_from_checkpoint(source: Any, cls: type, label: str) -> dict[str, Any]:
    """The keys of a checkpoint's config section that `cls` knows (configs written by other tools or versions may
    carry extra ones; they do not affect what is read here)."""
    if not isinstance(source, dict):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    dropped = sorted(set(source) - names)
    if dropped:
        _logger.info('checkpoint %s section: ignoring keys this tool does not use: %s',
                                         label, ', '.join(dropped))
    return {k: v for k, v in source.items() if k in names}


def load_rebalance_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (), *,
                          checkpoint: str | None = None, methods: Iterable[str] | str | None = None
                          ) -> RebalanceConfig:
    """Build the config: checkpoint's data/aug sections < YAML file (with bases) < dotted overrides < arguments.

    Args:
        path: optional YAML file (may name `base` files).
        overrides: `key.sub=value` strings.
        checkpoint: the model file (wins over the `checkpoint` key).
        methods: method names or 'all' (win over the `methods` key).
    """
    raw = load_yaml_with_bases(path) if path else {}
    raw = apply_overrides(raw, list(overrides), schema=RebalanceConfig)
    if checkpoint is not None:
        raw['checkpoint'] = str(checkpoint)
    if methods is not None:
        raw['methods'] = [methods] if isinstance(methods, str) else list(methods)
    resolve_methods(raw.get('methods', ['all']))   # fail on a bad method name before reading anything
    ckpt = raw.get('checkpoint')
    if not ckpt:
        raise ConfigError('no checkpoint given: pass --checkpoint path/to/model.safetensors')
    meta = read_model_meta(ckpt)
    if meta is None:
        raise ConfigError(f'{ckpt} has no deit-lt metadata; re-balancing needs a deit-lt model file '
                             f'(written by tools/train.py or the teacher tools)')
    source = meta.get('config') or {}
    data = _section_from_checkpoint(source.get('data'), DataConfig, 'data')
    if not data and isinstance(meta.get('dataset'), dict):
        data = _section_from_checkpoint(meta['dataset'], DataConfig, 'dataset')
    aug = _section_from_checkpoint(source.get('aug'), EvalAugConfig, 'aug')
    if meta.get('mean') and meta.get('std'):
        aug.update(mean=list(meta['mean']), std=list(meta['std']))   # the normalisation the model expects
    for key, base in (('data', data), ('aug', aug)):
        given = raw.get(key) or {}
        if not isinstance(given, dict):
            raise ConfigError(f'{key} must be a mapping, got {given!r}')
        raw[key] = {**base, **given}
    return from_dict(RebalanceConfig, raw)
