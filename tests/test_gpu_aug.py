"""Tests for deit_lt.data.gpu_aug: the batched device augmentation against timm's PIL reference.

Every random draw is compared with timm's own sampler (crop boxes, RandAugment op choice / application /
magnitudes, random erasing) through two-sample statistical tests with fixed seeds, and every pixel op with the
PIL op timm calls, on real images: CIFAR-10 test images when the data folder of env DEIT_LT_DATA holds them, and
always on images built from scikit-learn's bundled handwritten digits.
"""
from __future__ import annotations

import io
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from scipy import stats

import timm.data.auto_augment as timm_aa
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from deit_lt.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig
from deit_lt.data import gpu_aug
from deit_lt.data.gpu_aug import (BatchedRandAugment, DeviceAugment, DeviceEvalTransform, apply_erasing, apply_ops,
                                  level_to_arg, resample, resize_weights, sample_erasing, sample_rrc_boxes)

DATA_DIR = Path(os.environ.get('DEIT_LT_DATA', Path(__file__).resolve().parents[1].parent / 'shared' / 'data'))
CIFAR = DATA_DIR / 'cifar10_jpeg.npz'
needs_cifar = pytest.mark.skipif(not CIFAR.exists(), reason=f'{CIFAR} not found (set DEIT_LT_DATA)')
SOURCES = [pytest.param('cifar', marks=needs_cifar), 'digits']
P_MIN = 1e-3        # two-sample tests: fixed seeds, so a pass is reproducible; 1e-3 keeps false alarms rare
IMG_MEAN_FILL = tuple(min(255, round(255 * v)) for v in IMAGENET_MEAN)   # timm create_transform's img_mean


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)      # other test runs share the 2 cores
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

_CACHE: dict = {}


def _cifar(n: int = 256) -> np.ndarray:
    """First `n` CIFAR-10 test images, (n, 32, 32, 3) uint8, decoded with PIL as the data README says."""
    if 'cifar' not in _CACHE:
        z = np.load(CIFAR)
        jpeg, off = z['test_jpeg'], z['test_offsets']
        _CACHE['cifar'] = np.stack([
            np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert('RGB')) for i in range(512)])
    return _CACHE['cifar'][:n]


def _digits_rgb(n: int = 256) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images from sklearn's real 8x8 digits: three digits as R, G, B, upscaled by PIL."""
    if 'digits' not in _CACHE:
        from sklearn.datasets import load_digits
        d = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
        big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in d[:3 * 512]])
        _CACHE['digits'] = np.stack([big[0::3], big[1::3], big[2::3]], axis=-1)[:512]
    return _CACHE['digits'][:n]


def _images(source: str, n: int = 256) -> np.ndarray:
    return _cifar(n) if source == 'cifar' else _digits_rgb(n)


