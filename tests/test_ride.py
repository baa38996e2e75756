"""RIDE: the multi-expert ResNets (deit_lt/models/multi_expert.py) and the stage-1 / router losses (teachers/ride.py).

Reference values were computed with the official `RIDELoss` (frank-xwang/RIDE-LongTailRecognition@ab8be5c
`model/loss.py`) on the same inputs: 3 classes, n = (100, 10, 1), logits already times s = 30. Its 1-based epochs are
0-based here (1-based 160 = 0-based 159, the last epoch without DRW). Models: the parameter counts of RIDE's reduced
ResNet-32, option-A shortcut widths, ensemble forward in train and eval mode, routed inference against a reference
built from the training-time router outputs, stage-2 freezing, and a safetensors round trip through
timm.create_model.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.checkpoint import save_model_file
from deit_lt.data.lt_datasets import lt_class_counts
from deit_lt.models.factory import create_model_from_checkpoint, create_model_from_meta
from deit_lt.models.multi_expert import MultiExpertResNet, convert_official_state_dict
from teachers.ride import (RIDELoss, RouterLoss, prefix_correctness, ride_diversity_temperatures, routed_outputs,
                           router_targets)

COUNTS = (100, 10, 1)
TOL = 1e-5


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: torch.Tensor | float = 1.0) -> float:
    """KL(softmax(p / t) || softmax(q / t)) of one row, written out."""
    p, q = F.softmax(p_logits / t, dim=-1), F.softmax(q_logits / t, dim=-1)
    return float((p * (p.log() - q.log())).sum())


# ----------------------------------------------------------------------------------------------------------------
# Oracle 1: margins, DRW weights, temperatures
# ----------------------------------------------------------------------------------------------------------------
def test_margins_weights_temperatures():
    loss = RIDELoss(COUNTS, drw_epoch=160, diversity_factor=-0.45)
    assert loss.margins.tolist() == pytest.approx([0.158114, 0.281171, 0.5], abs=TOL)
    assert loss.class_weights.tolist() == pytest.approx([0.027159, 0.270369, 2.702472], abs=TOL)
    temps = ride_diversity_temperatures(COUNTS, reweight_factor=0.05)
    assert temps.tolist() == pytest.approx([1.0, 0.887920, 0.876712], abs=TOL)
    assert loss.class_temperatures.tolist() == pytest.approx(temps.tolist())
    assert loss.temperature_mean == pytest.approx(0.921544, abs=TOL)


def test_cifar100_if100_temperature_span():
    temps = ride_diversity_temperatures(lt_class_counts(500, 100, 100), reweight_factor=0.05)
    assert float(temps[0]) == pytest.approx(1.0)
    assert float(temps[-1]) == pytest.approx(0.807, abs=5e-4)
    assert float(temps.mean()) == pytest.approx(0.847, abs=5e-4)


def test_epoch_switch_is_zero_based():
    loss = RIDELoss(COUNTS, drw_epoch=160)
    loss.set_epoch(159)            # 1-based 160: the official `epoch > reweight_epoch` is still false
    assert not loss.drw_active and not loss.temperature_active
    loss.set_epoch(160)            # 1-based 161
    assert loss.drw_active and loss.temperature_active
    never = RIDELoss(COUNTS, drw_epoch=None)
    never.set_epoch(10_000)
    assert not never.drw_active and not never.temperature_active
    early = RIDELoss(COUNTS, drw_epoch=160, temperature_epoch=0)
    early.set_epoch(0)
    assert early.temperature_active and not early.drw_active
    with pytest.raises(ValueError):
        RIDELoss(COUNTS, temperature_epoch='later')


# ----------------------------------------------------------------------------------------------------------------
# Oracle 2 and 3: stage-1 loss values
# ----------------------------------------------------------------------------------------------------------------
def _two_experts() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[[3.0, 1.0, 0.0]], [[1.0, 2.0, 0.0]]]), torch.tensor([0])


def test_two_expert_loss_before_and_after_drw():
    logits, y = _two_experts()
    loss_fn = RIDELoss(COUNTS, drw_epoch=160, diversity_factor=-0.45)
    zbar = logits.mean(0)[0]
    # the KLs of the oracle, written out independently of the loss
    assert [_kl(zbar, z[0]) for z in logits] == pytest.approx([0.214896, 0.252642], abs=TOL)
    temps = loss_fn.class_temperatures
    assert [_kl(zbar, z[0], temps) for z in logits] == pytest.approx([0.245737, 0.271736], abs=TOL)

    loss_fn.set_epoch(159)
    total, parts = loss_fn(logits, y)
    assert float(parts['ldam']) == pytest.approx(3.102649 + 5.873162, abs=TOL)
    assert float(parts['diversity']) == pytest.approx(-0.210392, abs=TOL)
    assert float(total) == pytest.approx(8.765419, abs=TOL)
    loss_fn.set_epoch(160)
    total, parts = loss_fn(logits, y)
    assert float(parts['diversity']) == pytest.approx(-0.197757, abs=TOL)
    # one sample: the DRW-weighted mean equals the plain one
    assert float(parts['ldam']) == pytest.approx(8.975811, abs=TOL)
    assert float(total) == pytest.approx(8.975811 - 0.197757, abs=TOL)
    assert all(not v.requires_grad for v in parts.values())


def test_individual_ldam_and_drw_weighted_mean():
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    y = torch.tensor([0, 2])
    loss_fn = RIDELoss(COUNTS, drw_epoch=160, diversity_factor=-0.45)
    per_sample = [float(loss_fn.ldam(logits[0, i:i + 1], y[i:i + 1])) for i in range(2)]
    assert per_sample == pytest.approx([3.102649, 15.693147], abs=TOL)
    loss_fn.set_epoch(159)
    total, parts = loss_fn(logits, y)
    assert float(total) == pytest.approx(9.397898, abs=TOL)
    assert float(parts['diversity']) == pytest.approx(0.0, abs=1e-7)   # one expert: it is the ensemble
    loss_fn.set_epoch(160)
    assert float(loss_fn(logits, y)[0]) == pytest.approx(15.567877, abs=TOL)


def test_options_that_change_numbers():
    logits, y = _two_experts()
    plain = RIDELoss(COUNTS, drw_epoch=0, diversity_factor=-0.45, temperature_sq_factor=False)
    plain.set_epoch(0)
    assert float(plain(logits, y)[1]['diversity']) == pytest.approx(-0.45 * (0.245737 + 0.271736), abs=TOL)
    # lambda = 0: each expert's own logits (paper) vs the ensemble's (official quirk)
    own = RIDELoss(COUNTS, diversity_factor=0.0)
    collab = RIDELoss(COUNTS, diversity_factor=0.0, collaborative_without_diversity=True)
    assert float(own(logits, y)[0]) == pytest.approx(8.975811, abs=TOL)
    assert float(collab(logits, y)[0]) == pytest.approx(2 * float(own.ldam(logits.mean(0), y)), abs=TOL)
    # distillation: T^2 KL(teacher || ensemble), once (paper) or times E (official RIDELossWithDistill)
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    base = float(RIDELoss(COUNTS, diversity_factor=-0.45)(logits, y)[0])
    kd = 1.5 ** 2 * _kl(teacher[0], logits.mean(0)[0], 1.5)
    total, parts = RIDELoss(COUNTS, diversity_factor=-0.45)(logits, y, teacher)
    assert float(parts['distill']) == pytest.approx(kd, abs=TOL)
    assert float(total) == pytest.approx(base + kd, abs=TOL)
    scaled = RIDELoss(COUNTS, diversity_factor=-0.45, official_distill_scaling=True)(logits, y, teacher)[0]
    assert float(scaled) == pytest.approx(2 * (base + kd), abs=1e-4)


def test_diversity_target_is_detached():
    logits = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(0)) * 5
    logits.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 0])
    fn = RIDELoss(COUNTS, diversity_factor=-0.45, drw_epoch=0)
    fn.set_epoch(0)
    loss, _ = fn(logits, y)
    grad, = torch.autograd.grad(loss, logits)
    # expert e's gradient depends on its own logits only when the ensemble is a constant
    expected = []
    ens = F.softmax(logits.detach().mean(0) / fn.class_temperatures, dim=1)
    for z in logits:
        term = fn.ldam(z, y) - 0.45 * fn.temperature_mean ** 2 * F.kl_div(
            F.log_softmax(z / fn.class_temperatures, dim=1), ens, reduction='batchmean')
        expected.append(torch.autograd.grad(term, z, retain_graph=True)[0])
    assert torch.allclose(grad, torch.stack(expected), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Oracle 4: router targets and loss
# ----------------------------------------------------------------------------------------------------------------
def _router_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four samples of class 0 whose prefix ensembles are right as A (1,1,1), B (0,1,1), C (0,0,1), D (0,0,0)."""
    right, wrong = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    experts = [
        [right, wrong, wrong, wrong],                 # expert 1
        [right, [2.0, 0.0, 0.0], wrong, wrong],       # expert 2
        [right, right, [3.0, 0.0, 0.0], wrong],       # expert 3
    ]
    return torch.tensor(experts), torch.zeros(4, dtype=torch.long)


