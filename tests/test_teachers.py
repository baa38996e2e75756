"""Teacher models, losses and checkpoint loading, checked against hand computations (SAM and schedules:
test_optim.py).

- ResNet-32: the parameter count of LDAM-DRW's resnet32 (464,154 for 10 classes), the option-A shortcut, the
  timm-style API.
- LDAM margins and DRW weights: the CIFAR-10-LT IF100 values of LDAM-DRW / Saddle-LongTail; the loss value and
  its weighted-mean reduction computed by hand.
- Loading: our model files, plain `module.`/`linear` state dicts, LDAM ResNet-50 state dicts, PaCo wrapper
  checkpoints (built here from a real ResNet-32 with the wrapper's key layout) give identical logits; every bad
  file or mismatch fails with a CheckpointError, and a pickle carrying code never runs it.
"""
from __future__ import annotations

import math
import pathlib
import random

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.checkpoint import CheckpointError, save_model_file
from deit_lt.data.lt_datasets import lt_class_counts
from deit_lt.models.factory import create_model_from_meta
from deit_lt.models.cnn import create_teacher_model
from deit_lt.models.layers import NormedLinear
from deit_lt.models.teacher import load_teacher
from teachers import TeacherLoss, ldam_margins
from deit_lt.models.resnet_cifar import ZeroPadShortcut


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that a wrong mapping of any BN key changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# ResNet-32
# --------------------------------------------------------------------------------------------------------------

def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet32_parameter_count_matches_spec():
    assert _num_params(timm.create_model('resnet32', num_classes=10)) == 464_154
    assert _num_params(timm.create_model('resnet32', num_classes=100)) == 470_004
    assert _num_params(timm.create_model('resnet32', num_classes=10, use_norm=True)) == 464_144
    assert _num_params(timm.create_model('resnet32', num_classes=100, use_norm=True)) == 469_904


def test_resnet32_timm_api_and_shapes():
    m = timm.create_model('resnet32', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    pooled = m.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((2, 3)), atol=1e-6)
    assert torch.allclose(m(x), m.linear(pooled), atol=1e-6)
    assert m.get_classifier() is m.linear and isinstance(m.linear, nn.Linear)
    assert m.pretrained_cfg['classifier'] == 'linear'
    # 15 BasicBlocks with 2 convs each, plus the stem: 31 convs (+ the head = 32 weighted layers).
    assert sum(isinstance(mod, nn.Conv2d) for mod in m.modules()) == 31
    m.reset_classifier(5)
    assert m(x).shape == (2, 5)
    cos = timm.create_model('resnet32', num_classes=7, use_norm=True, in_chans=1).eval()
    out = cos(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 7) and out.abs().max() <= 1 + 1e-6           # cosines
    cos.reset_classifier(4)
    assert isinstance(cos.get_classifier(), NormedLinear) and cos.get_classifier().weight.shape == (64, 4)
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('resnet32', pretrained=True)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    block = timm.create_model('resnet32').layer2[0]
    assert isinstance(block.shortcut, ZeroPadShortcut)
    assert not list(block.shortcut.parameters())


def test_normed_linear_is_a_cosine_with_unit_columns():
    torch.manual_seed(0)
    head = NormedLinear(6, 4)
    assert torch.allclose(head.weight.norm(dim=0), torch.ones(4), atol=1e-6)
    f = torch.randn(3, 6)
    expected = torch.stack([torch.stack([F.cosine_similarity(f[i], head.weight[:, j], dim=0) for j in range(4)])
                            for i in range(3)])
    assert torch.allclose(head(f), expected, atol=1e-6)


def test_cosine_cnn_puts_a_cosine_head_on_any_timm_cnn():
    model, arch, kwargs = create_teacher_model('resnet18', 7, use_norm=True, in_chans=3)
    assert arch == 'cosine_cnn' and kwargs == {'in_chans': 3, 'backbone': 'resnet18', 'use_norm': True}
    assert isinstance(model.fc, NormedLinear) and model.fc.weight.shape == (512, 7)
    rebuilt = create_model_from_meta({'arch': arch, 'num_classes': 7, 'model_kwargs': kwargs})
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    # use_norm=False (the re-balancing tools' switch to a linear head) is the plain backbone, same parameter names.
    linear = create_model_from_meta({'arch': arch, 'num_classes': 7, 'model_kwargs': dict(kwargs, use_norm=False)})
    assert isinstance(linear.fc, nn.Linear) and set(linear.state_dict()) == set(model.state_dict()) | {'fc.bias'}
    plain, arch, kwargs = create_teacher_model('resnet32', 10, use_norm=False, in_chans=1)
    assert arch == 'resnet32' and kwargs == {'in_chans': 1, 'use_norm': False}
    with pytest.raises(ValueError, match="unknown teacher architecture 'resnet33'"):
        create_teacher_model('resnet33', 10)
    with pytest.raises(ValueError, match='set by the teacher builder'):
        create_teacher_model('resnet32', 10, pretrained=True)


