"""SHIKE model (deit_lt/models/shike.py) and losses (teachers/shike.py).

- Loss oracle: a hand-computed example (C = 4, one sample, three experts): the HNS teacher,
  per-expert CE, KL terms with PyTorch's 'mean' reduction, mutual sums, the total, the stage-2 balanced softmax.
- The stage-1 loss and its gradients equal the official formula (one-hot masks, -30 fills, KL with the 'mean'
  default reduction, nothing detached) written out here on a random batch; the options change what they claim to.
- Learning rates of the official two-stage schedule.
- Model: DKF shapes and routing, parameter counts (1,277,008 / 1,257,808 for C = 100), forward/backward, stage-2
  freezing (only the stage-2 heads get gradients; BN statistics keep updating unless frozen), timm interface and a
  safetensors round trip through `timm.create_model` that keeps the stage.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.checkpoint import load_model_file, save_model_file
from deit_lt.models import shike as shike_models  # noqa: F401  (registers shike_resnet32)
from deit_lt.models.shike import ShikeResNetCifar
from teachers.shike import BalancedSoftmaxLoss, ShikeLoss, hns_teacher_logits, shike_lr

TOL = 1e-5


def _oracle_batch() -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.tensor([[[10., 8., 2., -4.]], [[6., 2., 7., 0.]], [[8., 5., 4., 1.]]])   # (E=3, B=1, C=4)
    return z, torch.tensor([0])


def _close(actual, expected, tol: float = TOL) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64).flatten(),
                               torch.as_tensor(expected, dtype=torch.float64).flatten(), rtol=0, atol=tol)


def _kl_mean(input_log_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """`F.kl_div(input, target)` with the 'mean' reduction of torch <= 2.x (sum / number of entries), written out
    because PyTorch announces that 'mean' will change to 'batchmean'."""
    return (torch.xlogy(target_probs, target_probs) - target_probs * input_log_probs).sum() / target_probs.numel()


def _tiny_model(num_classes: int = 5, **kwargs) -> ShikeResNetCifar:
    # ResNet-8-like depth keeps the CPU tests fast; the structure (DKF, heads, stage switch) is the same.
    return timm.create_model('shike_resnet32', num_classes=num_classes, layers=(1, 1, 1), **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Loss oracle
# --------------------------------------------------------------------------------------------------------------
def test_hns_teacher_oracle():
    z, y = _oracle_batch()
    _close(z.mean(0), [8., 5., 13. / 3., -1.])
    _close(z.max(0).values, [10., 8., 7., 1.])
    t = hns_teacher_logits(z, y)
    _close(t, [0., 5., 7., 1.])
    _close(t.softmax(-1), [0.000801, 0.118848, 0.878174, 0.002177], tol=1e-6)


def test_stage1_loss_oracle():
    z, y = _oracle_batch()
    loss_fn = ShikeLoss()
    _close([F.cross_entropy(z_i, y) for z_i in z], [0.127224, 1.318839, 0.066737])
    p = hns_teacher_logits(z, y).softmax(-1)
    kls = [_kl_mean(torch.log_softmax(z_i.masked_fill(F.one_hot(y, 4).bool(), -30.0), -1), p) for z_i in z]
    _close(kls, [1.235452, 0.065114, 0.213800])
    mutual = [sum(_kl_mean(F.log_softmax(z[i], -1), F.softmax(z[j], -1)) for j in range(3) if j != i)
              for i in range(3)]
    _close(mutual, [1.358812, 0.659860, 0.609030])
    loss, parts = loss_fn(z, y)
    _close(loss, 19.284158)
    _close(parts['ce'], 0.127224 + 1.318839 + 0.066737)
    _close(parts['hns'], 10 * (1.235452 + 0.065114 + 0.213800), tol=1e-4)   # 10x the rounding of the 6-digit values
    _close(parts['mutual'], 1.358812 + 0.659860 + 0.609030)
    _close(sum(parts.values()), loss)
    assert all(not v.requires_grad for v in parts.values())


def test_stage2_loss_oracle():
    z, y = _oracle_batch()
    loss, parts = BalancedSoftmaxLoss([100, 10, 1, 1])(z, y)
    _close(loss, 0.047229)
    assert set(parts) == {'balanced_ce'}
    flat = BalancedSoftmaxLoss([100, 10, 1])
    _close(flat(torch.zeros(3, 1, 3), torch.tensor([2]))[0], 3 * math.log(111))
    _close(math.log(111), 4.709530)
    with pytest.raises(ValueError):
        BalancedSoftmaxLoss([1, 0, 3])
    with pytest.raises(ValueError):
        flat(torch.zeros(3, 1, 4), torch.tensor([2]))


# --------------------------------------------------------------------------------------------------------------
# The official formula on a random batch: values and gradients (no stop-gradient anywhere)
# --------------------------------------------------------------------------------------------------------------
def _official_form(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss as the official code states it: one-hot masks, -30 fills, softmax + log, F.kl_div's 'mean'."""
    onehot = F.one_hot(y, z.shape[-1]).float()
    avg = z.mean(0)
    ranked = -30 * onehot + avg * (1 - onehot)
    hard = F.one_hot(ranked.argmax(1), z.shape[-1]).float()
    teacher = ranked * hard + z.max(0).values * (1 - hard) * (1 - onehot)
    total = 0.0
    for i in range(z.shape[0]):
        total = total - (onehot * F.log_softmax(z[i], 1)).sum(1).mean()
        student = F.softmax(z[i] * (1 - onehot) - 30 * onehot, 1)
        total = total + 10.0 * _kl_mean(torch.log(student), F.softmax(teacher, 1))
        for j in range(z.shape[0]):
            if i != j:
                total = total + _kl_mean(F.log_softmax(z[i], 1), F.softmax(z[j], 1))
    return total


