"""Extra augmented views of each image (two-view methods), Cutout, AutoAugment / rotation placement, on the real
digits data and on both placements."""
from __future__ import annotations

import pytest
import torch

from deit_lt.config import AugConfig, DataConfig
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import LoaderTrainBatches, create_train_batches
from deit_lt.data.samplers import create_sampler
from deit_lt.data.transforms import resolve_norm

BASE = dict(crop='pad_crop', padding=1, hflip=0.0, rand_augment=None, re_prob=0.0, num_workers=0, repeated_aug=1)


@pytest.fixture(scope='module')
def train():
    return create_datasets(DataConfig(name='digits_lt', imb_factor=10))['train']


def _batches(ds, placement, views=(), **aug):
    cfg = AugConfig(**{**BASE, **aug})
    return create_train_batches(ds, cfg, img_size=8, batch_size=16, device='cpu', seed=1, placement=placement,
                                sampler=create_sampler('instance', ds.targets, seed=1),
                                extra_views=[AugConfig(**{**BASE, **v}) for v in views])


@pytest.mark.parametrize('placement', ['device', 'loader'])
def test_extra_views_are_other_draws_of_the_same_images(train, placement):
    views = ({'crop': 'rrc', 'scale': (0.35, 1.0)}, {})
    a = next(_batches(train, placement, views).iter_epoch(3))
    b = next(_batches(train, placement, views).iter_epoch(3))
    assert len(a.views) == 2 and all(v.shape == a.x.shape for v in a.views)
    assert torch.equal(a.views[0], b.views[0]) and torch.equal(a.views[1], b.views[1])   # reproducible per step
    assert not torch.equal(a.views[1], a.x)        # same recipe as x, own random stream
    assert not torch.equal(a.views[0], a.views[1])
    without = next(_batches(train, placement).iter_epoch(3))
    assert torch.equal(without.x, a.x) and without.views == ()   # adding views does not change the first one


@pytest.mark.parametrize('placement', ['device', 'loader'])
def test_cutout_fills_one_square_with_the_normalised_zero(train, placement):
    x = next(_batches(train, placement, crop='none', cutout=4).iter_epoch(0)).x
    clean = next(_batches(train, placement, crop='none').iter_epoch(0)).x
    mean, std = resolve_norm(BASE.get('mean', AugConfig().mean), AugConfig().std, 1)
    zero = (0.0 - mean[0]) / std[0]
    changed = (x != clean)[:, 0]
    per_image = changed.flatten(1).sum(1)
    assert (per_image <= 16).all() and (per_image > 0).float().mean() > 0.5   # at most a 4x4 square, clipped
    assert torch.allclose(x[:, 0][changed], torch.full_like(x[:, 0][changed], zero))
    rows = changed.any(2).sum(1)
    assert (rows[per_image > 0] <= 4).all()


def test_autoaugment_and_rotation_run_in_the_loader(train):
    with pytest.warns(UserWarning, match='loader'):
        auto = _batches(train, None, auto_augment='svhn', rotate=15.0)
    assert isinstance(auto, LoaderTrainBatches)
    batch = next(auto.iter_epoch(0))
    assert batch.x.shape == (16, 1, 8, 8) and torch.isfinite(batch.x).all()
    with pytest.raises(ValueError, match='loader placement only'):
        _batches(train, 'device', auto_augment='cifar10')