# --------------------------------------------------------------------------------------------------------------
# LDAM + DRW
# --------------------------------------------------------------------------------------------------------------

CIFAR10_IF100 = lt_class_counts(5000, 10, 100)


def test_ldam_margins_and_drw_weights_cifar10_if100():
    assert CIFAR10_IF100 == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    margins = ldam_margins(CIFAR10_IF100, max_m=0.5)
    # max_m * (n_min / n_j)^(1/4), LDAM-DRW losses.py
    spec_margins = [0.158, 0.180, 0.204, 0.232, 0.264, 0.300, 0.341, 0.387, 0.440, 0.500]
    assert margins.tolist() == pytest.approx(spec_margins, abs=6e-4)
    assert margins[-1].item() == pytest.approx(0.5, abs=1e-7)
    loss = TeacherLoss(CIFAR10_IF100, 'ldam', drw_epoch=160)
    loss.set_epoch(159)
    assert loss.weights is None
    loss.set_epoch(160)
    # Cui et al. 2019, normalised to mean 1
    spec_weights = [0.051, 0.077, 0.121, 0.195, 0.319, 0.525, 0.868, 1.443, 2.409, 3.993]
    assert loss.weights.tolist() == pytest.approx(spec_weights, abs=6e-4)
    assert loss.weights.sum().item() == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match='every class'):
        ldam_margins([10, 0, 3])


def test_ldam_loss_and_weighted_mean_by_hand():
    counts = [100, 10, 1]
    z = torch.tensor([[0.9, 0.1, -0.2], [0.2, 0.4, 0.3], [-0.5, 0.1, 0.6], [0.3, 0.3, 0.3]])
    y = torch.tensor([0, 1, 2, 2])
    m = [0.5 * (1 / n) ** 0.25 / 1.0 for n in counts]          # n_min = 1: K = max_m
    s, beta = 30.0, 0.9999

    def per_sample(i):
        row = [s * (z[i, j].item() - (m[j] if j == y[i] else 0.0)) for j in range(3)]
        return -row[y[i]] + math.log(sum(math.exp(v) for v in row))

    plain = sum(per_sample(i) for i in range(4)) / 4
    r = [(1 - beta) / (1 - beta ** n) for n in counts]
    w = [3 * v / sum(r) for v in r]
    weighted = sum(w[y[i]] * per_sample(i) for i in range(4)) / sum(w[y[i]] for i in range(4))
    loss = TeacherLoss(counts, 'ldam', drw_epoch=2, beta=beta, max_m=0.5, s=s)
    loss.set_epoch(1)
    assert loss(z, y).item() == pytest.approx(plain, rel=1e-5)
    loss.set_epoch(2)
    assert loss(z, y).item() == pytest.approx(weighted, rel=1e-5)
    # CE: unscaled on a linear head, scaled by s on a cosine head.
    assert TeacherLoss(counts, 'ce')(z, y).item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    assert TeacherLoss(counts, 'ce', cosine_head=True)(z, y).item() == pytest.approx(
        F.cross_entropy(30 * z, y).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Loading teachers
# --------------------------------------------------------------------------------------------------------------

X32 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _resnet32(num_classes=10, use_norm=False, seed=0):
    torch.manual_seed(seed)
    return _randomise_bn(timm.create_model('resnet32', num_classes=num_classes, use_norm=use_norm), seed)


def test_load_our_model_file(tmp_path):
    model, arch, kwargs = create_teacher_model('resnet32', 10, use_norm=True)
    _randomise_bn(model)
    meta = {'kind': 'teacher', 'arch': arch, 'num_classes': 10, 'model_kwargs': kwargs, 'img_size': 32,
            'in_chans': 3, 'mean': [0.5] * 3, 'std': [0.25] * 3, 'logit_scale': 30.0}
    path = save_model_file(tmp_path / 't.safetensors', model.state_dict(), meta)
    loaded, got = load_teacher(path, num_classes=10)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(X32), model(X32))
    assert got['use_norm'] is True and got['logit_scale'] == 30.0 and got['img_size'] == 32
    assert got['mean'] == [0.5] * 3 and got['format'] == 'deit_lt' and got['arch'] == 'resnet32'
    with pytest.raises(CheckpointError, match='10 classes but the data has 100'):
        load_teacher(path, num_classes=100)
    with pytest.raises(CheckpointError, match="'resnet32' teacher, not 'resnet50'"):
        load_teacher(path, num_classes=10, arch='resnet50')
    with pytest.raises(CheckpointError, match='cosine'):
        load_teacher(path, num_classes=10, use_norm=False)
    with pytest.raises(CheckpointError, match='3-channel images but the data has 1'):
        load_teacher(path, num_classes=10, in_chans=1)