def test_stage1_matches_official_form_with_gradients():
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(3, 6, 7, generator=g) * 2 - 1) * 30        # cosine logits, s = 30
    y = torch.randint(0, 7, (6,), generator=g)
    z_ours = z.clone().requires_grad_(True)
    z_ref = z.clone().requires_grad_(True)
    loss, _ = ShikeLoss()(z_ours, y)
    ref = _official_form(z_ref, y)
    loss.backward()
    ref.backward()
    _close(loss, ref)
    _close(z_ours.grad, z_ref.grad)

    # The teacher is differentiable: detaching it changes the gradient, not the value.
    z_det = z.clone().requires_grad_(True)
    loss_det, _ = ShikeLoss(detach_teacher=True)(z_det, y)
    loss_det.backward()
    _close(loss_det, loss)
    assert (z_det.grad - z_ours.grad).abs().max() > 1e-3


def test_loss_options():
    z, y = _oracle_batch()
    base = ShikeLoss()
    batchmean = ShikeLoss(kl_reduction='batchmean')
    _, p_mean = base(z, y)
    _, p_bm = batchmean(z, y)
    _close(p_bm['hns'], 4 * p_mean['hns'], tol=1e-4)             # C times the 'mean' reduction
    _close(p_bm['mutual'], 4 * p_mean['mutual'])
    _close(p_bm['ce'], p_mean['ce'])

    # exclude_target: KL over the C - 1 negatives only, averaged over B * (C - 1) entries.
    excl = ShikeLoss(exclude_target=True)
    p = torch.tensor([5., 7., 1.]).softmax(-1)
    expected = sum(_kl_mean(F.log_softmax(z_i[0, 1:], -1), p) for z_i in z)
    _close(excl.hns(z, y), expected)

    with pytest.raises(ValueError):
        ShikeLoss(kl_reduction='sum')
    with pytest.raises(ValueError):
        base(z[0], y)
    with pytest.raises(ValueError):
        base(z, F.one_hot(y, 4).float())


def test_learning_rate_schedule():
    expected = {0: 0.025, 1: 0.05, 4: 0.125, 5: 0.15, 6: 0.149988, 179: 1.208e-5,
                180: 0.0375, 184: 0.0875, 185: 0.1, 191: 0.065451, 199: 0.001093}
    for epoch, lr in expected.items():
        assert shike_lr(epoch) == pytest.approx(lr, abs=1e-6 if lr > 1e-4 else 1e-8), epoch


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def test_parameter_counts_and_dkf_shapes():
    model = timm.create_model('shike_resnet32', num_classes=100)
    assert isinstance(model, ShikeResNetCifar) and model.num_experts == 3
    total = sum(p.numel() for p in model.parameters())
    rt = sum(p.numel() for p in model.rt_classifiers.parameters())
    assert total == 1_277_008 and total - rt == 1_257_808
    # Option-B shortcut where the shape changes, identity elsewhere.
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d) and isinstance(model.layer1[0].shortcut, nn.Identity)
    # Round-robin DKF sources: F1 (16 ch, two stride-2 steps) for experts 0 and 2, F2 (32 ch, one step) for 1.
    assert [len(b) for b in model.shallow_exps] == [2, 1, 2]
    assert [b[0].conv.in_channels for b in model.shallow_exps] == [16, 32, 16]

    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        out = model.forward_dkf(x)
        assert out['f1'].shape == (2, 16, 32, 32) and out['f2'].shape == (2, 32, 16, 16)
        for d, h, fused in zip(out['deep'], out['shallow'], out['fused']):
            assert d.shape == h.shape == fused.shape == (2, 64, 8, 8)
            torch.testing.assert_close(fused, d * h)
        assert (out['shallow'][1] >= 0).all() and (out['shallow'][0] < 0).any()   # ReLU ends only the F2 branch
        experts = model.forward_experts(x)
        assert experts['features'].shape == (3, 2, 64) and experts['logits'].shape == (3, 2, 100)
        torch.testing.assert_close(experts['features'], torch.stack(out['fused']).mean((-1, -2)))
        torch.testing.assert_close(model(x), experts['logits'].mean(0))
        torch.testing.assert_close(experts['output'], experts['logits'].mean(0))
        # Cosine heads scaled by s = 30.
        cos = F.normalize(experts['features'][0], dim=1) @ F.normalize(model.classifiers[0].weight, dim=0)
        torch.testing.assert_close(experts['logits'][0], 30 * cos)