def _to_batch(arr: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 array -> (N, C, H, W) uint8 tensor."""
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def _pil_to_batch(images) -> torch.Tensor:
    return _to_batch(np.stack([np.asarray(im) for im in images])).float()


def _cfg(**kw) -> AugConfig:
    """A config with everything off unless given."""
    base = dict(crop='none', hflip=0.0, rand_augment=None, color_jitter=None, re_prob=0.0)
    base.update(kw)
    return AugConfig(**base)


# --------------------------------------------------------------------------------------------------------------
# Crops and resizing
# --------------------------------------------------------------------------------------------------------------

class _CountingRandom:
    """Stands in for the `random` module inside timm.data.transforms and counts successful crop attempts."""

    def __init__(self):
        self.randint_calls = 0

    def uniform(self, a, b):
        return random.uniform(a, b)

    def randint(self, a, b):
        self.randint_calls += 1      # get_params calls randint only when an attempt fits (not in the fallback)
        return random.randint(a, b)

    def choice(self, seq):
        return random.choice(seq)


@pytest.mark.parametrize('height,width,scale,ratio', [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),      # the DeiT recipe on CIFAR
    (16, 48, (0.6, 1.0), (0.5, 2.0)),           # wide image, frequent fallback (clamped to the max ratio)
    (48, 16, (0.6, 1.0), (0.5, 2.0)),           # tall image, fallback clamped to the min ratio
])
def test_rrc_boxes_match_timm_get_params(monkeypatch, height, width, scale, ratio):
    n = 20000
    counter = _CountingRandom()
    monkeypatch.setattr('timm.data.transforms.random', counter)
    random.seed(0)
    img = Image.new('RGB', (width, height))
    ref = np.array([RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n)], dtype=float)
    ref_fallback = 1.0 - counter.randint_calls / (2 * n)
    boxes, fallback = sample_rrc_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(0))
    mine = boxes.double().numpy()

    for name, f in [('area', lambda b: b[:, 2] * b[:, 3] / (height * width)),
                    ('log aspect', lambda b: np.log(b[:, 3] / b[:, 2])),
                    ('top', lambda b: b[:, 0] / np.maximum(height - b[:, 2], 1)),
                    ('left', lambda b: b[:, 1] / np.maximum(width - b[:, 3], 1))]:
        p = stats.ks_2samp(f(mine), f(ref)).pvalue
        assert p > P_MIN, f'{name}: KS p={p:.2g}'
    rate = fallback.double().mean().item()
    se = math.sqrt(max(ref_fallback * (1 - ref_fallback), 1e-4) * 2 / n)
    assert abs(rate - ref_fallback) < 4 * se + 1e-4, (rate, ref_fallback)
    assert (mine[:, 2] <= height).all() and (mine[:, 3] <= width).all()
    assert (mine[:, 0] + mine[:, 2] <= height).all() and (mine[:, 1] + mine[:, 3] <= width).all()
    if height != width:
        assert rate > 0.05, 'this setting is meant to exercise the fallback'
        fb = mine[fallback.numpy()]
        expect_aspect = max(ratio) if width > height else min(ratio)
        assert np.allclose(fb[:, 3] / fb[:, 2], expect_aspect, rtol=0.05)


@pytest.mark.parametrize('source', SOURCES)
@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('out_size', [224, 32, 20])   # upscaling (paper: 32 -> 224), same size, antialiased down
def test_crop_resize_matches_pil(source, interpolation, out_size):
    n = 12 if out_size == 224 else 96
    arr = _images(source, n)
    boxes, _ = sample_rrc_boxes(n, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    mode = InterpolationMode.BICUBIC if interpolation == 'bicubic' else InterpolationMode.BILINEAR
    ref = _pil_to_batch([TF.resized_crop(Image.fromarray(a), *map(int, b), [out_size, out_size], mode)
                         for a, b in zip(arr, boxes)])
    top, left, h, w = boxes.unbind(1)
    mine = resample(_to_batch(arr).float(), resize_weights(out_size, 32, top, h, interpolation),
                    resize_weights(out_size, 32, left, w, interpolation))
    # Fixed-point coefficients + float64 sums reproduce Pillow's integer arithmetic: allow 1 level on 1e-4.
    diff = (mine - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-4, (diff.max(), (diff > 0).float().mean())


@pytest.mark.parametrize('source', SOURCES)
def test_device_augment_crop_flip_matches_pil_per_sample(source):
    """The whole crop stage of DeviceAugment (boxes + flips it drew itself) against PIL with the same boxes."""
    arr = _images(source, 64)
    aug = DeviceAugment(_cfg(crop='rrc', hflip=0.5), img_size=48)
    params = aug.sample_params(64, (32, 32), 'cpu', torch.Generator().manual_seed(3))
    out = aug.apply(_to_batch(arr), params)
    ref = []
    for a, b, f in zip(arr, params['crop'], params['flip']):
        im = TF.resized_crop(Image.fromarray(a), *map(int, b), [48, 48], InterpolationMode.BICUBIC)
        ref.append(TF.hflip(im) if f else im)
    ref = TF.normalize(_pil_to_batch(ref) / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    assert 20 <= int(params['flip'].sum()) <= 44
    assert (out - ref).abs().max() <= 1.01 / 255 / min(IMAGENET_STD)


def test_pad_crop_and_flip_match_reference():
    arr = _digits_rgb(200)
    aug = DeviceAugment(_cfg(crop='pad_crop', padding=4, hflip=0.5), img_size=32)
    params = aug.sample_params(200, (32, 32), 'cpu', torch.Generator().manual_seed(4))
    out = aug.apply(_to_batch(arr), params)
    padded = np.pad(arr, ((0, 0), (4, 4), (4, 4), (0, 0)))      # torchvision RandomCrop(32, padding=4): zeros
    ref = []
    for p, (t, l, _, _), f in zip(padded, params['crop'].tolist(), params['flip'].tolist()):
        crop = p[t:t + 32, l:l + 32]
        ref.append(crop[:, ::-1] if f else crop)
    ref = TF.normalize(_to_batch(np.stack(ref)).float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(out, ref, atol=1e-5)
    offsets = params['crop'][:, :2].flatten().numpy()
    assert offsets.min() >= 0 and offsets.max() <= 8
    assert stats.chisquare(np.bincount(offsets, minlength=9)).pvalue > P_MIN    # uniform over 0..2*padding


def test_flip_rate():
    aug = DeviceAugment(_cfg(hflip=0.3), img_size=8)
    flips = aug.sample_params(20000, (8, 8), 'cpu', torch.Generator().manual_seed(5))['flip']
    assert abs(flips.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)


def test_pad_crop_needs_output_size():
    aug = DeviceAugment(_cfg(crop='pad_crop'), img_size=32)
    with pytest.raises(ValueError, match='pad_crop'):
        aug(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------------------
# RandAugment: parameters
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(gpu_aug.SUPPORTED_OPS))
def test_level_to_arg_matches_timm(monkeypatch, name):
    hparams = dict(translate_const=100, translate_pct=0.45)
    mags = np.concatenate([np.arange(0, 10.5, 0.5), np.random.default_rng(0).uniform(0, 10, 200)])
    for sign in (1.0, -1.0):
        monkeypatch.setattr(timm_aa, '_randomly_negate', (lambda v: v) if sign > 0 else (lambda v: -v))
        fn = timm_aa.LEVEL_TO_ARG[name]
        ref = [fn(float(m), hparams)[0] if fn is not None else 0.0 for m in mags]
        if name == 'Desaturate':   # timm's desaturate() turns the level into the Color factor
            ref = [min(1.0, max(0.0, 1.0 - r)) for r in ref]
        m = torch.tensor(mags, dtype=torch.float64)
        mine = level_to_arg(name, m, torch.full_like(m, sign), 100, 0.45)
        assert mine.tolist() == [float(r) for r in ref], name


class _Choice:
    """Wraps a timm AugmentOp to log which op RandAugment chose; the op's own functions log the rest."""

    def __init__(self, op, log):
        self.op, self.log = op, log

    def __call__(self, img):
        self.log.append(dict(name=self.op.name, applied=False, magnitude=None, arg=None))
        return self.op(img)


def _instrumented_timm(spec: str, img_size: int, n: int, seed: int):
    """Run timm's RandAugment on `n` tiny images and log op choice, application, magnitude and argument."""
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=IMG_MEAN_FILL, interpolation=Image.BICUBIC)
    ra = timm_aa.rand_augment_transform(spec, hparams)
    log: list = []

    def spy_aug(fn, img, *args, **kwargs):
        log[-1].update(applied=True, arg=args[0] if args else 0.0)
        return fn(img, *args, **kwargs)

    def spy_level(fn, magnitude, hp):
        log[-1]['magnitude'] = magnitude
        return fn(magnitude, hp)

    for op in ra.ops:
        fn, lvl = op.aug_fn, op.level_fn
        op.aug_fn = lambda img, *a, _fn=fn, **k: spy_aug(_fn, img, *a, **k)
        if lvl is not None:
            op.level_fn = lambda m, hp, _lvl=lvl: spy_level(_lvl, m, hp)
    ra.ops = [_Choice(op, log) for op in ra.ops]
    random.seed(seed)
    np.random.seed(seed)
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for _ in range(n):
        ra(img)
    names = [op.op.name for op in ra.ops]
    layers = ra.num_layers
    op = np.array([names.index(r['name']) for r in log]).reshape(n, layers).T
    applied = np.array([r['applied'] for r in log]).reshape(n, layers).T
    mag = np.array([np.nan if r['magnitude'] is None else r['magnitude'] for r in log]).reshape(n, layers).T
    arg = np.array([np.nan if r['arg'] is None else float(r['arg']) for r in log]).reshape(n, layers).T
    return names, dict(op=op, applied=applied, magnitude=mag, arg=arg)