@pytest.mark.parametrize('use_norm', [False, True])
def test_load_plain_state_dict_with_module_prefix(tmp_path, use_norm):
    model = _resnet32(use_norm=use_norm)
    sd = {'module.' + k: v for k, v in model.state_dict().items()}   # DataParallel-style, head named `linear`
    torch.save({'epoch': 200, 'arch': 'resnet32', 'state_dict': sd, 'best_acc1': torch.tensor(81.9)},
               tmp_path / 'ckpt.pth.tar')
    loaded, meta = load_teacher(tmp_path / 'ckpt.pth.tar', num_classes=10)   # arch and head recognised
    assert torch.equal(loaded(X32), model(X32))
    assert meta['use_norm'] is use_norm and meta['logit_scale'] == (30.0 if use_norm else 1.0)
    assert meta['arch'] == 'resnet32' and meta['img_size'] is None and meta['mean'] is None
    # The PaCo copy of ResNet_s names the head `fc`; DeiT-LT's loader reads {'model': ...} first.
    fc_sd = {(k.replace('linear.', 'fc.', 1) if k.startswith('linear.') else k): v
             for k, v in model.state_dict().items()}
    torch.save({'model': fc_sd}, tmp_path / 'fc.pth')
    loaded, _ = load_teacher(tmp_path / 'fc.pth', num_classes=10, arch='resnet32', format='state_dict')
    assert torch.equal(loaded(X32), model(X32))
    with pytest.raises(CheckpointError, match='10 classes but the data has 100'):
        load_teacher(tmp_path / 'ckpt.pth.tar', num_classes=100)
    with pytest.raises(CheckpointError, match='does not fit the model'):
        load_teacher(tmp_path / 'ckpt.pth.tar', num_classes=10, use_norm=not use_norm)


def test_load_ldam_resnet50_state_dict(tmp_path):
    # Saddle-LongTail ImageNet/iNat LDAM teacher: torchvision ResNet-50 under DataParallel, `fc` = NormedLinear.
    torch.manual_seed(0)
    ref, _, _ = create_teacher_model('resnet50', 12, use_norm=True)
    _randomise_bn(ref)
    torch.save({'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, tmp_path / 'r50.pth')
    loaded, meta = load_teacher(tmp_path / 'r50.pth', num_classes=12)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), ref(x))
    assert meta['arch'] == 'cosine_cnn' and meta['model_kwargs']['backbone'] == 'resnet50' and meta['use_norm']


def _fake_paco_checkpoint(model: nn.Module, num_classes: int, dim: int = 32, queue: int = 1024) -> dict:
    """The PaCo/MoCo wrapper's state dict layout under DDP: encoder_q / encoder_k (backbone + MLP projection fc),
    linear / linear_k classifiers, and the queue buffers."""
    g = torch.Generator().manual_seed(7)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith('linear.')}
    mlp = {'fc.0.weight': torch.randn(64, 64, generator=g), 'fc.0.bias': torch.randn(64, generator=g),
           'fc.1.weight': torch.rand(64, generator=g), 'fc.1.bias': torch.randn(64, generator=g),
           'fc.1.running_mean': torch.randn(64, generator=g), 'fc.1.running_var': torch.rand(64, generator=g),
           'fc.1.num_batches_tracked': torch.tensor(100), 'fc.3.weight': torch.randn(dim, 64, generator=g),
           'fc.3.bias': torch.randn(dim, generator=g)}
    sd = {}
    for k, v in (backbone | mlp).items():
        sd[f'module.encoder_q.{k}'] = v
        # The momentum (key) encoder drifts from the query encoder; it must not be what gets loaded.
        sd[f'module.encoder_k.{k}'] = v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    sd['module.linear.weight'] = model.linear.weight.detach().clone()
    sd['module.linear.bias'] = model.linear.bias.detach().clone()
    sd['module.linear_k.weight'] = torch.randn(num_classes, 64, generator=g)
    sd['module.linear_k.bias'] = torch.randn(num_classes, generator=g)
    sd['module.queue'] = F.normalize(torch.randn(queue, dim, generator=g), dim=0)
    sd['module.queue_l'] = torch.randint(0, num_classes, (queue,), generator=g)
    sd['module.queue_ptr'] = torch.zeros(1, dtype=torch.long)
    return {'epoch': 400, 'arch': 'resnet32', 'state_dict': sd, 'acc': 86.8}


