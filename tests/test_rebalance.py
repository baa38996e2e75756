"""Decoupling's classifier re-balancing (deit_lt.rebalance, tools/rebalance.py) on the real digits_lt data.

A distilled micro DeiT is trained jointly (plain CE on both heads, instance sampling, fixed seed) on digits_lt with
IF 10, which leaves it head-biased (tail = classes 7-9). The tests check the methods against hand computations
(tau = 0 / 1, NCM), that cRT / LWS are driven by the sampler, that cRT and LWS raise tail accuracy over the joint
model, that bad input fails before any work, and the CLI end to end (report, plots, model files that evaluation
rebuilds, feature cache reuse).
"""
from __future__ import annotations

import importlib.util
import types
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import deit_lt.models  # noqa: F401  (registers the micro students)
from deit_lt.checkpoint import load_model_file, save_model_file
from deit_lt.config import AugConfig, DataConfig, ModelConfig, TrainConfig, WandbConfig, to_dict
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_eval_batches
from deit_lt.data.samplers import create_sampler
from deit_lt.data.transforms import resolve_norm
from deit_lt.eval import evaluate
from deit_lt.models import create_model_from_checkpoint, model_outputs
from deit_lt.cli import run_tool
from deit_lt.errors import ConfigError
from deit_lt.rebalance import (CRTConfig, LWSConfig, NCMConfig, TauNormConfig,
                               evaluate_predictors, extract_features, joint_logits, load_ncm, load_or_extract,
                               load_rebalance_config, model_heads, run_rebalance, tau_normalize)
from deit_lt.rebalance import crt, features as features_mod, lws, ncm, tau_norm, training
from deit_lt.rebalance.base import linear_head
from deit_lt.rebalance.report import log_to_wandb

REPO = Path(__file__).resolve().parents[1]
ARCH = 'deit_micro_distilled_patch2_8'
DATA = DataConfig(name='digits_lt', imb_factor=10, val_per_class=10)
MEAN, STD = resolve_norm(AugConfig().mean, AugConfig().std, 1)
AUG = AugConfig(mean=MEAN, std=STD, eval_crop_pct=1.0, num_workers=0)
TAIL = [7, 8, 9]
QUIET = ['wandb.mode=disabled']


def _tensors(ds):
    xs, ys = zip(*create_eval_batches(ds, AUG, img_size=8, batch_size=1024, device='cpu'))
    return torch.cat(xs), torch.cat(ys)


def _meta(arch, num_classes, ds, model_kwargs, kind='student'):
    cfg = TrainConfig(data=DATA, model=ModelConfig(name=arch), aug=AUG)
    return {'kind': kind, 'arch': arch, 'num_classes': num_classes, 'model_kwargs': model_kwargs, 'img_size': 8,
            'in_chans': 1, 'mean': list(MEAN), 'std': list(STD), 'train_counts': ds.train_counts.tolist(),
            'class_names': ds.class_names, 'class_map': None, 'dataset': {'name': 'digits_lt', 'imb_factor': 10},
            'splits': ds.splits.as_dict(), 'epoch': 0, 'config': to_dict(cfg)}


@pytest.fixture(scope='module')
def digits():
    ds = create_datasets(DATA)
    assert ds['train'].splits.groups['tail'] == TAIL
    return ds, {k: _tensors(d) for k, d in ds.items()}


