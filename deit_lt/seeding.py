"""Deterministic random streams for exact resume.

accelerate saves RNG states, but a new data iterator still draws seeds, so a resumed run would drift. Instead,
every random stream of a training step (the augmentation generator, Mixup's NumPy draws, drop-path's torch draws,
Python's `random`) is seeded from (seed, epoch, step, rank) before the step runs: any step of any epoch can be
regenerated, and a run resumed at an optimizer-step boundary replays exactly what an uninterrupted run does.
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ['step_seed', 'seed_step']


def step_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (seed, epoch, step, rank, ...), well mixed by SeedSequence."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def seed_step(*keys: int) -> None:
    """Reseed Python, NumPy and torch (all devices) from `keys`, e.g. (seed, epoch, step, rank)."""
    s = step_seed(*keys)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.manual_seed(s)