def test_load_paco_checkpoint_gives_identical_logits(tmp_path):
    model = _resnet32(num_classes=10, seed=1)
    torch.save(_fake_paco_checkpoint(model, 10), tmp_path / 'paco_sam_ckpt_cf10_if100.pth.tar')
    loaded, meta = load_teacher(tmp_path / 'paco_sam_ckpt_cf10_if100.pth.tar', num_classes=10)   # auto: paco
    assert meta['format'] == 'paco' and meta['arch'] == 'resnet32' and meta['use_norm'] is False
    assert torch.equal(loaded(X32), model(X32))
    loaded, _ = load_teacher(tmp_path / 'paco_sam_ckpt_cf10_if100.pth.tar', num_classes=10, arch='resnet32',
                             format='paco')
    assert torch.equal(loaded(X32), model(X32))
    with pytest.raises(CheckpointError, match='10 classes but the data has 100'):
        load_teacher(tmp_path / 'paco_sam_ckpt_cf10_if100.pth.tar', num_classes=100)
    with pytest.raises(CheckpointError, match='no encoder_q'):
        torch.save({'state_dict': model.state_dict()}, tmp_path / 'plain.pth')
        load_teacher(tmp_path / 'plain.pth', num_classes=10, format='paco')


def test_bad_teacher_files_fail_cleanly(tmp_path):
    model = _resnet32()
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': model.state_dict()}, good)
    raw = good.read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(raw[:len(raw) // 2])
    rng = random.Random(0)
    for i in range(20):       # random bytes break the unpickler in many different ways
        (tmp_path / f'garbage{i}.pth').write_bytes(rng.randbytes(rng.randint(1, 4096)))
    (tmp_path / 'empty.pth').write_bytes(b'')
    for name in ['truncated.pth', 'empty.pth'] + [f'garbage{i}.pth' for i in range(20)]:
        with pytest.raises(CheckpointError, match='truncated|corrupt'):
            load_teacher(tmp_path / name, num_classes=10, arch='resnet32')
    with pytest.raises(CheckpointError, match='not found'):
        load_teacher(tmp_path / 'missing.pth', num_classes=10)
    sf = save_model_file(tmp_path / 'm.safetensors', model.state_dict(),
                         {'kind': 'teacher', 'arch': 'resnet32', 'num_classes': 10,
                          'model_kwargs': {'in_chans': 3, 'use_norm': False}})
    (tmp_path / 'cut.safetensors').write_bytes(sf.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_teacher(tmp_path / 'cut.safetensors', num_classes=10)
    with pytest.raises(CheckpointError, match='unknown teacher architecture'):
        load_teacher(good, num_classes=10, arch='resnet33')
    with pytest.raises(CheckpointError, match='cannot tell the architecture'):
        torch.save({'state_dict': {'linear.weight': torch.zeros(10, 64), 'linear.bias': torch.zeros(10),
                                   'stem.weight': torch.zeros(3)}}, tmp_path / 'odd.pth')
        load_teacher(tmp_path / 'odd.pth', num_classes=10)
    with pytest.raises(ValueError, match='unknown teacher format'):
        load_teacher(good, num_classes=10, format='onnx')


class _RunsCode:
    """Unpickling this would call Path.touch(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_with_code_is_refused_without_running(tmp_path):
    marker = tmp_path / 'code_ran'
    torch.save({'state_dict': _resnet32().state_dict(), 'payload': _RunsCode(marker)}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match='refusing to load'):
        load_teacher(tmp_path / 'evil.pth', num_classes=10, arch='resnet32')
    assert not marker.exists()