def test_router_targets_and_loss():
    logits, y = _router_batch()
    assert prefix_correctness(logits, y).T.int().tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert router_targets(logits, y).tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    router_logits = torch.zeros(2, 4)
    per_router = [float(F.binary_cross_entropy_with_logits(router_logits[k], router_targets(logits, y)[k],
                                                            pos_weight=torch.tensor([100.0]))) for k in range(2)]
    assert per_router == pytest.approx([35.003933, 17.848539], abs=TOL)
    loss, parts = RouterLoss(pos_weight=100.0)(router_logits, logits, y)
    assert float(loss) == pytest.approx(26.426235, abs=TOL)
    assert float(parts['router_positive']) == pytest.approx(3 / 8)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_ride_resnet32_parameter_counts_and_widths():
    assert _n_params(timm.create_model('ride_resnet32', num_classes=100)) == 783_856
    model = timm.create_model('ride_resnet32', num_classes=10)
    assert _n_params(model) == 770_896
    assert model.num_experts == 3 and model.num_features == 48
    assert len(model.layer2s) == len(model.layer3s) == len(model.linears) == 3
    # option-A shortcuts: 16 -> 24 pads 4 + 4, 24 -> 48 pads 12 + 12; no shortcut parameters
    assert model.layer2s[0][0].shortcut.pad == 4 and model.layer3s[2][0].shortcut.pad == 12
    assert model.layer2s[0][0].conv1.stride == (2, 2)
    wide = timm.create_model('ride_resnet32', num_classes=10, num_experts=2, reduce_dimension=False)
    assert wide.num_features == 64 and wide.num_experts == 2 and wide.layer2s[1][0].shortcut.pad == 8
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('ride_resnet32', pretrained=True, num_classes=10)