def _chi2_same(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """p-value that two samples of category ids in [0, k) come from one distribution (sparse cells pooled)."""
    ca, cb = np.bincount(a, minlength=k), np.bincount(b, minlength=k)
    keep = (ca + cb) >= 20
    table = np.stack([np.append(ca[keep], ca[~keep].sum()), np.append(cb[keep], cb[~keep].sum())])
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table).pvalue


@pytest.mark.parametrize('spec', ['rand-m9-mstd0.5-inc1', 'rand-m7-n3-mstd101', 'rand-m12-mstd2-mmax15-inc1',
                                  'rand-m9-mstd0'])
def test_rand_augment_sampling_matches_timm(spec):
    n = 4000
    names, ref = _instrumented_timm(spec, 32, n, seed=0)
    ra = BatchedRandAugment(spec, 32, IMAGENET_MEAN)
    assert ra.op_names == names
    mine = {k: v.numpy() for k, v in ra.sample(n, torch.Generator().manual_seed(0)).items()}
    k = len(names)

    # op choice: uniform with replacement, independent across layers
    assert _chi2_same(mine['op'].ravel(), ref['op'].ravel(), k) > P_MIN
    for layer in range(ra.num_layers):
        assert _chi2_same(mine['op'][layer], ref['op'][layer], k) > P_MIN
    # application: per-op rate (prob 0.5)
    table = np.stack([np.bincount(mine['op'][mine['applied']], minlength=k),
                      np.bincount(ref['op'][ref['applied']], minlength=k)])
    assert stats.chi2_contingency(table).pvalue > P_MIN
    rate_mine, rate_ref = mine['applied'].mean(), ref['applied'].mean()
    assert abs(rate_mine - rate_ref) < 4 * math.sqrt(0.25 * 2 / mine['applied'].size)
    assert abs(rate_mine - 0.5) < 4 * math.sqrt(0.25 / mine['applied'].size)

    # magnitude (noise, clipping) over all applied ops that take a level, then the op argument per op
    has_level = np.array([timm_aa.LEVEL_TO_ARG[nm] is not None for nm in names])
    sel_m = mine['applied'] & has_level[mine['op']]
    sel_r = ref['applied'] & has_level[ref['op']]
    m_mine, m_ref = mine['magnitude'][sel_m], ref['magnitude'][sel_r]
    if np.ptp(m_ref) == 0:
        assert np.all(m_mine == m_ref[0])
    else:
        assert stats.ks_2samp(m_mine, m_ref).pvalue > P_MIN
    assert m_mine.min() >= 0 and m_mine.max() <= ra.magnitude_max[0]

    # random sign of rotate / shear / translate (arg < 0) and of the 'Increasing' enhance ops (factor < 1)
    def negative_rate(s):
        neg, used = [], []
        for i, nm in enumerate(names):
            centre = 1.0 if nm.endswith('Increasing') and not nm.startswith(('Posterize', 'Solarize')) else 0.0
            if nm in gpu_aug.GEOMETRIC_OPS or centre == 1.0:
                a = s['arg'][s['applied'] & (s['op'] == i)]
                a = a[a != centre]
                neg.append((a < centre).sum())
                used.append(a.size)
        return sum(neg) / sum(used), sum(used)

    (neg_mine, n_mine), (neg_ref, _) = negative_rate(mine), negative_rate(ref)
    assert abs(neg_mine - 0.5) < 4 * math.sqrt(0.25 / n_mine) and abs(neg_mine - neg_ref) < 4 * math.sqrt(0.5 / n_mine)
    for i, nm in enumerate(names):
        if not has_level[i]:
            continue
        a_mine = mine['arg'][mine['applied'] & (mine['op'] == i)]
        a_ref = ref['arg'][ref['applied'] & (ref['op'] == i)]
        if np.ptp(np.concatenate([a_mine, a_ref])) == 0:
            assert a_mine[0] == a_ref[0], nm
        else:
            assert stats.ks_2samp(a_mine, a_ref).pvalue > P_MIN / k, nm


