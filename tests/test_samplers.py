"""Samplers: class frequencies match their definitions; sharding and epochs are deterministic."""
from __future__ import annotations

import numpy as np
import pytest

from deit_lt.data.samplers import class_probabilities, create_sampler

COUNTS = np.array([400, 200, 100, 50, 25, 10])
TARGETS = np.repeat(np.arange(6), COUNTS)   # N = 785


def _freq(name, epochs=40, **kw):
    s = create_sampler(name, TARGETS, seed=1, **kw)
    hist = np.zeros(6)
    for e in range(epochs):
        s.set_epoch(e)
        hist += np.bincount(TARGETS[list(s)], minlength=6)
    return hist / hist.sum(), len(s)


def test_instance_sampler_is_a_permutation():
    s = create_sampler('instance', TARGETS, seed=0)
    s.set_epoch(3)
    idx = list(s)
    assert sorted(idx) == list(range(len(TARGETS)))
    s.set_epoch(4)
    assert list(s) != idx


def test_class_balanced_frequencies_and_runs():
    f, n = _freq('class_balanced', samples_per_class=4)
    assert n == len(TARGETS)
    assert np.allclose(f, 1 / 6, atol=0.01)
    s = create_sampler('class_balanced', TARGETS, samples_per_class=4)
    labels = TARGETS[list(s)][:40].reshape(10, 4)
    assert (labels == labels[:, :1]).all()  # 4 consecutive images per class visit
    # each class's images are all used before any repeats (cyclic per class)
    idx = np.asarray(list(s))
    tail = idx[TARGETS[idx] == 5][:10]
    assert len(set(tail.tolist())) == 10


def test_sqrt_frequencies():
    f, _ = _freq('sqrt', epochs=60)
    expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
    assert np.allclose(f, expected, atol=0.01)
    assert np.allclose(class_probabilities(COUNTS, 0.5), expected)


def test_progressive_interpolates_instance_to_balanced():
    s = create_sampler('progressive', TARGETS, total_epochs=11, seed=0, num_samples=20000)
    for epoch, t in ((0, 0.0), (5, 0.5), (10, 1.0)):
        s.set_epoch(epoch)
        f = np.bincount(TARGETS[list(s)], minlength=6) / 20000
        expected = (1 - t) * COUNTS / COUNTS.sum() + t / 6
        assert np.allclose(f, expected, atol=0.012), (epoch, f, expected)
    with pytest.raises(ValueError, match='total_epochs'):
        create_sampler('progressive', TARGETS)


def test_repeated_aug_repeats_and_covers():
    s = create_sampler('repeated_aug', TARGETS, num_repeats=3, seed=0)
    s.set_epoch(0)
    idx = list(s)
    assert len(idx) == len(TARGETS)
    runs = np.asarray(idx[:30]).reshape(10, 3)
    assert (runs == runs[:, :1]).all()   # each image three times in a row (single process)


@pytest.mark.parametrize('name', ['instance', 'class_balanced', 'sqrt', 'progressive', 'repeated_aug'])
def test_ranks_partition_the_epoch_deterministically(name):
    world = 3
    shards = []
    for r in range(world):
        s = create_sampler(name, TARGETS, num_replicas=world, rank=r, seed=7, total_epochs=5)
        s.set_epoch(2)
        a = list(s)
        s.set_epoch(2)
        assert list(s) == a                       # same epoch -> same indices (resume)
        shards.append(a)
    assert len({len(a) for a in shards}) == 1     # equal shard sizes (DDP needs them)
    if name == 'instance':
        assert set(sum(shards, [])) == set(range(len(TARGETS)))   # together the ranks see every image


def test_unknown_sampler():
    with pytest.raises(ValueError, match='unknown sampler'):
        create_sampler('balanced', TARGETS)
