"""Samplers for long-tailed training, all distributed-aware and state-free.

Each sampler draws the *global* index list of an epoch from (seed, epoch) alone and hands rank r the slice
r::num_replicas, so any epoch can be regenerated exactly (resume) and every rank agrees on it. Strategies
(Kang et al., "Decoupling Representation and Classifier", ICLR 2020, Sec. 3; p_j = probability of class j):

- 'instance':        natural sampling, a permutation of the data (p_j = n_j / N).
- 'class_balanced':  p_j = 1 / C, realised like classifier-balancing's ClassAwareSampler: cycle through a shuffled
                     class list and emit `samples_per_class` consecutive images from each class's own shuffled
                     cycle (small classes repeat within an epoch).
- 'sqrt':            p_j proportional to sqrt(n_j), drawn with replacement.
- 'progressive':     p_j(t) = (1 - t/(T-1)) * n_j / N + t/(T-1) / C over epochs t = 0..T-1, drawn with
                     replacement (class first, then the class's next image).
- 'repeated_aug':    DeiT's repeated augmentation (timm `RepeatAugSampler`): each image of a permutation repeated
                     `num_repeats` times consecutively, ~N samples per epoch.

An epoch of the re-balancing samplers has `num_samples` draws (default N, as in the original code, which stops every
sampler after floor(N / batch) iterations).
"""
from __future__ import annotations

import abc
import math
from typing import Iterator, Sequence

import numpy as np
import torch.utils.data
from timm.data.distributed_sampler import RepeatAugSampler

__all__ = ['LTSampler', 'InstanceSampler', 'ClassBalancedSampler', 'PowerSampler', 'ProgressiveSampler',
           'RepeatedAugSampler', 'create_sampler', 'SAMPLER_NAMES', 'class_probabilities']

SAMPLER_NAMES = ('instance', 'class_balanced', 'sqrt', 'progressive', 'repeated_aug')


def class_probabilities(counts: Sequence[int], q: float) -> np.ndarray:
    """p_j = n_j^q / sum_i n_i^q (q=1 instance, q=1/2 square-root, q=0 class-balanced)."""
    counts = np.asarray(counts, np.float64)
    w = np.where(counts > 0, counts ** q, 0.0)
    return w / w.sum()


class LTSampler(torch.utils.data.Sampler[int], abc.ABC):
    """Base: subclasses implement `_global_indices(rng)`; this class shards and seeds."""

    def __init__(self, targets: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 num_samples: int | None = None):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} outside 0..{num_replicas - 1}')
        self.targets = np.asarray(targets, np.int64)
        if len(self.targets) == 0:
            raise ValueError('cannot sample from an empty dataset')
        self.num_classes = int(self.targets.max()) + 1
        self.counts = np.bincount(self.targets, minlength=self.num_classes)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.total = num_samples if num_samples is not None else len(self.targets)
        self.num_samples = math.ceil(self.total / num_replicas)   # per rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 0x5A17])

    @abc.abstractmethod
    def _global_indices(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's global index sequence (at least `self.total` long, or shorter to be wrapped)."""

    def global_indices(self) -> np.ndarray:
        """All ranks' indices of the current epoch, padded (by wrapping) to num_samples * num_replicas."""
        idx = self._global_indices(self._rng())[:self.total]
        need = self.num_samples * self.num_replicas
        if len(idx) < need:
            idx = np.concatenate([idx, idx[:need - len(idx)]])
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class InstanceSampler(LTSampler):
    """A fresh permutation every epoch (instance-balanced sampling)."""

    def _global_indices(self, rng):
        n = len(self.targets)
        reps = math.ceil(self.total / n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])


class ClassBalancedSampler(LTSampler):
    """Class-aware sampling: every class equally likely, `samples_per_class` consecutive images per visit."""

    def __init__(self, targets, samples_per_class: int = 4, **kwargs):
        super().__init__(targets, **kwargs)
        self.samples_per_class = samples_per_class

    def _global_indices(self, rng):
        by_class = [np.flatnonzero(self.targets == c) for c in range(self.num_classes)]
        classes = [c for c in range(self.num_classes) if len(by_class[c])]
        pos = [0] * self.num_classes
        cycles = [rng.permutation(ix) for ix in by_class]
        order: list[int] = []
        out = []
        while len(out) < self.total:
            if not order:
                order = list(rng.permutation(classes))
            c = order.pop()
            for _ in range(self.samples_per_class):
                if pos[c] == len(cycles[c]):      # this class's cycle is used up: reshuffle it
                    cycles[c], pos[c] = rng.permutation(by_class[c]), 0
                out.append(cycles[c][pos[c]])
                pos[c] += 1
        return np.asarray(out[:self.total], np.int64)