@pytest.fixture(scope='module')
def trained(digits, tmp_path_factory):
    """A jointly trained distilled student (CE on both heads, instance sampling), saved as a deit-lt model file."""
    ds, tensors = digits
    x, y = tensors['train']
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10, in_chans=1, drop_path_rate=0.0)
    epochs, bsz = 16, 32
    steps = len(y) // bsz
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps)
    sampler = create_sampler('instance', ds['train'].targets, seed=0)
    model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for s in range(steps):
            i = order[s * bsz:(s + 1) * bsz]
            tokens = model.forward_features(x[i])
            loss = (F.cross_entropy(model.head(tokens[:, 0]), y[i])
                    + F.cross_entropy(model.head_dist(tokens[:, 1]), y[i]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    path = tmp_path_factory.mktemp('ckpt') / 'joint.safetensors'
    save_model_file(path, model.state_dict(), _meta(ARCH, 10, ds['train'], {'in_chans': 1}))
    return path, model


@pytest.fixture(scope='module')
def feats(digits, trained):
    ds, _ = digits
    model = trained[1]
    return {k: extract_features(model, create_eval_batches(d, AUG, img_size=8, batch_size=256, device='cpu'))
            for k, d in ds.items()}


GROUPS = {'head': [0, 1, 2], 'mid': [3, 4, 5, 6], 'tail': TAIL}


# --------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------

def test_cached_features_reproduce_the_model(digits, trained, feats):
    _, tensors = digits
    model = trained[1]
    heads = model_heads(model)
    assert [(h.name, h.feature, h.module_name) for h in heads] == [('cls', 'cls', 'head'),
                                                                   ('dist', 'dist', 'head_dist')]
    z_cls, z_dist = model_outputs(model, tensors['test'][0])
    z = joint_logits(heads, feats['test'])
    torch.testing.assert_close(z['cls'], z_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z['dist'], z_dist, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z['avg'], (z_cls + z_dist) / 2, atol=1e-5, rtol=1e-5)
    assert torch.equal(feats['test'].targets, tensors['test'][1])
    assert feats['train'].feature('concat').shape == (len(feats['train']), 192)


@pytest.mark.parametrize('arch, module_name', [('deit_micro_patch2_8', 'head'), ('resnet10t', 'fc')])
def test_single_head_models_read_pre_logits(digits, arch, module_name):
    """Plain ViTs and timm CNNs (the teachers' interface): one head reading forward_head(pre_logits=True)."""
    _, tensors = digits
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, in_chans=1).eval()
    x = tensors['test'][0][:64]
    fs = extract_features(model, [(x, tensors['test'][1][:64])])
    (head,) = model_heads(model)
    assert (head.name, head.feature, head.module_name) == ('logits', 'feat', module_name)
    with torch.no_grad():
        torch.testing.assert_close(joint_logits([head], fs)['logits'], model(x), atol=1e-5, rtol=1e-5)


def test_feature_cache_is_keyed_and_reused(digits, trained, tmp_path):
    ds, _ = digits
    model = trained[1]
    calls = []

    def batches(split):
        def make():
            calls.append(split)
            return create_eval_batches(ds[split], AUG, img_size=8, batch_size=256, device='cpu')
        return make

    targets = {s: torch.from_numpy(ds[s].targets) for s in ('val', 'test')}
    keys = {s: features_mod.cache_key(trained[0], s, img_size=8) for s in ('val', 'test')}
    first, path, cached = load_or_extract(model, batches('val'), targets['val'], key=keys['val'], cache_dir=tmp_path)
    assert not cached and path.is_file() and calls == ['val']
    again, path2, cached = load_or_extract(model, batches('val'), targets['val'], key=keys['val'], cache_dir=tmp_path)
    assert cached and path2 == path and calls == ['val']      # the backbone did not run again
    torch.testing.assert_close(again.features, first.features)
    _, path3, cached = load_or_extract(model, batches('test'), targets['test'], key=keys['test'], cache_dir=tmp_path)
    assert not cached and path3 != path and calls == ['val', 'test']
    # a cache file whose labels do not match the split is not used: the backbone runs again (and the fresh
    # features, whose labels do not match either, are refused)
    with pytest.raises(ConfigError, match='dataset order'):
        load_or_extract(model, batches('val'), targets['val'].roll(1), key=keys['val'], cache_dir=tmp_path)
    assert calls == ['val', 'test', 'val']
    # a rewritten checkpoint (new modification time) gets new keys, so its stale features are never reused
    st = trained[0].stat()
    os.utime(trained[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert features_mod.cache_key(trained[0], 'val', img_size=8) != keys['val']
    finally:
        os.utime(trained[0], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_feature_extraction_reports_progress(digits, trained, tmp_path, monkeypatch, capsys):
    """Extraction shows progress (`deit_lt.progress.Progress`: plain lines when stderr is not a terminal, here one
    per batch with the interval set to 0) and stays quiet without `show_progress`."""
    import deit_lt.progress
    monkeypatch.setattr(deit_lt.progress, 'PLAIN_INTERVAL_S', 0.0)
    ds, _ = digits
    model = trained[1]

    def batches():
        return create_eval_batches(ds['test'], AUG, img_size=8, batch_size=100, device='cpu')
    targets = torch.from_numpy(ds['test'].targets)
    key = features_mod.cache_key(trained[0], 'test', img_size=8)
    load_or_extract(model, batches, targets, key=key, cache_dir=None, show_progress=True)
    err = capsys.readouterr().err
    n = len(batches())
    assert f'features test: {n}/{n} batch' in err and n > 1
    load_or_extract(model, batches, targets, key=key, cache_dir=None)
    assert 'features test' not in capsys.readouterr().err

# --------------------------------------------------------------------------------------------------------------
# tau-norm and NCM against hand computations
# --------------------------------------------------------------------------------------------------------------

def test_tau_zero_and_one(trained, feats):
    heads = model_heads(trained[1])
    te = feats['test']
    joint = joint_logits(heads, te)
    for spec in heads:
        head = linear_head(spec, 'tau_norm')
        f = te.features[spec.feature]
        # tau = 0, bias kept: the stage-1 classifier exactly
        torch.testing.assert_close(tau_normalize(head, 0.0, 'keep').logits(te), joint[spec.name])
        # tau = 0, bias dropped (the original): stage-1 logits minus the bias
        torch.testing.assert_close(tau_normalize(head, 0.0, 'drop').logits(te) + head.bias, joint[spec.name],
                                   atol=1e-5, rtol=1e-5)
        # tau = 1, bias dropped: ||f|| * cos(w_j, f), i.e. cosine classification
        cos = F.normalize(f, dim=1) @ F.normalize(head.weight, dim=1).T
        z1 = tau_normalize(head, 1.0, 'drop').logits(te)
        torch.testing.assert_close(z1, cos * f.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
        assert torch.equal(z1.argmax(1), cos.argmax(1))
        assert torch.allclose(tau_normalize(head, 1.0).weight.norm(dim=1), torch.ones(10), atol=1e-6)
    # with keep, the tau = 0 point of the sweep is the joint model
    res = tau_norm.fit(feats['train'], heads, TauNormConfig(grid=[0.0], bias='keep'), val=feats['val'])
    for name, r in evaluate_predictors(res.logits(te), te.targets, GROUPS).items():
        assert r['top1'] == evaluate_predictors(joint, te.targets, GROUPS)[name]['top1']


def test_tau_norm_picks_the_best_val_tau(trained, feats):
    heads = model_heads(trained[1])
    grid = [0.0, 0.5, 1.0, 1.5]
    res = tau_norm.fit(feats['train'], heads, TauNormConfig(grid=grid), val=feats['val'], groups=GROUPS)
    for name, rows in res.info['val_sweep']['heads'].items():
        accs = [r['acc'] for r in rows]
        assert res.info['tau'][name] == grid[accs.index(max(accs))]
        assert [r['tau'] for r in rows] == grid and {'head', 'mid', 'tail'} <= set(rows[0])
    pair = tau_norm.fit(feats['train'], heads, TauNormConfig(grid=grid, select='avg'), val=feats['val'])
    grid_acc = np.asarray(pair.info['val_sweep']['avg'])
    i, j = grid.index(pair.info['tau']['cls']), grid.index(pair.info['tau']['dist'])
    assert grid_acc[i, j] == grid_acc.max()


@pytest.mark.parametrize('feature', ['cls', 'dist', 'concat'])
def test_ncm_equals_hand_computed_nearest_mean(feats, feature):
    tr, te = feats['train'], feats['test']
    res = ncm.fit(tr, model_heads_for_ncm(), NCMConfig(features=[feature]))
    f = tr.feature(feature).double().numpy()
    y = tr.targets.numpy()
    mu = f.mean(0)

    def cl2n(a):
        a = a - mu
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    centroids = np.stack([cl2n(f)[y == c].mean(0) for c in range(10)])
    t = cl2n(te.feature(feature).double().numpy())
    dist = ((t[:, None, :] - centroids[None]) ** 2).sum(-1)
    logits = res.logits(te)[feature]
    np.testing.assert_allclose(logits.numpy(), -dist, atol=1e-5)
    assert np.array_equal(logits.argmax(1).numpy(), dist.argmin(1))


def model_heads_for_ncm():
    """NCM only reads the class count from the heads."""
    return model_heads(timm.create_model(ARCH, num_classes=10, in_chans=1))


# --------------------------------------------------------------------------------------------------------------
# cRT / LWS
# --------------------------------------------------------------------------------------------------------------

class _Recorder:
    def __init__(self, inner):
        self.inner, self.epochs, self.indices = inner, [], []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        self.inner.set_epoch(epoch)

    def __iter__(self):
        idx = list(self.inner)
        self.indices.append(idx)
        return iter(idx)

    def __len__(self):
        return len(self.inner)


@pytest.mark.parametrize('method', ['crt', 'lws'])
def test_training_is_driven_by_the_class_balanced_sampler(trained, feats, monkeypatch, method):
    made = []

    def recording(name, targets, **kw):
        made.append((name, kw, _Recorder(create_sampler(name, targets, **kw))))
        return made[-1][2]

    monkeypatch.setattr(training, 'create_sampler', recording)
    tr = feats['train']
    cfg = (CRTConfig if method == 'crt' else LWSConfig)(batch_size=32, epochs=3)
    res = {'crt': crt, 'lws': lws}[method].fit(tr, model_heads(trained[1]), cfg, val=feats['val'])
    (name, kw, rec), = made
    steps = len(tr) // 32
    assert name == 'class_balanced' and kw['samples_per_class'] == 4 and kw['num_samples'] == steps * 32
    assert rec.epochs == [0, 1, 2] and res.info['steps_per_epoch'] == steps
    for idx in rec.indices:
        assert len(idx) == steps * 32   # floor(N / B) batches per epoch
        # visits of 4 images, the classes in turn: each class gets every pass's visit, so class counts differ by at
        # most one visit whatever the split size (e.g. 448 draws = 112 visits: 11 or 12 per class)
        counts = np.bincount(tr.targets.numpy()[idx], minlength=10)
        assert counts.sum() == steps * 32 and counts.max() - counts.min() <= 4 and counts.min() > 0


def test_batches_come_from_the_sampler_indices(trained, feats, monkeypatch):
    """A sampler that only ever yields class-9 images: cRT's CE then only ever raises the class-9 bias (its gradient
    is p_j - [j = 9]) and LWS scales class 9 up most."""
    tr = feats['train']
    only9 = np.flatnonzero(tr.targets.numpy() == 9)

    class Only9:
        def __init__(self, n):
            self.n = n

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            return iter(np.resize(only9, self.n).tolist())

        def __len__(self):
            return self.n

    monkeypatch.setattr(training, 'create_sampler', lambda name, targets, num_samples, **kw: Only9(num_samples))
    heads = model_heads(trained[1])
    cfg = dict(batch_size=32, epochs=2, select_epoch=False, lr_base_batch=32)   # lr 0.2: a few steps suffice
    res = crt.fit(tr, heads, CRTConfig(**cfg))
    seen = tr.subset(torch.from_numpy(only9))
    for name, z in res.logits(seen).items():
        assert (z.argmax(1) == 9).all()
        if name != 'avg':
            assert res.heads[name].bias.argmax() == 9 and (res.heads[name].bias[:9] < 0).all()
    res = lws.fit(tr, heads, LWSConfig(**cfg))
    for s in res.info['scales'].values():
        assert s[9] == max(s)


def test_crt_and_lws_raise_tail_accuracy(trained, feats):
    """The method's known effect: class-balanced re-training / re-scaling trades head for tail accuracy.

    The final-epoch classifiers are compared (select_epoch=False): a 10-per-class val split is too small for
    epoch selection to be more than noise."""
    heads = model_heads(trained[1])
    te = feats['test']
    joint = evaluate_predictors(joint_logits(heads, te), te.targets, GROUPS)
    assert max(r['tail'] for r in joint.values()) < 40      # the joint model is head-biased
    cfg = dict(batch_size=32, select_epoch=False)
    res_crt = crt.fit(feats['train'], heads, CRTConfig(**cfg), val=feats['val'])
    res_lws = lws.fit(feats['train'], heads, LWSConfig(**cfg), val=feats['val'])
    for res in (res_crt, res_lws):
        after = evaluate_predictors(res.logits(te), te.targets, GROUPS)
        for pred in ('cls', 'dist', 'avg'):
            assert after[pred]['tail'] >= joint[pred]['tail'] + 8, (res.method, pred, after[pred], joint[pred])
            assert after[pred]['top1'] >= joint[pred]['top1'] - 1
    # LWS learns larger scales for the rare classes
    for s in res_lws.info['scales'].values():
        assert np.mean([s[c] for c in TAIL]) > np.mean(s[:3])
    # and its heads are diag(s) W, s * b of the frozen stage-1 heads
    for spec in heads:
        s = torch.tensor(res_lws.info['scales'][spec.name])
        w, b = res_lws.heads[spec.name].weight, res_lws.heads[spec.name].bias
        torch.testing.assert_close(w, spec.module.weight.detach() * s[:, None], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, spec.module.bias.detach() * s, atol=1e-5, rtol=1e-4)


def test_crt_keeps_the_heads_it_does_not_retrain(trained, feats):
    heads = model_heads(trained[1])
    res = crt.fit(feats['train'], heads, CRTConfig(batch_size=32, epochs=1, heads=['cls']))
    assert res.info['retrained_heads'] == ['cls']
    assert torch.equal(res.heads['dist'].weight, heads[1].module.weight.detach())
    assert not torch.equal(res.heads['cls'].weight, heads[0].module.weight.detach())


# --------------------------------------------------------------------------------------------------------------
# Bad input fails before any work
# --------------------------------------------------------------------------------------------------------------

def _no_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError('features were extracted before the input was checked')
    monkeypatch.setattr(features_mod, 'extract_features', fail)


class _CosineHead(nn.Module):
    """An LDAM-style cosine ("NormedLinear") head: not an nn.Linear."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, num_classes))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class _TinyCNN(nn.Module):
    """timm-style teacher stand-in: forward_features / forward_head(pre_logits) / get_classifier, use_norm switch."""

    def __init__(self, num_classes=10, in_chans=1, use_norm=True, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.fc = _CosineHead(16, num_classes) if use_norm else nn.Linear(16, num_classes)

    def forward_features(self, x):
        return F.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@timm.models.register_model
def rebalance_test_cosine_cnn(pretrained=False, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay')}
    return _TinyCNN(**kwargs)


def test_bad_input_fails_before_any_work(digits, trained, tmp_path, monkeypatch):
    ds, _ = digits
    ckpt = trained[0]
    over = QUIET + [f'runtime.output_dir={tmp_path / "out"}']
    with pytest.raises(ConfigError, match="unknown method 'bogus'"):
        load_rebalance_config(None, over, checkpoint=ckpt, methods='crt,bogus')
    _no_work(monkeypatch)
    with pytest.raises(ConfigError, match='tau_norm.grid is empty'):
        run_rebalance(load_rebalance_config(None, over + ['tau_norm.grid=[]'], checkpoint=ckpt, methods='tau_norm'))
    with pytest.raises(ConfigError, match='validation split'):
        run_rebalance(load_rebalance_config(None, over + ['data.val_per_class=0'], checkpoint=ckpt,
                                            methods='tau_norm'))
    with pytest.raises(ConfigError, match='larger than the training split'):
        run_rebalance(load_rebalance_config(None, over, checkpoint=ckpt, methods='crt'))   # batch 512 > 503 images
    # a checkpoint predicting 5 classes on the 10-class digits
    five = tmp_path / 'five.safetensors'
    model = timm.create_model('deit_micro_patch2_8', num_classes=5, in_chans=1)
    save_model_file(five, model.state_dict(), _meta('deit_micro_patch2_8', 5, ds['train'], {'in_chans': 1}))
    with pytest.raises(ConfigError, match='has 10 classes but the checkpoint predicts 5'):
        run_rebalance(load_rebalance_config(None, over, checkpoint=five, methods='ncm'))
    # a cosine head cannot be tau-normalised or scaled
    cos = tmp_path / 'cosine.safetensors'
    model = _TinyCNN(use_norm=True)
    save_model_file(cos, model.state_dict(), _meta('rebalance_test_cosine_cnn', 10, ds['train'],
                                                   {'in_chans': 1, 'use_norm': True}, kind='teacher'))
    for method in ('tau_norm', 'lws'):
        with pytest.raises(ConfigError, match='not nn.Linear'):
            run_rebalance(load_rebalance_config(None, over, checkpoint=cos, methods=method))
    with pytest.raises(ConfigError, match='not nn.Linear'):
        tau_norm.fit(None, model_heads(model), TauNormConfig(), val=None)


def test_crt_and_ncm_work_on_a_cosine_head_teacher(digits, tmp_path):
    """cRT only needs the features; its linear head is saved with use_norm switched off and rebuilds."""
    ds, tensors = digits
    torch.manual_seed(0)
    model = _TinyCNN(use_norm=True)
    cos = tmp_path / 'cosine.safetensors'
    save_model_file(cos, model.state_dict(), _meta('rebalance_test_cosine_cnn', 10, ds['train'],
                                                   {'in_chans': 1, 'use_norm': True}, kind='teacher'))
    report = run_rebalance(load_rebalance_config(
        None, QUIET + [f'runtime.output_dir={tmp_path / "out"}', 'crt.batch_size=32', 'crt.epochs=2'],
        checkpoint=cos, methods='crt,ncm'))
    assert set(report['methods']) == {'crt', 'ncm'} and set(report['methods']['ncm']['test']) == {'feat'}
    rebuilt, meta = create_model_from_checkpoint(report['methods']['crt']['model_file'])
    assert meta['kind'] == 'rebalanced' and meta['model_kwargs']['use_norm'] is False
    assert isinstance(rebuilt.fc, nn.Linear)
    x, y = tensors['test']
    with torch.no_grad():
        acc = 100.0 * (rebuilt(x).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(report['methods']['crt']['test']['logits']['top1'])


# --------------------------------------------------------------------------------------------------------------
# Configs and the command line
# --------------------------------------------------------------------------------------------------------------

def test_configs_load_and_reproduce_the_recipe(trained):
    cfg = load_rebalance_config(REPO / 'configs/rebalance/default.yaml', checkpoint=trained[0])
    assert (cfg.crt.epochs, cfg.crt.lr, cfg.crt.lr_base_batch, cfg.crt.batch_size) == (10, 0.2, 512, 512)
    assert (cfg.crt.momentum, cfg.crt.weight_decay, cfg.crt.sampler, cfg.crt.samples_per_class) == \
        (0.9, 5e-4, 'class_balanced', 4)
    assert cfg.lws.epochs == 5 and cfg.lws.lr == 0.2
    assert cfg.tau_norm.grid == pytest.approx([i / 10 for i in range(21)]) and cfg.tau_norm.bias == 'drop'
    assert (cfg.ncm.feat_type, cfg.ncm.dist) == ('cl2n', 'l2')
    assert cfg.data == DATA   # the checkpoint's own data config
    assert load_rebalance_config(None, checkpoint=trained[0]).crt == cfg.crt   # YAML = dataclass defaults
    for path in sorted((REPO / 'configs/rebalance').glob('*.yaml')):
        load_rebalance_config(path, checkpoint=trained[0])
    c10 = load_rebalance_config(REPO / 'configs/rebalance/cifar10_lt.yaml', checkpoint=trained[0])
    assert c10.data.val_per_class == 50 and c10.crt.epochs == 10


def _load_tool():
    spec = importlib.util.spec_from_file_location('rebalance_tool', REPO / 'tools/rebalance.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_end_to_end(digits, trained, tmp_path, monkeypatch, capsys):
    ds, tensors = digits
    out = tmp_path / 'run'
    args = ['--checkpoint', str(trained[0]), '--config', 'configs/rebalance/digits_lt.yaml',
            f'runtime.output_dir={out}', 'wandb.mode=disabled']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, 'tools/rebalance.py', '--method', 'all', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for method in ('joint', 'crt', 'tau_norm', 'lws', 'ncm'):
        assert f'\n{method} ' in table
    assert 'head' in table and 'mid' in table and 'tail' in table

    report = json.loads((out / 'report.json').read_text())
    assert report['heads'] == ['cls', 'dist'] and report['splits']['groups']['tail'] == TAIL
    for method in ('crt', 'tau_norm', 'lws'):
        entry = report['methods'][method]
        assert set(entry['test']) == {'cls', 'dist', 'avg'}
        assert {'top1', 'head', 'mid', 'tail'} <= set(entry['test']['avg'])
        # the re-balanced model file rebuilds and evaluates to the reported numbers
        rebuilt, meta = create_model_from_checkpoint(entry['model_file'])
        assert meta['kind'] == 'rebalanced' and meta['arch'] == ARCH and meta['rebalance']['method'] == method
        batches = create_eval_batches(ds['test'], AUG, img_size=8, batch_size=256, device='cpu')
        ev = evaluate(rebuilt, batches, GROUPS, 10)
        for pred in ('cls', 'dist', 'avg'):
            assert ev[pred]['top1'] == pytest.approx(entry['test'][pred]['top1'])
            assert ev[pred]['tail'] == pytest.approx(entry['test'][pred]['tail'])
    sd, _ = load_model_file(report['methods']['tau_norm']['model_file'])
    assert torch.equal(sd['head.bias'], torch.zeros(10))     # tau-norm drops the bias
    sweep = json.loads((out / 'tau_sweep.json').read_text())
    assert len(sweep['val']['heads']['cls']) == 21 and len(sweep['test']['heads']['dist']) == 21
    fs = extract_features(trained[1], [tensors['test']])
    for feature, path in report['methods']['ncm']['files'].items():
        clf, meta = load_ncm(path)
        assert meta['kind'] == 'ncm' and meta['feature'] == feature
        acc = 100.0 * (clf(fs.feature(feature)).argmax(1) == fs.targets).double().mean().item()
        assert acc == pytest.approx(report['methods']['ncm']['test'][feature]['top1'])
    for png in ('weight_norms.png', 'tau_sweep.png'):
        assert (out / png).stat().st_size > 1000
    assert not any(v['from_cache'] for v in report['features'].values())

    # a second run (another method) reuses the cached features; W&B disabled works without wandb installed
    monkeypatch.setitem(sys.modules, 'wandb', None)
    assert _load_tool().main(['--method', 'ncm', *args]) == 0
    again = json.loads((out / 'report.json').read_text())
    assert all(v['from_cache'] for v in again['features'].values())
    assert list(again['methods']) == ['crt', 'tau_norm', 'lws', 'ncm']   # earlier results kept in the report
    assert 'ncm ' in capsys.readouterr().out
    # a wrong method name is a clean error from the command line
    assert run_tool(_load_tool().main, ['--method', 'crtt', *args]) == 2
    assert "unknown method 'crtt'" in capsys.readouterr().err


def test_wandb_logging(tmp_path, monkeypatch):
    """What goes to W&B (offline by default): the config, the metrics, a table and the plots; checked on a stand-in
    module so the test needs neither the package nor its background service."""
    logged, inits = {}, []

    class Run:
        id = 'run0'
        dir = str(tmp_path / 'wandb-run')
        summary = {}

        def log(self, data, step=None):
            logged.update(data)

        def finish(self):
            logged['finished'] = True

    class Table:
        def __init__(self, columns):
            self.columns, self.rows = columns, []

        def add_data(self, *row):
            self.rows.append(row)

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or Run(), Table=Table,
                                 Image=lambda path: ('image', path))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    report = {'joint': {'test': {'cls': {'top1': 50.0, 'head': 90.0, 'mid': 40.0, 'tail': 10.0}}},
              'methods': {'crt': {'test': {'cls': {'top1': 60.0, 'head': 80.0, 'mid': 50.0, 'tail': 40.0}}}}}
    png = tmp_path / 'weight_norms.png'
    png.write_bytes(b'png')
    assert log_to_wandb(WandbConfig(), tmp_path, {'a': 1}, report, {'weight_norms': png}) == Run.dir
    (init,) = inits
    assert init['mode'] == 'offline' and init['dir'] == str(tmp_path) and init['config'] == {'a': 1}
    assert init['settings'] == {'quiet': True}     # no end-of-run summary on the console
    assert init['job_type'] == 'rebalance' and logged['finished']
    assert logged['test/crt/cls/tail'] == 40.0 and Run.summary['test/joint/cls/top1'] == 50.0
    assert logged['rebalance/test'].rows == [('joint', 'cls', 50.0, 90.0, 40.0, 10.0),
                                             ('crt', 'cls', 60.0, 80.0, 50.0, 40.0)]
    assert logged['rebalance/weight_norms'] == ('image', str(png))
    monkeypatch.setitem(sys.modules, 'wandb', None)   # disabled: wandb is never imported
    assert log_to_wandb(WandbConfig(mode='disabled'), tmp_path / 'off', {}, report, {}) is None


def test_wandb_online_without_credentials_is_one_clear_error(tmp_path, monkeypatch):
    """Online mode looks for credentials where wandb's login does (environment, netrc, settings) without a network
    call, and without any it stops with a ConfigError (one line from the tools) before W&B is started."""
    from deit_lt.tracking import RunLogger, wandb_credentials
    for var in ('WANDB_API_KEY', 'WANDB_IDENTITY_TOKEN_FILE', 'WANDB_BASE_URL'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('NETRC', str(tmp_path / 'netrc'))
    monkeypatch.setitem(sys.modules, 'wandb', None)        # and W&B itself is never reached
    assert wandb_credentials() is None
    with pytest.raises(ConfigError, match='wandb.mode=online needs W&B credentials'):
        RunLogger(WandbConfig(mode='online'), tmp_path / 'run', {})
    assert not (tmp_path / 'run').exists()
    (tmp_path / 'netrc').write_text('machine api.wandb.ai\n  login user\n  password ' + 'k' * 40 + '\n')
    assert wandb_credentials() == str(tmp_path / 'netrc')
    (tmp_path / 'netrc').unlink()
    monkeypatch.setenv('WANDB_API_KEY', 'k' * 40)
    assert wandb_credentials() == 'WANDB_API_KEY'
    RunLogger(WandbConfig(mode='disabled'), tmp_path / 'off', {}).finish()   # disabled needs neither