def test_weighted_rand_augment_matches_timm():
    """'tweights': weighted choice without replacement (numpy's sequential draws) vs our Gumbel-top-k."""
    spec, n = 'rand-m9-mstd0.5-tweights', 6000
    names, ref = _instrumented_timm(spec, 32, n, seed=1)
    ra = BatchedRandAugment(spec, 32, IMAGENET_MEAN)
    assert ra.op_names == names and ra.choice_weights is not None
    op = ra.sample(n, torch.Generator().manual_seed(1))['op'].numpy()
    assert (op[0] != op[1]).all() and (ref['op'][0] != ref['op'][1]).all()
    for layer in range(2):
        assert _chi2_same(op[layer], ref['op'][layer], len(names)) > P_MIN
    w = np.array(ra.choice_weights)
    assert np.allclose(np.bincount(op[0], minlength=len(w)) / n, w, atol=4 * math.sqrt(0.25 / n))


# --------------------------------------------------------------------------------------------------------------
# RandAugment: pixels, op by op, against timm's PIL functions
# --------------------------------------------------------------------------------------------------------------

_EXACT_OPS = sorted(gpu_aug.SUPPORTED_OPS - gpu_aug.GEOMETRIC_OPS)
_GEOMETRIC_OPS = sorted(gpu_aug.GEOMETRIC_OPS)