def test_imagenet_variants_build_and_match_resnext_widths():
    rx = timm.create_model('ride_resnext50_32x4d', num_classes=10, num_experts=2)
    assert rx.num_features == 1536
    assert rx.layer3s[0][0].conv2.groups == 32 and rx.layer3s[0][0].conv2.out_channels == 384
    assert rx.layer4s[1][0].downsample[0].out_channels == 1536
    # one unreduced expert is torchvision's ResNeXt-50 32x4d with a bias-free cosine head
    single = timm.create_model('ride_resnext50_32x4d', num_classes=10, num_experts=1, reduce_dimension=False)
    assert _n_params(single) == _n_params(timm.create_model('resnext50_32x4d', num_classes=10)) - 10
    rx.eval()
    with torch.no_grad():
        out = rx.forward_experts(torch.randn(2, 3, 64, 64))
    assert out['logits'].shape == (2, 2, 10) and out['features'].shape == (2, 2, 1536)
    assert timm.create_model('ride_resnet50', num_classes=10, num_experts=2).layer3s[0][0].conv2.groups == 1


def _tiny_batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_forward_backward_and_interface():
    torch.manual_seed(0)
    model = timm.create_model('ride_resnet32', num_classes=10)
    x, y = _tiny_batch(), torch.tensor([0, 1, 2, 9])
    out = model.forward_experts(x)
    assert out['logits'].shape == (3, 4, 10) and out['features'].shape == (3, 4, 48)
    assert torch.allclose(out['output'], out['logits'].mean(0))
    assert out['logits'].abs().max() <= 30.0 + 1e-4          # s * cos
    loss_fn = RIDELoss(lt_class_counts(50, 10, 10), drw_epoch=1, diversity_factor=-0.45)
    loss, parts = loss_fn(out['logits'], y)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'ldam', 'diversity'}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ens = model(x)
        assert ens.shape == (4, 10)
        assert torch.allclose(ens, model.forward_experts(x)['logits'].mean(0), atol=1e-5)
        assert torch.allclose(model.forward_head(model.forward_features(x)), ens, atol=1e-5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, 4, 48)
    assert model.get_classifier() is model.linears and model.get_classifier(name_only=True) == 'linears'
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (4, 5)


