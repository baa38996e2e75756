"""Process-level plumbing shared by the tools: the Accelerator, the output folder (one run at a time), stop signals,
resume lookup, gathering, provenance."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from .checkpoint import latest_checkpoint
from .config import EvalRuntimeConfig, RuntimeConfig
from .errors import CheckpointError, ConfigError

__all__ = ['create_accelerator', 'resolve_resume', 'gather_fn', 'want_compile', 'run_provenance', 'OutputDir',
           'StopSignals']

# what a run writes into its output folder (removed by runtime.overwrite=true)
RUN_FILES = ('checkpoints', 'report.json', 'best.safetensors', 'last.safetensors', 'log.jsonl', 'config.yaml',
             'per_class_accuracy.png', 'class_counts.json', 'class_map.json', 'clusters.json')


class OutputDir:
    """One run per output folder.

    The main process holds an exclusive `flock` on `<output_dir>/.lock` while the run lives (the kernel releases it
    when the process dies, so a crashed run leaves no stale lock; on file systems without working flock, e.g. some
    NFS setups, the check is void). A folder that holds a run already is not reused unless `resume` continues it or
    `overwrite` clears it first.

    Args:
        cfg: the runtime section (output_dir, resume, overwrite).
        is_main: only the main process locks and clears.
    """

    def __init__(self, cfg: RuntimeConfig, is_main: bool):
        self.path = Path(cfg.output_dir)
        self.is_main = is_main
        self._fd: int | None = None
        started = (self.path / 'checkpoints' / 'latest').is_file() or (self.path / 'report.json').is_file()
        if started and cfg.resume is None and not cfg.overwrite:
            raise ConfigError(f'{self.path} already holds a run ({self._describe()}); continue it with '
                              f'runtime.resume=auto, replace it with runtime.overwrite=true, or choose another '
                              f'runtime.output_dir')
        if is_main:
            self._lock()
            if cfg.overwrite and cfg.resume is None:
                for name in RUN_FILES:
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()

    def _describe(self) -> str:
        try:
            report = json.loads((self.path / 'report.json').read_text())
            return 'finished' if report.get('finished') else 'unfinished'
        except (OSError, ValueError):
            return 'started, with checkpoints'

    def _lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / '.lock', os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
            os.close(fd)
            raise ConfigError(f'{self.path} is in use by a live run ({holder}); wait for it or choose another '
                              f'runtime.output_dir') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask the run to stop at the next optimizer-update boundary instead of killing it
    (a scheduler's preemption; SLURM's `--signal=USR1@120`); a second SIGINT interrupts at once. Use as a context
    manager; outside the main thread (where Python allows no handlers) it only reports no request."""
    NAMES = ('SIGTERM', 'SIGINT', 'SIGUSR1')

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == 'SIGINT' and self.requested == 'SIGINT':
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def create_accelerator(cfg: EvalRuntimeConfig) -> Accelerator:
    """One process per device under `accelerate launch`; bf16 on GPUs that have it (fp16 otherwise), fp32 on CPU.

    Gradient accumulation is done by the engines themselves (their window bookkeeping survives resume), so the
    Accelerator is built with one accumulation step.
    """
    cpu = cfg.cpu or not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == 'auto':
        if cpu:
            mp = 'no'
        else:
            mp = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    accelerator = Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=1,
                              step_scheduler_with_optimizer=False)
    if accelerator.device.type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ:
        # several CPU processes on one host: share the cores instead of oversubscribing them (OpenMP threads of
        # over-subscribed processes spin-wait; a 2-core host ran 30x slower with 2 processes x 2 threads)
        local = int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    return accelerator


def resolve_resume(cfg: RuntimeConfig) -> Path | None:
    """The checkpoint folder to resume from: `resume=auto` -> latest in output_dir (None if there is none yet);
    a path -> that folder (an error if it does not exist)."""
    if cfg.resume is None:
        return None
    if cfg.resume == 'auto':
        return latest_checkpoint(cfg.output_dir)
    path = Path(cfg.resume)
    if path.is_dir() and (path / 'checkpoints').is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f'runtime.resume={path}: that run has no checkpoint')
        return found
    if not path.is_dir():
        raise CheckpointError(f'runtime.resume={path}: no such checkpoint folder')
    return path


def gather_fn(accelerator: Accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Concatenate a tensor over processes (identity in a single process)."""
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.gather(t.contiguous())


def want_compile(setting: str, device: torch.device) -> bool:
    """torch.compile on 'on', or on 'auto' when running on a GPU (where it pays; on CPU compile time dominates)."""
    return setting == 'on' or (setting == 'auto' and device.type == 'cuda')


def run_provenance() -> dict:
    """Where a result came from: git commit (and whether the tree had changes), machine, library versions."""
    import platform
    import subprocess

    import timm

    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(['git', *args], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git('status', '--porcelain', '--untracked-files=no')
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        'git_commit': git('rev-parse', 'HEAD'), 'git_dirty': bool(status) if status is not None else None,
        'machine': {'hostname': platform.node(), 'platform': platform.platform(), 'cpu_count': os.cpu_count(),
                    'gpu': gpu, 'gpu_count': torch.cuda.device_count() if gpu else 0},
        'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__},
    }