def _timm_op_output(name, magnitude, sign, pil_images, interpolation, monkeypatch):
    hparams = dict(translate_const=int(32 * 0.45), img_mean=IMG_MEAN_FILL,
                   interpolation=Image.BICUBIC if interpolation == 'bicubic' else Image.BILINEAR)
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    monkeypatch.setattr(timm_aa, '_randomly_negate', (lambda v: v) if sign > 0 else (lambda v: -v))
    args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
    return _pil_to_batch([op.aug_fn(im, *args, **op.kwargs) for im in pil_images])


def _my_op_output(name, magnitude, sign, x, interpolation, precise=True):
    n = x.shape[0]
    arg = level_to_arg(name, torch.full((n,), float(magnitude), dtype=torch.float64),
                       torch.full((n,), float(sign), dtype=torch.float64), int(32 * 0.45), 0.45)
    return apply_ops(x, [name], torch.zeros(n, dtype=torch.long), arg, torch.tensor(IMG_MEAN_FILL, dtype=torch.float32),
                     interpolation, precise)


@pytest.mark.parametrize('source', SOURCES)
@pytest.mark.parametrize('name', _EXACT_OPS)
def test_point_and_enhance_ops_equal_pil(monkeypatch, source, name):
    """LUT and ImageEnhance ops use PIL's integer / float32 formulas: outputs must be identical."""
    arr = _images(source, 64)
    pil = [Image.fromarray(a) for a in arr]
    x = _to_batch(arr).float()
    for magnitude, sign in [(9.0, 1), (3.3, -1), (10.0, -1), (0.0, 1)]:
        ref = _timm_op_output(name, magnitude, sign, pil, 'bicubic', monkeypatch)
        mine = _my_op_output(name, magnitude, sign, x, 'bicubic')
        assert torch.equal(mine, ref), f'{name} m={magnitude} sign={sign}: {(mine != ref).float().mean():.2e} differ'