def _router_model() -> MultiExpertResNet:
    torch.manual_seed(0)
    return timm.create_model('ride_resnet32', num_classes=10, router=True, router_top_k=5).eval()


def test_routed_inference_matches_prefix_reference():
    model = _router_model()
    x = _tiny_batch(8, seed=1)
    with torch.no_grad():
        out = model.forward_experts(x)
        # put router 0's threshold at the median of its logits, so that about half of the samples stop after expert 1
        model.router.fc.bias -= out['router_logits'][0].median() - 1e-3
        out = model.forward_experts(x)
        logits, used = model.forward_routed(x)
    go_on = torch.sigmoid(out['router_logits']) > 0.5
    expected_used = 1 + go_on.int().cumprod(0).sum(0)         # a stopped sample never resumes
    assert used.dtype == torch.long and used.tolist() == expected_used.tolist()
    assert (used == 1).any() and (used > 1).any()
    prefix = out['logits'].cumsum(0) / torch.arange(1, 4).view(-1, 1, 1)
    assert torch.allclose(logits, prefix[used - 1, torch.arange(8)], atol=1e-4)
    # the router run's training statistics come from one full pass: the same routing
    one_pass_logits, one_pass_used = routed_outputs(out['logits'], out['router_logits'])
    assert torch.equal(one_pass_used, used) and torch.allclose(one_pass_logits, logits, atol=1e-4)
    with torch.no_grad():
        model.router.fc.bias.fill_(1e4)
        logits, used = model.forward_routed(x)
        assert used.tolist() == [3] * 8 and torch.allclose(logits, model(x), atol=1e-4)
        model.router.fc.bias.fill_(-1e4)
        logits, used = model.forward_routed(x)
        assert used.tolist() == [1] * 8 and torch.allclose(logits, out['logits'][0], atol=1e-4)
    with pytest.raises(RuntimeError, match='router'):
        timm.create_model('ride_resnet32', num_classes=10).forward_routed(x)


def test_stage2_freezes_experts_and_trains_router():
    stage1 = timm.create_model('ride_resnet32', num_classes=10)
    model = _router_model()
    model.load_experts_state_dict(stage1.state_dict())
    model.freeze_experts()
    model.train()
    assert model.training and not model.bn1.training and not model.layer3s[0][4].bn2.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith('router.') for n in trainable)
    x, y = _tiny_batch(6, seed=2), torch.tensor([0, 1, 2, 3, 4, 5])
    out = model.forward_experts(x)
    loss, _ = RouterLoss()(out['router_logits'], out['logits'], y)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith('router.'))
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith('router.'))
    with pytest.raises(RuntimeError, match='does not fit'):
        model.load_experts_state_dict({k: v for k, v in stage1.state_dict().items() if k != 'conv1.weight'})


def test_state_dict_round_trip_through_timm(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(num_experts=2, router=True, router_top_k=5)
    model = timm.create_model('ride_resnet32', num_classes=10, **kwargs).eval()
    with torch.no_grad():                      # non-trivial BN statistics, so a lost buffer changes the output
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = save_model_file(tmp_path / 'ride.safetensors', model.state_dict(),
                           {'arch': 'ride_resnet32', 'num_classes': 10, 'model_kwargs': kwargs})
    rebuilt, meta = create_model_from_checkpoint(path)
    x = _tiny_batch()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
        assert torch.equal(rebuilt.forward_routed(x)[1], model.forward_routed(x)[1])
    assert isinstance(create_model_from_meta(meta), MultiExpertResNet)


def test_official_checkpoint_names_convert():
    model = _router_model()
    official = {}
    for k, v in model.state_dict().items():
        k = k.replace('router.hidden_fcs.', 'expert_help_pred_hidden_fcs.')
        official['module.backbone.' + k.replace('router.fc.', 'expert_help_pred_fc.')] = v
    assert any(k.startswith('module.backbone.layer2s.2.') for k in official)
    fresh = timm.create_model('ride_resnet32', num_classes=10, router=True, router_top_k=5)
    fresh.load_state_dict(convert_official_state_dict(official), strict=True)
    x = _tiny_batch()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_router_rejects_top_k_above_classes():
    with pytest.raises(ValueError, match='router_top_k'):
        timm.create_model('ride_resnet32', num_classes=10, router=True)       # K = 30 > 10 classes