def test_forward_backward_stage1():
    torch.manual_seed(0)
    model = _tiny_model().train()
    loss_fn = ShikeLoss()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, parts = loss_fn(model.forward_experts(x)['logits'], y)
    assert torch.isfinite(loss) and set(parts) == {'ce', 'hns', 'mutual'}
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith('rt_classifiers.'):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.stage == 1 and model.get_classifier() is model.classifiers


@pytest.mark.parametrize('freeze_bn_stats', [False, True])
def test_stage2_freezing(freeze_bn_stats):
    torch.manual_seed(0)
    model = _tiny_model().train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        stage1_logits = model(x)
    model.set_stage(2, freeze_bn_stats=freeze_bn_stats)
    model.train()
    assert model.stage == 2 and bool(model.use_retrained_heads)
    assert model.get_classifier() is model.rt_classifiers and model.get_classifier(name_only=True) == 'rt_classifiers'
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f'rt_classifiers.{i}.weight' for i in range(3)}

    bn = model.layer1[0].bn1
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    loss_fn = BalancedSoftmaxLoss([8, 4, 2, 1, 1])
    loss, parts = loss_fn(model.forward_experts(x)['logits'], y)
    loss.backward()
    assert set(parts) == {'balanced_ce'}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith('rt_classifiers.'), name
    # The official loop keeps model.train() in stage 2, so BN statistics keep moving (cifarTrain.py:237).
    moved = not torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == int(before[1]) + 1
    assert moved != freeze_bn_stats
    assert bn.training != freeze_bn_stats

    model.eval()
    with torch.no_grad():
        experts = model.forward_experts(x)['logits']
        torch.testing.assert_close(model(x), experts.mean(0))
        g = model.forward_experts(x)['features']
        torch.testing.assert_close(experts[1], 30 * F.normalize(g[1], dim=1) @ F.normalize(
            model.rt_classifiers[1].weight, dim=0))
    assert not torch.allclose(model(x), stage1_logits)

    model.set_stage(1)
    assert model.stage == 1 and not bool(model.use_retrained_heads)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == trainable
    with pytest.raises(ValueError):
        model.set_stage(3)
    with pytest.raises(ValueError):
        model.set_stage(1, freeze_bn_stats=True)


def test_state_dict_round_trip_keeps_stage(tmp_path):
    torch.manual_seed(0)
    kwargs = {'layers': [1, 1, 1]}
    model = timm.create_model('shike_resnet32', num_classes=5, **kwargs)
    # Train-mode forwards give BN non-default running statistics.
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.set_stage(2)
    with torch.no_grad():
        for p in model.rt_classifiers.parameters():
            p.add_(torch.randn_like(p))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = save_model_file(tmp_path / 'shike.safetensors', model.state_dict(),
                           {'kind': 'teacher', 'arch': 'shike_resnet32', 'num_classes': 5, 'model_kwargs': kwargs})
    sd, meta = load_model_file(path)
    assert sd['use_retrained_heads'].dtype == torch.bool and bool(sd['use_retrained_heads'])
    rebuilt = timm.create_model(meta['arch'], pretrained=False, num_classes=meta['num_classes'],
                                **meta['model_kwargs'])
    assert rebuilt.stage == 1
    rebuilt.load_state_dict(sd, strict=True)
    rebuilt.eval()
    assert rebuilt.stage == 2 and rebuilt.get_classifier(name_only=True) == 'rt_classifiers'
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)
    # A stage-1 state dict switches a stage-2 model back.
    model.set_stage(1)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.stage == 1


def test_timm_interface():
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('shike_resnet32', pretrained=True)
    model = _tiny_model(num_classes=5)
    assert model.pretrained_cfg['classifier'] == ('classifiers', 'rt_classifiers')
    assert model.get_classifier(name_only=True) == 'classifiers'
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.forward_experts(x)['logits'].shape == (3, 2, 7)
    assert not any(p.requires_grad for p in model.rt_classifiers.parameters())
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features) == (2, 192)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    with pytest.raises(RuntimeError):
        model.forward_experts(x)