@pytest.mark.parametrize('source', SOURCES)
@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('name', _GEOMETRIC_OPS)
def test_geometric_ops_match_pil(monkeypatch, source, interpolation, name):
    """Geometric ops: float64 (precise) reproduces Pillow's double maths; float32 may put boundary cases one level
    lower (values landing exactly on an integer before truncation), so its bound is looser."""
    arr = _images(source, 64)
    pil = [Image.fromarray(a) for a in arr]
    x = _to_batch(arr).float()
    for magnitude, sign in [(9.0, 1), (6.5, -1)]:
        ref = _timm_op_output(name, magnitude, sign, pil, interpolation, monkeypatch)
        for precise, max_frac in [(True, 1e-4), (False, 0.08)]:
            d = (_my_op_output(name, magnitude, sign, x, interpolation, precise) - ref).abs()
            frac = (d > 0).float().mean().item()
            assert d.max() <= 1 and frac <= max_frac, f'{name} m={magnitude} {sign} precise={precise}: {frac:.2e}'


def test_ops_on_grey_images_match_pil_l_mode(monkeypatch):
    """1-channel images: every non-geometric op against PIL on 'L' images (Color is the identity there)."""
    from sklearn.datasets import load_digits
    d = np.round(load_digits().images[:128] * (255.0 / 16.0)).astype(np.uint8)
    arr = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BICUBIC)) for im in d])
    pil = [Image.fromarray(a) for a in arr]
    x = _to_batch(arr).float()
    for name in _EXACT_OPS:
        ref = _timm_op_output(name, 8.0, -1, pil, 'bicubic', monkeypatch)
        assert torch.equal(_my_op_output(name, 8.0, -1, x, 'bicubic'), ref), name


@pytest.mark.parametrize('source', SOURCES)
def test_rand_augment_apply_matches_pil_per_sample(monkeypatch, source):
    """Two sampled layers per image (all ops mixed in one batch) against timm's ops called with the same draws."""
    arr = _images(source, 96)
    ra = BatchedRandAugment('rand-m9-mstd0.5-inc1', 32, IMAGENET_MEAN)
    params = ra.sample(96, torch.Generator().manual_seed(7))
    mine = ra.apply(_to_batch(arr).float(), params)
    hparams = dict(translate_const=14, img_mean=IMG_MEAN_FILL, interpolation=Image.BICUBIC)
    ops = {name: timm_aa.AugmentOp(name, 1.0, 9, hparams) for name in ra.op_names}
    out = []
    for i, a in enumerate(arr):
        im = Image.fromarray(a)
        for layer in range(ra.num_layers):
            if not params['applied'][layer, i]:
                continue
            op = ops[ra.op_names[params['op'][layer, i]]]
            arg = params['arg'][layer, i].item()
            args = () if op.level_fn is None else (int(arg) if 'Posterize' in op.name or 'Solarize' in op.name
                                                   else arg,)
            im = op.aug_fn(im, *args, **op.kwargs)
        out.append(im)
    d = (mine - _pil_to_batch(out)).abs()
    assert d.max() <= 1 and (d > 0).float().mean() <= 1e-4


# --------------------------------------------------------------------------------------------------------------
# Colour jitter (used when RandAugment is off)
# --------------------------------------------------------------------------------------------------------------

