"""Optimizers, weight-decay groups, learning-rate schedules and SAM (deit_lt/optim.py, teachers/optim.py), against
hand computations.

- SAM: two steps through the run loop's update rule equal the two-pass definition written out here (global-norm
  perturbation, gradient at the perturbed point, SGD-momentum step with weight decay from w), for both backends;
  sam-pytorch's faults (two groups, zero gradients) are guarded.
- Schedules: the teacher's per-epoch lr (CIFAR warmup + x0.01/x0.0001, cosine with and without warmup), the
  student's per-update cosine with warmup, and the SAM radius step schedule (1-based boundaries).
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from deit_lt.config import OptimConfig
from deit_lt.engine import UpdateContext
from deit_lt.errors import ConfigError
from deit_lt.optim import create_optimizer, create_scheduler, param_groups
from teachers.config import SamConfig, TeacherOptimConfig
from teachers.optim import create_sam_optimizer, sam_rho, set_rho


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _sam_steps(net, opt, update, batches, criterion):
    for x, y in batches:
        criterion(net(x), y).backward()          # the run loop's first pass
        update(UpdateContext(net, opt, None, lambda: criterion(net(x), y).backward()))
        opt.zero_grad(set_to_none=True)


def _batches(n=2):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
            for _ in range(n)]


def _reference_sam(rho, lr, mu, wd, batches, criterion):
    """SAM written out: perturb by rho g / ||g|| (one norm over all parameters), gradient there, momentum SGD
    step with weight decay at the unperturbed weights."""
    ref = [p.detach().clone() for p in _tiny_net().parameters()]
    probe = _tiny_net()

    def grads_at(params, x, y):
        with torch.no_grad():
            for p, v in zip(probe.parameters(), params):
                p.copy_(v)
        return torch.autograd.grad(criterion(probe(x), y), list(probe.parameters()))
    bufs = None
    for x, y in batches:
        g = grads_at(ref, x, y)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        g2 = grads_at([w + rho * gi / (norm + 1e-12) for w, gi in zip(ref, g)], x, y)
        d = [gi + wd * w for gi, w in zip(g2, ref)]
        bufs = d if bufs is None else [mu * b + di for b, di in zip(bufs, d)]
        ref = [w - lr * b for w, b in zip(ref, bufs)]
    return ref


@pytest.mark.parametrize('backend', ['pytorch_optimizer', 'sam_pytorch'])
def test_sam_step_equals_two_pass_definition(backend):
    rho, lr, mu, wd = 0.5, 0.1, 0.9, 1e-2
    criterion = nn.CrossEntropyLoss()
    batches = _batches()
    net = _tiny_net()
    opt, update = create_sam_optimizer(net, TeacherOptimConfig(lr=lr, momentum=mu, weight_decay=wd),
                                       SamConfig(rho=rho, backend=backend), torch.device('cpu'))
    _sam_steps(net, opt, update, batches, criterion)
    ref = _reference_sam(rho, lr, mu, wd, batches, criterion)
    moved = max((p - r0).abs().max().item() for p, r0 in zip(net.parameters(), _tiny_net().parameters()))
    assert moved > 1e-2
    for p, r in zip(net.parameters(), ref):
        # float64 weights; pytorch_optimizer accumulates the gradient norm in float32 (relative 1e-7)
        assert torch.allclose(p, r, atol=1e-8, rtol=0)
    if backend == 'pytorch_optimizer':   # the per-epoch radius lives in the param groups
        set_rho(opt, 0.0)
        assert all(gr['rho'] == 0.0 for gr in opt.param_groups)


def test_sam_backends_agree_and_resume_state():
    criterion = nn.CrossEntropyLoss()
    batches = _batches(3)
    nets = []
    for backend in ('pytorch_optimizer', 'sam_pytorch'):
        net = _tiny_net()
        opt, update = create_sam_optimizer(net, TeacherOptimConfig(lr=0.05), SamConfig(rho=0.2, backend=backend),
                                           torch.device('cpu'))
        _sam_steps(net, opt, update, batches, criterion)
        assert any('momentum_buffer' in st for st in opt.state_dict()['state'].values())  # saved for resume
        nets.append(net)
    for a, b in zip(*(n.parameters() for n in nets)):
        assert torch.allclose(a, b, atol=1e-8, rtol=0)


def test_sam_pytorch_faults_are_guarded():
    # more than one parameter group: refused with the reason
    net = _tiny_net()
    with pytest.raises(ConfigError, match='single parameter group'):
        create_sam_optimizer(net, TeacherOptimConfig(decay_norm_and_bias=False), SamConfig(backend='sam_pytorch'),
                             torch.device('cpu'))
    # a zero gradient: sam-pytorch alone would divide by ||g|| = 0 and write NaN into every weight
    net = _tiny_net()
    opt, update = create_sam_optimizer(net, TeacherOptimConfig(lr=0.1), SamConfig(rho=0.5, backend='sam_pytorch'),
                                       torch.device('cpu'))
    x = torch.randn(4, 5, dtype=torch.float64)

    def zero_loss():
        return (net(x) * 0.0).sum()
    zero_loss().backward()
    update(UpdateContext(net, opt, None, lambda: zero_loss().backward()))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # the schedule drives the optimizer the loop steps (sam-pytorch's wrapper has no 'lr' in its groups)
    sched = create_scheduler(opt, TeacherOptimConfig(lr=0.1, epochs=10, warmup_epochs=0, sched='cosine'), 1)
    sched.step(5)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.05)


def test_sam_bn_second_pass_update_or_freeze():
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def run(mode):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
        opt, update = create_sam_optimizer(net, TeacherOptimConfig(lr=0.1), SamConfig(rho=1.0, bn_second_pass=mode),
                                           torch.device('cpu'))
        _sam_steps(net, opt, update, [(x, y)], nn.CrossEntropyLoss())
        return net[1].running_mean.clone()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    net(x)                                    # one BN update at the unperturbed weights
    once = net[1].running_mean.clone()
    assert torch.allclose(run('freeze'), once, atol=1e-7)
    assert not torch.allclose(run('update'), once, atol=1e-4)   # Saddle-LongTail: a second update at w + e


def test_sam_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pytorch_optimizer', None)   # import fails as if not installed
    with pytest.raises(ConfigError, match='pytorch-optimizer'):
        create_sam_optimizer(_tiny_net(), TeacherOptimConfig(), SamConfig(), torch.device('cpu'))
    assert isinstance(create_optimizer(_tiny_net(), TeacherOptimConfig()), torch.optim.SGD)


def test_rho_schedules():
    steps = SamConfig(schedule='step', rho_steps=[0.05, 0.1, 0.5, 0.6], step_epochs=[5, 60, 75])
    got = [sam_rho(steps, e) for e in range(90)]     # e 0-based, boundaries on t = e + 1
    assert got == [0.05] * 5 + [0.1] * 55 + [0.5] * 15 + [0.6] * 15
    assert sam_rho(SamConfig(rho=0.8), 123) == 0.8


def _epoch_lrs(cfg: OptimConfig, upe: int = 1) -> list[float]:
    opt = create_optimizer(_tiny_net(), cfg)
    sched = create_scheduler(opt, cfg, upe)
    out = []
    for e in range(cfg.epochs):
        sched.step(e)
        sched.step_update(e * upe)
        out.append(opt.param_groups[0]['lr'])
    return out


def test_teacher_lr_schedules_per_epoch():
    cifar = _epoch_lrs(TeacherOptimConfig(lr=0.1, epochs=200))
    expected = [0.1 * (e + 1) / 5 if e < 5 else 0.1 if e < 160 else 1e-3 if e < 180 else 1e-5 for e in range(200)]
    assert cifar == pytest.approx(expected, rel=1e-9)
    cos = _epoch_lrs(TeacherOptimConfig(lr=0.2, epochs=90, warmup_epochs=0, sched='cosine'))
    assert cos == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 90)) for e in range(90)], rel=1e-9, abs=1e-12)
    # Saddle-LongTail's warmup then cosine: the cosine starts at the last warmup epoch
    warm_cos = _epoch_lrs(TeacherOptimConfig(lr=0.1, epochs=10, warmup_epochs=3, sched='cosine', warmup_prefix=True))
    assert warm_cos == pytest.approx([0.1 / 3, 0.2 / 3] + [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)],
                                     rel=1e-9)


def test_student_lr_schedule_per_update():
    # DeiT: linear warmup over 2 epochs from 1e-6, cosine over the whole schedule to 1e-5, stepped per update
    cfg = OptimConfig(lr=1e-3, lr_base_batch=None, epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    opt = create_optimizer(_tiny_net(), cfg)
    sched = create_scheduler(opt, cfg, updates_per_epoch=4)
    lrs = []
    for u in range(40):
        sched.step(u // 4)                        # a no-op for per-update schedules
        sched.step_update(u)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[4] == pytest.approx(1e-6 + 4 * (1e-3 - 1e-6) / 8)
    assert lrs[20] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 40)))


def test_lr_scales_with_the_global_batch():
    cfg = OptimConfig(lr=2.5e-4, lr_base_batch=1024, batch_size=2048)
    assert create_optimizer(_tiny_net(), cfg).param_groups[0]['lr'] == pytest.approx(5e-4)


def test_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    timm_style = param_groups(model, 0.05)
    assert [len(g['params']) for g in timm_style] == [2, 4]      # conv and linear weights decay; BN and biases not
    everything = param_groups(model, 2e-4, decay_norm_and_bias=True)
    assert len(everything) == 1 and len(everything[0]['params']) == 6