class PowerSampler(LTSampler):
    """Class j drawn with probability n_j^q / sum n^q (with replacement), then a uniform image of that class.

    q = 1/2 is Kang et al.'s square-root sampling.
    """

    def __init__(self, targets, q: float = 0.5, **kwargs):
        super().__init__(targets, **kwargs)
        self.q = q

    def class_probs(self) -> np.ndarray:
        return class_probabilities(self.counts, self.q)

    def _global_indices(self, rng):
        # per-sample weight p_j / n_j gives class mass p_j
        w = self.class_probs()[self.targets] / self.counts[self.targets]
        return rng.choice(len(self.targets), size=self.total, replace=True, p=w / w.sum())


class ProgressiveSampler(LTSampler):
    """Progressively-balanced sampling: instance-balanced at epoch 0, class-balanced at the last epoch."""

    def __init__(self, targets, total_epochs: int, **kwargs):
        super().__init__(targets, **kwargs)
        if total_epochs is None or total_epochs < 1:
            raise ValueError('progressive sampling needs total_epochs >= 1')
        self.total_epochs = total_epochs

    def class_probs(self) -> np.ndarray:
        t = min(self.epoch, self.total_epochs - 1) / max(self.total_epochs - 1, 1)
        present = self.counts > 0
        return (1 - t) * self.counts / self.counts.sum() + t * present / present.sum()

    def _global_indices(self, rng):
        by_class = [rng.permutation(np.flatnonzero(self.targets == c)) for c in range(self.num_classes)]
        draws = rng.choice(self.num_classes, size=self.total, p=self.class_probs())
        pos = np.zeros(self.num_classes, np.int64)
        out = np.empty(self.total, np.int64)
        for i, c in enumerate(draws):   # next image of the class's cycle
            out[i] = by_class[c][pos[c] % len(by_class[c])]
            pos[c] += 1
        return out


class RepeatedAugSampler(LTSampler):
    """DeiT repeated augmentation through timm's `RepeatAugSampler` (already rank-aware).

    timm's sampler seeds its permutation with the epoch alone (as DeiT's RASampler does) and keeps
    floor(N / 256) * 256 samples per epoch; for small datasets (N < 2048) the rounding is turned off so an epoch
    still covers about N samples.
    """

    def __init__(self, targets, num_repeats: int = 3, **kwargs):
        super().__init__(targets, **kwargs)
        n = len(self.targets)
        self._inner = RepeatAugSampler(range(n), num_replicas=self.num_replicas, rank=self.rank, shuffle=True,
                                       num_repeats=num_repeats, selected_round=256 if n >= 2048 else 0)
        self.num_samples = len(self._inner)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self._inner)

    def _global_indices(self, rng):
        raise TypeError('RepeatedAugSampler is sharded by timm; iterate it per rank')

    def global_indices(self) -> np.ndarray:
        raise TypeError('RepeatedAugSampler is sharded by timm; iterate it per rank')


def create_sampler(name: str, targets: Sequence[int], *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                   num_samples: int | None = None, samples_per_class: int = 4, num_repeats: int = 3,
                   total_epochs: int | None = None) -> LTSampler:
    """Build a sampler by name (`SAMPLER_NAMES`)."""
    common = dict(num_replicas=num_replicas, rank=rank, seed=seed, num_samples=num_samples)
    if name == 'instance':
        return InstanceSampler(targets, **common)
    if name == 'class_balanced':
        return ClassBalancedSampler(targets, samples_per_class=samples_per_class, **common)
    if name == 'sqrt':
        return PowerSampler(targets, q=0.5, **common)
    if name == 'progressive':
        return ProgressiveSampler(targets, total_epochs=total_epochs, **common)
    if name == 'repeated_aug':
        if num_repeats <= 1:
            return InstanceSampler(targets, **common)
        return RepeatedAugSampler(targets, num_repeats=num_repeats, **common)
    raise ValueError(f'unknown sampler {name!r}; choose one of {", ".join(SAMPLER_NAMES)}')