def test_color_jitter_matches_image_enhance():
    arr = _digits_rgb(64)
    aug = DeviceAugment(_cfg(color_jitter=0.4), img_size=32)
    params = aug.sample_params(64, (32, 32), 'cpu', torch.Generator().manual_seed(8))
    out = aug.apply(_to_batch(arr), params)
    order, factor = params['cj_order'].numpy(), params['cj_factor'].numpy()
    assert (np.sort(order, axis=0) == np.arange(3)[:, None]).all()
    assert factor.min() >= 0.6 and factor.max() <= 1.4
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]   # torchvision on PIL
    ref = []
    for i, a in enumerate(arr):
        im = Image.fromarray(a)
        for pos in range(3):
            k = order[pos, i]
            im = enhancers[k](im).enhance(float(factor[k, i]))
        ref.append(im)
    ref = TF.normalize(_pil_to_batch(ref) / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(out, ref, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Random erasing
# --------------------------------------------------------------------------------------------------------------

def _erased_stats(masks: torch.Tensor):
    """masks: (N, H, W) bool. Returns erased flag, erased area fraction and bounding-box log aspect per image."""
    erased = masks.flatten(1).any(1)
    area = masks.flatten(1).double().mean(1)
    rows, cols = masks.any(2).double().sum(1), masks.any(1).double().sum(1)
    return erased.numpy(), area.numpy(), torch.log(rows.clamp(min=1) / cols.clamp(min=1)).numpy()


@pytest.mark.parametrize('count', [1, 3])
def test_random_erasing_matches_timm(count):
    n, size = 4000, 32
    random.seed(0)
    torch.manual_seed(0)
    ref = RandomErasing(0.25, mode='const', max_count=count, device='cpu')(torch.ones(n, 3, size, size))
    ref_masks = ref[:, 0] == 0
    params = sample_erasing(n, 3, size, size, 0.25, 'const', count, torch.Generator().manual_seed(0))
    mine = apply_erasing(torch.ones(n, 3, size, size), params)
    my_masks = mine[:, 0] == 0
    assert torch.equal(my_masks, (mine == 0).all(1))       # every channel erased together

    e_ref, a_ref, r_ref = _erased_stats(ref_masks)
    e_mine, a_mine, r_mine = _erased_stats(my_masks)
    assert abs(e_mine.mean() - e_ref.mean()) < 4 * math.sqrt(0.25 * 0.75 * 2 / n)
    assert abs(e_mine.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert stats.ks_2samp(a_mine[e_mine], a_ref[e_ref]).pvalue > P_MIN
    if count == 1:  # one box: its aspect is the bounding box's
        assert stats.ks_2samp(r_mine[e_mine], r_ref[e_ref]).pvalue > P_MIN
        assert a_mine[e_mine].min() >= 0.015 and a_mine[e_mine].max() <= 1 / 3 + 0.02


def test_random_erasing_fill_modes():
    n, size = 400, 32
    x = torch.full((n, 3, size, size), 7.0)
    p = sample_erasing(n, 3, size, size, 1.0, 'pixel', 1, torch.Generator().manual_seed(1))
    noise = apply_erasing(x, p)
    vals = noise[noise != 7.0]
    assert p['active'].all() and abs(vals.mean().item()) < 0.02 and abs(vals.std().item() - 1) < 0.02
    p = sample_erasing(n, 3, size, size, 1.0, 'rand', 1, torch.Generator().manual_seed(2))
    out = apply_erasing(x, p)
    for i in range(5):            # one normal colour per channel and box
        region = out[i][:, (out[i] != 7.0).any(0)]
        assert region.shape[1] > 0 and torch.equal(region, p['fill'][i, 0][:, None].expand_as(region))


# --------------------------------------------------------------------------------------------------------------
# Whole transforms
# --------------------------------------------------------------------------------------------------------------

@needs_cifar
def test_full_pipeline_statistics_close_to_timm():
    """Sanity check of the composed pipeline: channel means / stds of 512 augmented CIFAR images vs timm's
    create_transform (catches a wrong fill, normalisation or op strength, not small differences)."""
    arr = _cifar(512)
    cfg = AugConfig(interpolation='bicubic')
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    tf = create_transform(32, is_training=True, scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip,
                          auto_augment=cfg.rand_augment, interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std,
                          re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count)
    ref = torch.stack([tf(Image.fromarray(a)) for a in arr])
    mine = DeviceAugment(cfg, 32)(_to_batch(arr), torch.Generator().manual_seed(0))
    for c in range(3):
        assert abs(mine[:, c].mean() - ref[:, c].mean()) < 0.12
        assert abs(mine[:, c].std() / ref[:, c].std() - 1) < 0.08


@pytest.mark.parametrize('source', SOURCES)
@pytest.mark.parametrize('img_size,crop_pct,shape', [(224, 0.875, (32, 32)), (32, 1.0, (32, 32)),
                                                     (32, 0.875, (32, 32)), (24, 0.9, (32, 48))])
def test_eval_transform_matches_timm(source, img_size, crop_pct, shape):
    arr = _images(source, 32)
    if shape != (32, 32):
        arr = np.stack([np.asarray(Image.fromarray(a).resize(shape[::-1], Image.BICUBIC)) for a in arr])
    tf = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation='bicubic',
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
    ref = torch.stack([tf(Image.fromarray(a)) for a in arr])
    mine = DeviceEvalTransform(img_size, crop_pct, 'bicubic', IMAGENET_MEAN, IMAGENET_STD)(_to_batch(arr))
    assert mine.shape == ref.shape == (32, 3, img_size, img_size) and mine.dtype == torch.float32
    level = 1 / 255 / min(IMAGENET_STD)
    d = (mine - ref).abs()
    assert d.max() <= level + 1e-5 and (d > 1e-5).float().mean() <= 1e-4
    if img_size == 32 and crop_pct == 1.0:   # identity resize: only the normalisation remains
        plain = TF.normalize(_to_batch(arr).float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(mine, plain, atol=1e-6)


def test_reproducible_and_per_sample():
    arr = _digits_rgb(1)
    batch = _to_batch(np.repeat(arr, 16, axis=0))            # 16 identical images
    aug = DeviceAugment(AugConfig(), 32)
    a = aug(batch, torch.Generator().manual_seed(123))
    b = aug(batch, torch.Generator().manual_seed(123))
    c = aug(batch, torch.Generator().manual_seed(124))
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 0, 'identical inputs must differ per sample'
    torch.manual_seed(5)                                      # generator=None draws from the global RNG
    d = aug(batch)
    torch.manual_seed(5)
    assert torch.equal(d, aug(batch))


def test_one_channel_images():
    from sklearn.datasets import load_digits
    d = np.round(load_digits().images[:64] * (255.0 / 16.0)).astype(np.uint8)
    x = _to_batch(d)                                          # (64, 1, 8, 8), like the digits_lt dataset
    out = DeviceAugment(AugConfig(re_mode='rand', re_count=2), img_size=8, in_chans=1)(
        x, torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, 8, 8) and torch.isfinite(out).all()
    plain = DeviceAugment(_cfg(), img_size=8, in_chans=1)(x)  # nothing random: only the normalisation
    mean, std = np.mean(IMAGENET_MEAN), np.mean(IMAGENET_STD)  # 3-entry statistics are averaged for 1 channel
    assert torch.allclose(plain, (x.float() / 255 - mean) / std, atol=1e-5)
    single = DeviceAugment(_cfg(mean=(0.5,), std=(0.25,)), img_size=8, in_chans=1)(x)
    assert torch.allclose(single, (x.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_apply_traces_without_graph_breaks():
    """`apply` has no host syncs or data-dependent shapes: dynamo captures it as one graph (fullgraph=True
    raises on a graph break such as .item() or boolean-mask indexing); the eager backend keeps this test fast."""
    torch._dynamo.reset()
    arr = _digits_rgb(8)
    aug = DeviceAugment(AugConfig(rand_augment='rand-m9-n1-mstd0.5-inc1', re_count=2), 32)   # 1 layer: all ops
    params = aug.sample_params(8, (32, 32), 'cpu', torch.Generator().manual_seed(9))
    compiled = torch.compile(aug.apply, backend='eager', fullgraph=True)
    assert torch.equal(compiled(_to_batch(arr), params), aug.apply(_to_batch(arr), params))
    sample = torch.compile(lambda: aug.sample_params(8, (32, 32), 'cpu'), backend='eager', fullgraph=True)
    assert sample()['crop'].shape == (8, 4)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match='GaussianBlur'):
        DeviceAugment(AugConfig(rand_augment='rand-m9-t3a'), 32)
    with pytest.raises(ValueError, match="only timm RandAugment"):
        DeviceAugment(AugConfig(rand_augment='original-mstd0.5'), 32)
    aug = DeviceAugment(AugConfig(), 32)
    with pytest.raises(ValueError, match='uint8'):
        aug(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match='channels'):
        aug(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match='entries'):
        DeviceAugment(AugConfig(mean=(0.5, 0.5)), 32)
    with pytest.raises(ValueError, match='crop_pct'):
        DeviceEvalTransform(32, 1.2, 'bicubic', IMAGENET_MEAN, IMAGENET_STD)
