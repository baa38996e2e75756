"""Process-level plumbing shared by the tools: the Accelerator, resume lookup, gathering, provenance."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from .checkpoint import latest_checkpoint
from .config import EvalRuntimeConfig, RuntimeConfig
from .errors import CheckpointError

__all__ = ['create_accelerator', 'resolve_resume', 'gather_fn', 'want_compile', 'run_provenance']


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
