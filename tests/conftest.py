"""Shared test fixtures: where the real data lives, a private cache, W&B off by default."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread in every test process and in every process a test starts: the suite runs its files on 2 workers
# (README: pytest -n 2) on 2 cores, the models are tiny, and on busy cores OpenMP threads spin-wait (16 joint epochs
# took 13 s on one thread, 180 s on two under load). OMP_NUM_THREADS also keeps create_accelerator from resetting it.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get('DEIT_LT_DATA', REPO.parent / 'shared' / 'data'))
CIFAR10_PACK = DATA_DIR / 'cifar10_jpeg.npz'
CIFAR100_LABELS = DATA_DIR / 'cifar100_labels.npz'


def two_cpu_processes() -> list[str]:
    """`accelerate launch` of 2 gloo processes on the CPU (run with ACCELERATE_USE_CPU=1), on a free port: test
    files run in parallel (pytest -n), and two launches on accelerate's default port 29500 would meet."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
            '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
            '--main_process_port', str(port)]


needs_cifar10 = pytest.mark.skipif(not CIFAR10_PACK.is_file(), reason=f'real CIFAR-10 pack not found at {CIFAR10_PACK}')
needs_cifar100_labels = pytest.mark.skipif(not CIFAR100_LABELS.is_file(),
                                           reason=f'CIFAR-100 labels not found at {CIFAR100_LABELS}')


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv('WANDB_MODE', 'disabled')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    cache = os.environ.get('DEIT_LT_TEST_CACHE') or str(tmp_path_factory.getbasetemp() / 'deit_lt_cache')
    monkeypatch.setenv('DEIT_LT_CACHE', cache)
    yield
