"""Configuration of the analysis tool (`tools/analyze.py`).

The data come from the first checkpoint's own training config (its `data` and `aug` sections, as
`tools/rebalance.py` does), so a model is analysed on the data it was trained on; dotted overrides (`data.root=...`,
`num_images=512`, `wandb.mode=disabled`) apply on top. Each checkpoint is then fed at its own input size and with
its own normalisation (`img_size`, `mean`, `std` of its metadata).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterable, Literal

from ..checkpoint import CheckpointError, read_model_meta
from ..config import AugConfig, ConfigError, DataConfig, WandbConfig, apply_overrides, from_dict

__all__ = ['ANALYSES', 'AnalysisError', 'AnalysisConfig', 'resolve_analyses', 'resolve_checkpoint',
           'load_analysis_config']

_logger = logging.getLogger(__name__)

ANALYSES = ('attention', 'rank', 'expertise', 'geometry', 'calibration')


class AnalysisError(ConfigError):
    """Settings or arguments the analysis cannot work with; the message says what is wrong and what to do.
    (Missing or unusable model files raise `CheckpointError`, unusable data `DatasetError`.)"""


@dataclasses.dataclass
class AnalysisConfig:
    """Everything tools/analyze.py reads."""
    checkpoints: list[str] = dataclasses.field(default_factory=list)   # model files or run folders; first = main
    labels: list[str] | None = None     # one per checkpoint; default <folder>/<file stem>
    # Teacher for the DIST-teacher agreement: null = each distilled student's own (config teacher.checkpoint),
    # 'none' = no teacher, or a model file used for every student.
    teacher: str | None = None
    analyses: list[str] = dataclasses.field(default_factory=lambda: ['all'])
    split: Literal['test', 'val', 'train'] = 'test'
    num_images: int = 1024              # fixed image set (seeded subset of the split) for attention and rank
    seed: int = 0                       # chooses that subset
    batch_size: int = 256
    rank_rtol: float = 1e-3             # numerical rank: singular values > rank_rtol x the largest
    rank_variance: float = 0.99         # variance rank: components holding this fraction of the variance
    rank_center: bool = True            # centre the features over the images before the SVD (PCA)
    n_bins: int = 15                    # reliability diagram / ECE bins (equal width)
    cpu: bool = False                   # force CPU even when a GPU is present
    progress: bool = True               # progress bar per checkpoint
    output_dir: str = ''                # '' = runs/analysis/<first checkpoint folder>_<stem>
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    aug: AugConfig = dataclasses.field(default_factory=AugConfig)     # only the eval transform is used
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


def resolve_analyses(names: Iterable[str] | str) -> list[str]:
    """Expand 'all' and comma lists into analysis names in a fixed order; an unknown name is an error."""
    if isinstance(names, str):
        names = [names]
    items = [n.strip() for item in names for n in str(item).split(',') if n.strip()]
    unknown = [n for n in items if n not in ANALYSES + ('all',)]
    if unknown or not items:
        what = f'unknown analysis {unknown[0]!r}' if unknown else 'no analysis given'
        raise AnalysisError(f'{what}; choose from {", ".join(ANALYSES)} or all')
    return list(ANALYSES) if 'all' in items else [n for n in ANALYSES if n in items]


def resolve_checkpoint(path: str | Path) -> Path:
    """A model file, or the `last.safetensors` (else `best.safetensors`) of a run folder."""
    p = Path(path)
    if p.is_dir():
        for name in ('last.safetensors', 'best.safetensors'):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f'{p} is a folder without last.safetensors or best.safetensors; give a run folder of '
                              f'tools/train.py / tools/train_teacher.py or a .safetensors model file')
    if not p.is_file():
        raise CheckpointError(f'checkpoint not found: {p}')
    return p


def _known(section: Any, cls: type) -> dict[str, Any]:
    """The keys of a checkpoint's config section that `cls` has (other tools' configs may carry more)."""
    if not isinstance(section, dict):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in section.items() if k in names}


def load_analysis_config(checkpoints: list[str], overrides: Iterable[str] = (), **given: Any) -> AnalysisConfig:
    """Build the config: first checkpoint's data/aug sections < dotted overrides < explicit arguments.

    Args:
        checkpoints: model files or run folders (the first one's training config supplies the data).
        overrides: `key.sub=value` strings.
        **given: top-level fields set by the command line (labels, teacher, analyses, output_dir, cpu, ...);
            None values are ignored. `data_root` sets `data.root`.
    """
    if not checkpoints:
        raise AnalysisError('no checkpoint given: pass --checkpoint <run folder or model file>')
    raw = apply_overrides({}, list(overrides), schema=AnalysisConfig)
    data_root = given.pop('data_root', None)
    raw.update({k: v for k, v in given.items() if v is not None})
    raw['checkpoints'] = [str(c) for c in checkpoints]
    resolve_analyses(raw.get('analyses', ['all']))   # a misspelt name fails before anything is read
    meta = read_model_meta(resolve_checkpoint(checkpoints[0]))
    if meta is None:
        raise CheckpointError(f'{checkpoints[0]} has no deit-lt metadata; analyse model files written by the deit-lt '
                              f'tools (train, train_teacher, rebalance)')
    source = meta.get('config') or {}
    data = _known(source.get('data'), DataConfig) or _known(meta.get('dataset'), DataConfig)
    aug = _known(source.get('aug'), AugConfig)
    for key, base in (('data', data), ('aug', aug)):
        user = raw.get(key) or {}
        if not isinstance(user, dict):
            raise ConfigError(f'{key} must be a mapping, got {user!r}')
        raw[key] = {**base, **user}
    if data_root is not None:
        raw['data']['root'] = str(data_root)
    cfg = from_dict(AnalysisConfig, raw)
    for name, ok in (('num_images', cfg.num_images >= 2), ('batch_size', cfg.batch_size >= 1),
                     ('n_bins', cfg.n_bins >= 1), ('rank_rtol', 0 < cfg.rank_rtol < 1),
                     ('rank_variance', 0 < cfg.rank_variance <= 1)):
        if not ok:
            raise AnalysisError(f'{name}={getattr(cfg, name)} is out of range (num_images >= 2, batch_size >= 1, '
                                f'n_bins >= 1, 0 < rank_rtol < 1, 0 < rank_variance <= 1)')
    if cfg.labels is not None and len(cfg.labels) != len(cfg.checkpoints):
        raise AnalysisError(f'{len(cfg.labels)} labels for {len(cfg.checkpoints)} checkpoints; give one per checkpoint')
    return cfg
