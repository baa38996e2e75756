"""The fast path (data and augmentation on the device, bf16) against the reference path (per-image loader
augmentation, full precision): same batches with augmentation off, same loss within bf16 tolerance; and the
benchmark tool's CPU mode."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

import deit_lt.models  # noqa: F401  (registers resnet32)
from conftest import REPO
from deit_lt.config import AugConfig, DataConfig
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_eval_batches, create_train_batches
from deit_lt.data.samplers import create_sampler
from deit_lt.models.teacher import TeacherAdapter
from deit_lt.losses import DistillationLoss

NO_AUG = dict(crop='none', hflip=0.0, rand_augment=None, re_prob=0.0, num_workers=0)


@pytest.fixture(scope='module')
def digits():
    return create_datasets(DataConfig(name='digits_lt', imb_factor=10))


def _batches(ds, placement, **aug):
    cfg = AugConfig(**{**NO_AUG, **aug})
    sampler = create_sampler('repeated_aug', ds.targets, seed=3)
    return create_train_batches(ds, cfg, img_size=8, batch_size=32, device='cpu', sampler=sampler, seed=3,
                                placement=placement)


def test_same_batches_without_augmentation(digits):
    fast = list(_batches(digits['train'], 'device').iter_epoch(2))
    ref = list(_batches(digits['train'], 'loader').iter_epoch(2))
    assert len(fast) == len(ref) > 0
    for a, b in zip(fast, ref):
        assert torch.equal(a.y, b.y)
        assert torch.allclose(a.x, b.x, atol=1e-6)


def test_augmented_batches_equal_across_paths_with_pad_crop(digits):
    # with augmentation on, both paths draw from the same family but from different random streams
    fast = next(_batches(digits['train'], 'device', crop='pad_crop', padding=1).iter_epoch(0))
    ref = next(_batches(digits['train'], 'loader', crop='pad_crop', padding=1).iter_epoch(0))
    assert torch.equal(fast.y, ref.y) and fast.x.shape == ref.x.shape
    assert not torch.equal(fast.x, ref.x)


def test_eval_batches_equal_across_paths(digits):
    cfg = AugConfig(num_workers=0)
    a = list(create_eval_batches(digits['test'], cfg, img_size=8, batch_size=64, device='cpu', placement='device'))
    b = list(create_eval_batches(digits['test'], cfg, img_size=8, batch_size=64, device='cpu', placement='loader'))
    assert all(torch.allclose(x1, x2, atol=1e-6) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_fast_and_reference_loss_agree_on_a_fixed_batch(digits):
    """bf16 autocast (fast path) vs full precision (reference) on the same batch: same loss within bf16 tolerance."""
    fast = next(_batches(digits['train'], 'device').iter_epoch(0))
    ref = next(_batches(digits['train'], 'loader').iter_epoch(0))
    torch.manual_seed(0)
    student = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1)
    student.set_distilled_training(True)
    student.train()
    teacher_net = timm.create_model('resnet32', num_classes=10, in_chans=1)
    teacher = TeacherAdapter(teacher_net, None, ((0.449,), (0.226,)))
    crit = DistillationLoss(digits['train'].train_counts, drw_epoch=0)
    crit.set_epoch(0)
    student.eval()   # no drop-path randomness: compare the arithmetic only
    with torch.autocast('cpu', dtype=torch.bfloat16):
        feats = student.forward_features(fast.x)
        z_cls, z_dist = student.head(feats[:, 0]), student.head_dist(feats[:, 1])
        loss_fast, _ = crit(z_cls, z_dist, fast.y, teacher(fast.x))
    feats = student.forward_features(ref.x)
    loss_ref, _ = crit(student.head(feats[:, 0]), student.head_dist(feats[:, 1]), ref.y, teacher(ref.x))
    assert loss_fast.dtype == torch.float32 and torch.isfinite(loss_fast)
    assert loss_fast.item() == pytest.approx(loss_ref.item(), rel=2e-2)


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / 'bench.json'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'benchmark.py'), '--cpu', '--model',
                        'deit_micro_distilled_patch2_8', '--ref-model', 'deit_micro_distilled_patch2_8',
                        '--img-size', '8', '--ref-img-size', '8', '--teacher-size', '8', '--batch', '8',
                        '--steps', '2', '--warmup', '1', '--workers', '0', '--json', str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res['results']) == {'fast', 'reference', 'ceiling'}
    for path in res['results'].values():
        assert path['images_per_s'] > 0 and path['step_ms'] > 0
    assert res['results']['fast']['placement'] == 'device' and res['results']['reference']['placement'] == 'loader'
    assert 'fast/reference' in res['ratios'] and 'fast/ceiling' in res['ratios']
    assert 'C10-LT schedule' in r.stdout
