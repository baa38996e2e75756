"""APA / AGLU (deit_lt/models/layers/apa.py) and the models that use them, checked against closed forms.

- Values: the special cases of the definition (sigmoid, SiLU, the GELU approximation, the Gumbel and step limits,
  APA(0) = (1 + lambda) ** (-1 / lambda) for every kappa) and reference values computed by hand, in float64 to 1e-6;
  the stable form equals the closed form (1 + lambda exp(-kappa z)) ** (-1 / lambda).
- Gradients: autograd equals the analytic partial derivatives in z, kappa and lambda, and finite differences
  (gradcheck); the lambda-gradient is the exact one, not the official custom backward's (which has the wrong sign
  at the reference point).
- Numerics: fp32 / bf16 at |z| up to 1e30 and lambda at both constraint floors give finite values and gradients.
- Parameters: the official init ranges and lambda constraints per variant, per-channel broadcasting, weight decay 0
  for kappa / lambda in both parameter-group modes of deit_lt.optim.
- Models: an AGLU DeiT and an SE-APA ResNet-32 learn on a fixed batch with non-zero kappa / lambda gradients; model
  files rebuild with identical logits; ResNet-32 keeps its 464,154 parameters; the SE block, the cosine classifier
  and the ResNet-50 variants have the official structure.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import deit_lt.models  # registers the students and CIFAR ResNets
import deit_lt.models.resnet_apa  # noqa: F401  (registers the ResNet-50 variants)
from deit_lt.checkpoint import save_model_file
from deit_lt.models.factory import create_model_from_checkpoint, create_model_from_meta, model_outputs
from deit_lt.models.layers import AGLU, APA, APA_INITS, SqueezeExcite
from deit_lt.models.layers.apa import aglu, apa
from deit_lt.models.resnet_cifar import CosNormClassifier
from deit_lt.optim import no_weight_decay_names, param_groups

F64 = torch.float64


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=F64)


def _closed_form(z, kappa, lam):
    return (1 + lam * torch.exp(-kappa * z)) ** (-1 / lam)


def _close(got, want, tol=1e-6):
    torch.testing.assert_close(_t(got), _t(want), rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------------------

def test_special_cases_and_reference_values():
    one = _t(1.0)
    # lambda = kappa = 1: the sigmoid, and AGLU = SiLU.
    _close(apa(_t([0.0, 1.0, -1.0]), one, one), [0.5, 0.7310586, 0.2689414])
    _close(aglu(_t(2.0), one, one), 1.7615942)
    z = torch.linspace(-6, 6, 25, dtype=F64)
    _close(aglu(z, one, one), F.silu(z), 1e-12)
    for kappa in (-2.0, 0.3, 1.7):    # lambda = 1: sigmoid(kappa z) for every kappa
        _close(apa(z, _t(kappa), one), torch.sigmoid(kappa * z), 1e-12)
    # lambda = 1, kappa = 1.702: the sigmoid approximation of GELU.
    _close(aglu(one, _t(1.702), one), 0.8457958)
    assert abs(aglu(one, _t(1.702), one).item() - F.gelu(one).item()) < 5e-3
    # The clamp floor lambda = 1e-4 is within 1e-4 of the Gumbel CDF exp(-exp(-kappa z)).
    floor = _t(1e-4)
    _close(apa(_t([0.0, 1.0]), one, floor), [0.3678978, 0.6922053])
    _close(apa(_t([0.0, 1.0]), one, floor), torch.exp(-torch.exp(-_t([0.0, 1.0]))), 1e-4)
    # lambda = 0.5, kappa = 2, z = 0.5.
    _close(apa(_t(0.5), _t(2.0), _t(0.5)), 0.7134127)
    # APA(0) = (1 + lambda) ** (-1 / lambda) whatever kappa, and AGLU'(0) = APA(0).
    for lam, want in ((0.5, 0.4444444), (2.0, 0.5773503)):
        for kappa in (-3.0, 0.5, 1.0, 7.0):
            _close(apa(_t(0.0), _t(kappa), _t(lam)), want)
            z0 = _t(0.0).requires_grad_()
            (dz,) = torch.autograd.grad(aglu(z0, _t(kappa), _t(lam)), z0)
            _close(dz, want)
    # kappa -> +inf: APA becomes a step and AGLU a ReLU.
    zs = _t([-2.0, -0.5, 0.5, 2.0])
    _close(apa(zs, _t(1e4), _t(0.7)), [0.0, 0.0, 1.0, 1.0], 1e-12)
    _close(aglu(zs, _t(1e4), _t(0.7)), F.relu(zs), 1e-12)


def test_stable_form_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, generator=g, dtype=F64) * 4
    kappa = torch.randn(400, generator=g, dtype=F64) * 1.5
    lam = torch.rand(400, generator=g, dtype=F64) * 3 + 1e-3
    torch.testing.assert_close(apa(z, kappa, lam), _closed_form(z, kappa, lam), rtol=1e-10, atol=1e-12)
    for z0, k0, l0 in ((0.5, 2.0, 0.5), (0.0, 5.0, 0.5), (0.0, -1.0, 2.0), (1.0, 1.0, 1e-4)):
        _close(apa(_t(z0), _t(k0), _t(l0)), _closed_form(_t(z0), _t(k0), _t(l0)), 1e-9)


# --------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------

def _analytic_apa_grads(z, kappa, lam):
    """d APA / d(z, kappa, lambda) with u = exp(-kappa z), D = exp(kappa z) + lambda."""
    p = _closed_form(z, kappa, lam)
    d = torch.exp(kappa * z) + lam
    u = torch.exp(-kappa * z)
    return p * kappa / d, p * z / d, p * (torch.log1p(lam * u) / lam ** 2 - 1 / (lam * d))


def test_gradient_reference_values_and_the_official_backward_error():
    z, kappa, lam = _t(1.0), _t(1.0).requires_grad_(), _t(1.0).requires_grad_()
    dkappa, dlam = torch.autograd.grad(aglu(z, kappa, lam), (kappa, lam))
    _close(dkappa, 0.1966119)
    _close(dlam, 0.0324007)
    # The official custom backward (UniRect_static) returns -z/lambda * z * APA / D for AGLU's lambda-gradient: the
    # opposite sign here. Ours must not be that.
    p = _closed_form(z, 1.0, 1.0)
    official = -(z / 1.0) * z * p / (1.0 + math.e)
    _close(official, -0.1966119)
    assert dlam.item() > 0 > official.item()


def test_autograd_equals_analytic_gradients():
    g = torch.Generator().manual_seed(1)
    n = 300
    z = (torch.randn(n, generator=g, dtype=F64) * 3).requires_grad_()
    kappa = (torch.randn(n, generator=g, dtype=F64) * 1.5).requires_grad_()
    lam = (torch.rand(n, generator=g, dtype=F64) * 3 + 1e-2).requires_grad_()
    # Elementwise parameters: the gradient of the sum is each element's partial derivative.
    gz, gk, gl = torch.autograd.grad(apa(z, kappa, lam).sum(), (z, kappa, lam))
    az, ak, al = _analytic_apa_grads(z.detach(), kappa.detach(), lam.detach())
    for got, want in ((gz, az), (gk, ak), (gl, al)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # AGLU = z * APA: d/dz = APA + z dAPA/dz, d/dkappa = z dAPA/dkappa, d/dlambda = z dAPA/dlambda.
    gz, gk, gl = torch.autograd.grad(aglu(z, kappa, lam).sum(), (z, kappa, lam))
    zd = z.detach()
    p = _closed_form(zd, kappa.detach(), lam.detach())
    for got, want in ((gz, p + zd * az), (gk, zd * ak), (gl, zd * al)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_gradcheck_functions_and_modules():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, generator=g, dtype=F64).requires_grad_()
    kappa = _t([0.7]).requires_grad_()
    lam = _t([0.4]).requires_grad_()
    assert torch.autograd.gradcheck(apa, (z, kappa, lam))
    assert torch.autograd.gradcheck(aglu, (z, kappa, lam))
    # The modules, constraints included (lambda away from the floors, where they are smooth), scalar and per-channel.
    for module, shape in ((AGLU(init='resnet'), (2, 3, 2, 2)), (APA(3, init='attention'), (2, 3, 2, 2)),
                          (AGLU(4, init='swin', channel_dim=-1), (2, 3, 4))):
        module = module.double()
        x = torch.randn(shape, generator=g, dtype=F64).requires_grad_()
        k = (module.kappa.detach().clone() + 0.1).requires_grad_()
        lm = (module.lambda_.detach().clone() + 0.2).requires_grad_()

        def fn(x_, k_, l_, m=module):
            return functional_call(m, {'kappa': k_, 'lambda_': l_}, (x_,))

        assert torch.autograd.gradcheck(fn, (x, k, lm))


# --------------------------------------------------------------------------------------------------------------
# Numerics in low precision
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_large_inputs_give_finite_values_and_gradients(dtype):
    z = torch.tensor([-1e30, -1e4, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 1e4, 1e30], dtype=dtype)
    moderate = z.abs() <= 1e4    # d AGLU / d kappa = z**2 APA / D really exceeds the float range at |z| = 1e30
    # lambda parameters: below zero (relu floor 1e-8), under the clamp floor (1e-4), ordinary and large.
    for cls, init in ((AGLU, 'resnet'), (AGLU, 'readme'), (APA, 'attention')):
        for lam in (-0.5, 1e-6, 0.5, 10.0):
            for kappa in (-2.0, 0.0, 2.0):
                m = cls(init=init)
                with torch.no_grad():
                    m.kappa.fill_(kappa)
                    m.lambda_.fill_(lam)
                out = m(z)
                assert out.dtype == dtype and torch.isfinite(out).all(), (cls.__name__, init, lam, kappa, out)
                if cls is APA:
                    assert ((out >= 0) & (out <= 1)).all()
                x = z[moderate].clone().requires_grad_()
                m(x).sum().backward()
                for t in (x.grad, m.kappa.grad, m.lambda_.grad):
                    assert torch.isfinite(t).all(), (cls.__name__, init, lam, kappa)
    # Half-precision inputs are evaluated in float32 and rounded once.
    m = AGLU(init='swin')
    x = torch.randn(64).bfloat16()
    assert torch.equal(m(x), m(x.float()).bfloat16())
    vit = timm.create_model('deit_micro_distilled_patch2_8', act_layer='aglu', num_classes=3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = vit(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------
# Parameters: inits, constraints, per-channel, weight decay
# --------------------------------------------------------------------------------------------------------------

def test_official_inits_constraints_and_defaults():
    expected = {'resnet': ((0, 1), (0.8, 1.2), 'relu'), 'attention': ((0, 1), (-1, 0), 'clamp'),
                'detection': ((0, 1), (1.0, 1.3), 'clamp'), 'swin': ((0.1, 1), (0, 1), 'relu'),
                'readme': ((0, 1), (0, 1), 'clamp')}
    assert set(APA_INITS) == set(expected)
    torch.manual_seed(0)
    for name, (lr, kr, constraint) in expected.items():
        m = APA(2000, init=name)
        assert m.lambda_constraint == constraint
        assert lr[0] <= m.lambda_.min() and m.lambda_.max() <= lr[1] and m.lambda_.max() - m.lambda_.min() > 0.8 * (
            lr[1] - lr[0])
        assert kr[0] <= m.kappa.min() and m.kappa.max() <= kr[1]
    # Defaults per use: AGLU in a ResNet, APA in an SE gate, AGLU in a ViT MLP.
    assert AGLU().init == 'resnet' and APA().init == 'attention'
    assert AGLU().kappa.shape == (1,) and AGLU().lambda_.shape == (1,)
    assert SqueezeExcite(16, gate='apa').gate.init == 'attention'
    vit = timm.create_model('deit_micro_distilled_patch2_8', act_layer='aglu', num_classes=3)
    acts = [b.mlp.act for b in vit.blocks]
    assert all(isinstance(a, AGLU) and a.init == 'swin' for a in acts) and len({id(a) for a in acts}) == 4
    by_class = timm.create_model('deit_micro_distilled_patch2_8', act_layer=AGLU, num_classes=3)
    assert by_class.blocks[0].mlp.act.init == 'swin'
    assert isinstance(timm.create_model('deit_micro_distilled_patch2_8', num_classes=3).blocks[0].mlp.act, nn.GELU)
    custom = timm.create_model('deit_micro_distilled_patch2_8_aglu', act_kwargs={'init': 'readme'}, num_classes=3)
    assert custom.blocks[0].mlp.act.init == 'readme'
    # Constraints: relu(lambda) + 1e-8 (dead below zero, as upstream) and clamp(lambda, 1e-4).
    m = AGLU(init='resnet')
    with torch.no_grad():
        m.lambda_.fill_(-0.5)
    _close(m.effective_lambda(), [1e-8], 1e-15)
    m(torch.randn(5)).sum().backward()
    assert m.lambda_.grad.abs().sum() == 0
    m = APA(init='attention')
    with torch.no_grad():
        m.lambda_.fill_(1e-6)
    _close(m.effective_lambda(), [1e-4], 1e-10)
    with pytest.raises(ValueError, match='unknown APA init'):
        APA(init='nope')


def test_per_channel_parameters_broadcast_over_the_channel_dim():
    torch.manual_seed(0)
    nchw = AGLU(3, init='swin').double()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    want = torch.stack([aglu(x[:, c], nchw.kappa[c], nchw.effective_lambda()[c]) for c in range(3)], 1)
    torch.testing.assert_close(nchw(x), want)
    nlc = APA(5, init='attention', channel_dim=-1).double()
    t = torch.randn(2, 7, 5, dtype=F64)
    want = torch.stack([apa(t[..., c], nlc.kappa[c], nlc.effective_lambda()[c]) for c in range(5)], -1)
    torch.testing.assert_close(nlc(t), want)
    with pytest.raises(ValueError, match='3 channels but the input has 4'):
        nchw(torch.randn(2, 4, 1, 1, dtype=F64))


@pytest.mark.parametrize('decay_norm_and_bias', [False, True])
def test_kappa_and_lambda_get_no_weight_decay(decay_norm_and_bias):
    models = {
        'deit': timm.create_model('deit_micro_distilled_patch2_8', act_layer='aglu', num_classes=3),
        'resnet': timm.create_model('se_resnet32_apa', num_classes=3, head_type='cosnorm'),
    }
    for key, model in models.items():
        names = no_weight_decay_names(model)
        apa_params = {n: p for n, p in model.named_parameters() if n.endswith(('.kappa', '.lambda_'))}
        assert set(apa_params) == names, key
        assert len(apa_params) == (8 if key == 'deit' else 2 * (31 + 15)), key
        groups = param_groups(model, 0.05, decay_norm_and_bias=decay_norm_and_bias)
        by_id = {id(p): g['weight_decay'] for g in groups for p in g['params']}
        assert all(by_id[id(p)] == 0.0 for p in apa_params.values()), key
        weight = model.blocks[0].mlp.fc1.weight if key == 'deit' else model.layer1[0].se.fc1.weight
        assert by_id[id(weight)] == 0.05, key


# --------------------------------------------------------------------------------------------------------------
# Models: training, checkpoints, structure
# --------------------------------------------------------------------------------------------------------------

def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if step == 0:
            acts = [m for m in model.modules() if isinstance(m, APA)]
            assert acts
            for m in acts:
                assert m.kappa.grad.abs().sum() > 0 and m.lambda_.grad.abs().sum() > 0, m
        opt.step()
        losses.append(loss.item())
    return losses


def test_aglu_deit_and_se_apa_resnet_learn_a_fixed_batch():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16) % 4
    deit = timm.create_model('deit_micro_distilled_patch2_8', act_layer='aglu', num_classes=4)
    losses = _train_steps(deit, x, y, steps=8, lr=0.02)
    assert losses[-1] < 0.7 * losses[0], losses
    resnet = timm.create_model('se_resnet32_apa', num_classes=4, head_type='cosnorm')
    losses = _train_steps(resnet, x, y, steps=8, lr=0.05)
    assert losses[-1] < 0.7 * losses[0], losses
    assert any(isinstance(m.gate, APA) for m in resnet.modules() if isinstance(m, SqueezeExcite))


@pytest.mark.parametrize('arch,kwargs,in_chans', [
    ('deit_micro_distilled_patch2_8', {'act_layer': 'aglu'}, 3),
    ('deit_micro_distilled_patch2_8_aglu', {'in_chans': 1}, 1),
    ('se_resnet32_apa', {'in_chans': 1, 'use_norm': False, 'head_type': 'cosnorm'}, 1),
    ('resnet32_aglu', {'in_chans': 3, 'use_norm': True}, 3),
])
def test_model_file_rebuilds_identical_logits(tmp_path, arch, kwargs, in_chans):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5, **kwargs)
    with torch.no_grad():    # move every parameter off its init so that a rebuilt, unloaded model would differ
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.05)
    x = torch.randn(3, in_chans, 8, 8)
    model.train()(x)         # non-trivial BN running statistics
    model.eval()
    meta = {'kind': 'teacher' if 'resnet' in arch else 'student', 'arch': arch, 'num_classes': 5,
            'model_kwargs': kwargs}
    path = save_model_file(tmp_path / 'm.safetensors', model.state_dict(), meta)
    torch.manual_seed(1)
    rebuilt, got = create_model_from_checkpoint(path)
    assert got['model_kwargs'] == kwargs
    for a, b in zip(model_outputs(model, x), model_outputs(rebuilt, x)):
        assert torch.equal(a, b)


def test_resnet32_is_unchanged_and_the_variants_add_what_they_should():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    plain = timm.create_model('resnet32', num_classes=10)
    assert count(plain) == 464_154
    assert not any(isinstance(m, (APA, SqueezeExcite)) for m in plain.modules())
    assert not any('act' in k or '.se.' in k for k in plain.state_dict())
    assert set(timm.create_model('resnet32', num_classes=10, act_layer='relu').state_dict()) == set(plain.state_dict())
    se = 5 * sum(c * (c // 4) * 2 for c in (16, 32, 64))          # two bias-free Linear layers per block
    ln = 5 * sum(2 * c for c in (16, 32, 64))
    assert count(timm.create_model('resnet32_aglu', num_classes=10)) == 464_154 + 2 * 31
    assert count(timm.create_model('se_resnet32', num_classes=10)) == 464_154 + se
    assert count(timm.create_model('se_resnet32_apa', num_classes=10)) == 464_154 + se + ln + 2 * 15 + 2 * 31
    apa_net = timm.create_model('se_resnet32_apa', num_classes=10)
    assert sum(isinstance(m, AGLU) for m in apa_net.modules()) == 31
    sig = timm.create_model('se_resnet32', num_classes=10).layer3[1].se
    assert isinstance(sig.gate, nn.Sigmoid) and isinstance(sig.norm, nn.Identity) and isinstance(sig.drop, nn.Identity)
    gated = apa_net.layer3[1].se
    assert isinstance(gated.norm, nn.LayerNorm) and gated.drop.p == 0.1 and gated.fc1.out_features == 16
    assert type(gated.gate) is APA and not isinstance(gated.act, APA)
    with pytest.raises(ValueError, match='contradicts'):
        timm.create_model('resnet32', use_norm=True, head_type='cosnorm')


def test_squeeze_excite_matches_its_definition():
    torch.manual_seed(0)
    se = SqueezeExcite(8, reduction=4, gate='apa').double().eval()    # eval: dropout off
    x = torch.randn(2, 8, 3, 3, dtype=F64)
    y = F.layer_norm(x.mean((2, 3)), (8,), se.norm.weight, se.norm.bias)
    y = F.relu(y @ se.fc1.weight.t()) @ se.fc2.weight.t()
    gate = apa(y, se.gate.kappa, se.gate.effective_lambda())
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])
    assert se.fc1.bias is None and se.fc2.bias is None


def test_cosnorm_classifier():
    torch.manual_seed(0)
    head = CosNormClassifier(6, 4).double()
    assert [n for n, _ in head.named_parameters()] == ['weight'] and head.weight.shape == (4, 6)
    assert head.weight.abs().max() <= 1 / math.sqrt(6)
    x = torch.randn(3, 6, dtype=F64) * 3
    norm = x.norm(dim=1, keepdim=True)
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(head(x), 16 * norm / (1 + norm) * cos)
    zero = torch.zeros(2, 6, dtype=F64, requires_grad=True)
    out = head(zero)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, 4, dtype=F64)) and torch.isfinite(zero.grad).all()
    m = timm.create_model('resnet32', num_classes=7, head_type='cosnorm')
    m.reset_classifier(3)
    assert isinstance(m.get_classifier(), CosNormClassifier) and m.get_classifier().out_features == 3


def test_resnet50_variants_follow_the_official_layout():
    # Stage depths cut to 1 to keep the test fast; the layout per block is what is checked.
    model = timm.create_model('se_resnet50_apa', num_classes=5, layers=(1, 1, 1, 1), head_type='cosnorm')
    assert sum(isinstance(m, AGLU) for m in model.modules()) == 1 + 3 * 4
    ses = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert [s.fc1.out_features for s in ses] == [256 // 16, 512 // 16, 1024 // 16, 2048 // 16]
    assert all(type(s.gate) is APA and isinstance(s.norm, nn.LayerNorm) for s in ses)
    assert model.layer1[0].se is ses[0] and torch.all(model.layer1[0].bn3.weight == 1)   # no zero-init of bn3
    assert isinstance(model.fc, CosNormClassifier)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    kwargs = {'layers': [1, 1, 1, 1], 'head_type': 'cosnorm'}
    rebuilt = create_model_from_meta({'arch': 'se_resnet50_apa', 'num_classes': 5, 'model_kwargs': kwargs})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    for name in ('resnet50_aglu', 'se_resnet50', 'se_resnext50_32x4d_apa', 'deit_base_distilled_patch16_224_aglu',
                 'deit_tiny_distilled_patch4_32_aglu', 'deit_small_distilled_patch4_32_aglu',
                 'deit_base_distilled_patch4_32_aglu', 'deit_micro_distilled_patch2_8_aglu'):
        assert timm.is_model(name), name
    big = timm.create_model('deit_base_distilled_patch16_224_aglu', depth=1, num_classes=3)
    assert big.patch_embed.proj.kernel_size == (16, 16) and big.blocks[0].mlp.act.init == 'swin'
