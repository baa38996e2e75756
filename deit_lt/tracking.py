"""Run tracking: a JSON-lines log beside the outputs, W&B when available, and the per-class accuracy plot.

W&B is never required. `wandb.mode=disabled` never imports it; offline (the default) and online use it when it
is installed and otherwise carry on with the local log after one warning. Only the main process logs.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .config import WandbConfig

__all__ = ['RunLogger', 'plot_per_class_accuracy']


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, 'item'):
        return v.item()
    return v


class RunLogger:
    """Scalars to `<output_dir>/log.jsonl` and W&B; images (PNG files) to W&B."""

    def __init__(self, cfg: WandbConfig, output_dir: str | os.PathLike, run_config: dict[str, Any],
                 enabled: bool = True, job_type: str = 'train', resume_id: str | None = None):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.run = None
        self.run_id = resume_id
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output_dir / 'log.jsonl', 'a')
        if cfg.mode == 'disabled':
            return
        try:
            import wandb
        except ImportError:
            warnings.warn(f'wandb is not installed: logging locally to {self.output_dir / "log.jsonl"} only '
                          f'(pip install wandb, or set wandb.mode=disabled to silence this)')
            return
        wdir = Path(cfg.dir) if cfg.dir else self.output_dir
        wdir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags),
                              mode=cfg.mode, dir=str(wdir), config=run_config, job_type=job_type,
                              id=resume_id, resume='allow' if resume_id else None)
        self.run_id = self.run.id

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.run, 'dir', None) if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {'step': step, 'time': time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | os.PathLike, step: int) -> None:
        if self.enabled and self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(str(path))}, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled and self.run is not None:
            for k, v in summary.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def plot_per_class_accuracy(per_class: dict[str, Sequence[float | None]], train_counts: Sequence[int],
                            path: str | os.PathLike, title: str = '', groups: dict[str, Sequence[int]] | None = None,
                            class_names: Sequence[str] | None = None) -> Path:
    """Bar chart of per-class test accuracy for one or more predictors, classes in label order, with the training
    count on a second axis (log scale) and the head/mid/tail boundaries."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    n = len(train_counts)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.35 * n + 3)), 4))
    width = 0.8 / max(1, len(per_class))
    for i, (name, accs) in enumerate(per_class.items()):
        vals = [float('nan') if a is None else a for a in accs]
        if n <= 100:
            ax.bar(x + (i - (len(per_class) - 1) / 2) * width, vals, width, label=name)
        else:
            ax.plot(x, vals, lw=0.8, label=name)
    ax.set_ylabel('test accuracy (%)')
    ax.set_xlabel('class (sorted by training count)')
    ax.set_ylim(0, 100)
    if class_names is not None and n <= 20:
        ax.set_xticks(x, class_names, rotation=45, ha='right', fontsize=8)
    if groups:
        for name in ('mid', 'tail'):
            idx = groups.get(name) or []
            if idx:
                ax.axvline(min(idx) - 0.5, color='grey', ls='--', lw=0.8)
    ax2 = ax.twinx()
    ax2.plot(x, train_counts, color='black', marker='.', lw=1, label='train images')
    ax2.set_yscale('log')
    ax2.set_ylabel('training images')
    ax.legend(loc='lower left', fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
