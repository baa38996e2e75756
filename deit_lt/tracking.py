"""Run tracking: a JSON-lines log beside the outputs, W&B when available, and the per-class accuracy plot.

W&B is never required. `wandb.mode=disabled` never imports it; offline (the default) and online use it when it
is installed and otherwise carry on with the local log after one warning. Only the main process logs. Online mode
without credentials is a `ConfigError` before the run starts (`check_wandb`), not wandb's login prompt or traceback;
W&B's own console output is kept to its start-up lines (`quiet`), so its end-of-run summary never lands on a progress
bar's line.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from .config import WandbConfig
from .errors import ConfigError

__all__ = ['RunLogger', 'check_wandb', 'wandb_credentials', 'plot_per_class_accuracy']

# wandb.init settings: no end-of-run history / summary block on the console (it would print on whatever line a
# progress bar left). A dict rather than wandb.Settings, so stand-in modules in tests need no Settings class.
_WANDB_SETTINGS = {'quiet': True}


def _netrc_path() -> Path:
    """The netrc file wandb reads: $NETRC, else ~/.netrc, else ~/_netrc (Windows)."""
    if os.environ.get('NETRC'):
        return Path(os.environ['NETRC']).expanduser()
    unix, windows = Path('~/.netrc').expanduser(), Path('~/_netrc').expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def wandb_credentials() -> str | None:
    """Where W&B online mode would find its credentials, looked up without a network call; None if nowhere.

    The places wandb's login reads, in its order: the WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE environment
    variables, the netrc entry for the W&B host (what `wandb login` writes; host from WANDB_BASE_URL, default
    api.wandb.ai), and an api_key in wandb's settings files (looked up only when wandb is installed).
    """
    for var in ('WANDB_API_KEY', 'WANDB_IDENTITY_TOKEN_FILE'):
        if os.environ.get(var):
            return var
    host = urlsplit(os.environ.get('WANDB_BASE_URL') or 'https://api.wandb.ai').netloc
    path = _netrc_path()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):   # no file, or one wandb could not read either
        entry = None
    if entry and entry[2]:
        return str(path)
    try:
        from wandb.sdk import wandb_setup   # loads settings files and environment; starts no service
        if wandb_setup.singleton().settings.api_key:
            return 'wandb settings'
    except (ImportError, AttributeError):   # wandb missing, or a version without this module layout
        pass
    return None


def check_wandb(cfg: WandbConfig) -> None:
    """Fail early, with one line, when `cfg` cannot work: online mode without credentials.

    Raises:
        ConfigError: wandb.mode=online and `wandb_credentials()` finds none.
    """
    if cfg.mode == 'online' and wandb_credentials() is None:
        raise ConfigError('wandb.mode=online needs W&B credentials and none were found (WANDB_API_KEY, or a '
                          '~/.netrc entry from `wandb login`): log in with `wandb login`, or use wandb.mode=offline '
                          '(the default; upload later with `wandb sync`) or wandb.mode=disabled')


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, 'item'):
        return v.item()
    return v


class RunLogger:
    """Scalars to `<output_dir>/log.jsonl` and W&B; images (PNG files) to W&B.

    Raises:
        ConfigError: online mode without credentials (`check_wandb`), on every process alike, so that no process
            goes on to wait for one that stopped.
    """

    def __init__(self, cfg: WandbConfig, output_dir: str | os.PathLike, run_config: dict[str, Any],
                 enabled: bool = True, job_type: str = 'train', resume_id: str | None = None):
        check_wandb(cfg)
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
                              id=resume_id, resume='allow' if resume_id else None, settings=dict(_WANDB_SETTINGS))
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
