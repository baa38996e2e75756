"""DeiT-LT loss and DRW weights against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from deit_lt.losses import DistillationLoss, class_balanced_weights


def test_class_balanced_weights_cifar10_if100():
    w = class_balanced_weights([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], beta=0.9999)
    expected = [0.051, 0.077, 0.121, 0.195, 0.319, 0.525, 0.868, 1.443, 2.409, 3.993]   # DeiT-LT main.py 97-101
    assert w.tolist() == pytest.approx(expected, abs=6e-4)
    assert w.sum().item() == pytest.approx(10.0, rel=1e-6)
    # by hand for two classes: r = (1-b)/(1-b^n)
    b = 0.9999
    r = [(1 - b) / (1 - b ** 10), (1 - b) / (1 - b ** 2)]
    assert class_balanced_weights([10, 2], b).tolist() == pytest.approx([2 * r[0] / sum(r), 2 * r[1] / sum(r)])
    assert class_balanced_weights([10, 2], 0.0).tolist() == [1.0, 1.0]


def _lsm(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


# a hand-made batch: 2 samples, 3 classes
CLS = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]]
DIST = [[1.0, 0.0, 0.5], [-0.5, 0.2, 1.5]]
TEACHER = [[0.1, 3.0, 0.2], [0.0, 0.1, 2.0]]       # argmax: 1, 2
SOFT_Y = [[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]         # mixed, smoothed targets
COUNTS = [100, 10, 1]


def _by_hand(drw: bool, cls_hard=None):
    if cls_hard is None:
        l_cls = sum(-sum(y * l for y, l in zip(ys, _lsm(z))) for ys, z in zip(SOFT_Y, CLS)) / 2
    else:
        l_cls = sum(-_lsm(z)[y] for y, z in zip(cls_hard, CLS)) / 2
    t = [1, 2]
    ce = [-_lsm(z)[ti] for z, ti in zip(DIST, t)]
    if drw:
        b = 0.9999
        r = [(1 - b) / (1 - b ** n) for n in COUNTS]
        w = [3 * ri / sum(r) for ri in r]
        l_dist = (w[1] * ce[0] + w[2] * ce[1]) / (w[1] + w[2])
    else:
        l_dist = sum(ce) / 2
    return 0.5 * l_cls + 0.5 * l_dist, l_cls, l_dist


@pytest.mark.parametrize('drw', [False, True])
def test_hard_distillation_loss_by_hand(drw):
    crit = DistillationLoss(COUNTS, distill='hard', alpha=0.5, drw_epoch=3, beta=0.9999)
    crit.set_epoch(3 if drw else 2)
    assert crit.drw_active == drw
    loss, parts = crit(torch.tensor(CLS), torch.tensor(DIST), torch.tensor(SOFT_Y), torch.tensor(TEACHER))
    total, l_cls, l_dist = _by_hand(drw)
    assert loss.item() == pytest.approx(total, rel=1e-6)
    assert parts['loss_cls'].item() == pytest.approx(l_cls, rel=1e-6)
    assert parts['loss_dist'].item() == pytest.approx(l_dist, rel=1e-6)


def test_drw_phase_plain_ce_on_hard_labels():
    crit = DistillationLoss(COUNTS, distill='hard', drw_epoch=0)
    crit.set_epoch(0)
    loss, _ = crit(torch.tensor(CLS), torch.tensor(DIST), torch.tensor([0, 1]), torch.tensor(TEACHER))
    assert loss.item() == pytest.approx(_by_hand(True, cls_hard=[0, 1])[0], rel=1e-6)


def test_weights_follow_the_teacher_not_the_label():
    crit = DistillationLoss(COUNTS, drw_epoch=0)
    crit.set_epoch(0)
    # same labels, teacher changes its mind: the DIST term must change its weighting
    a = crit(torch.tensor(CLS), torch.tensor(DIST), torch.tensor([0, 0]), torch.tensor(TEACHER))[1]['loss_dist']
    flipped = torch.tensor(TEACHER)[:, [2, 1, 0]]
    b = crit(torch.tensor(CLS), torch.tensor(DIST), torch.tensor([0, 0]), flipped)[1]['loss_dist']
    assert a.item() != pytest.approx(b.item())


def _drw_weights():
    b = 0.9999
    r = [(1 - b) / (1 - b ** n) for n in COUNTS]
    return [3 * ri / sum(r) for ri in r]


@pytest.mark.parametrize('drw', [False, True])
def test_soft_distillation_equals_the_official_formula_by_hand(drw):
    # val-iisc/DeiT-LT losses.py: KL(teacher || student) at temperature T summed over batch and classes, times T^2,
    # divided by B x C; under DRW the teacher's log-probabilities are scaled by w and divided by their row sum first
    T = 2.0
    crit = DistillationLoss(COUNTS, distill='soft', tau=T, drw_epoch=0 if drw else None)
    crit.set_epoch(0)
    _, parts = crit(torch.tensor(CLS), torch.tensor(DIST), torch.tensor(SOFT_Y), torch.tensor(TEACHER))
    w = _drw_weights()
    total = 0.0
    for z, t in zip(DIST, TEACHER):
        ls, lt = _lsm([v / T for v in z]), _lsm([v / T for v in t])
        if drw:
            lt = [wi * v for wi, v in zip(w, lt)]
            lt = [v / sum(lt) for v in lt]
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    assert parts['loss_dist'].item() == pytest.approx(total * T * T / (2 * 3), rel=1e-5)


@pytest.mark.parametrize('drw', [False, True])
@pytest.mark.parametrize('hard', [False, True])
def test_none_mode_equals_the_official_formula_by_hand(drw, hard):
    # the DIST head learns the ground truth: soft-target CE averaged over B; under DRW torch's CE(weight=w), i.e.
    # for probability targets sum_i sum_c w_c y_ic (-log p_ic) / B and for labels the w_{y_i}-weighted mean
    crit = DistillationLoss(COUNTS, distill='none', drw_epoch=0 if drw else None)
    crit.set_epoch(0)
    y = torch.tensor([0, 2]) if hard else torch.tensor(SOFT_Y)
    _, parts = crit(torch.tensor(CLS), torch.tensor(DIST), y)
    targets = [[1.0 if c == k else 0.0 for c in range(3)] for k in (0, 2)] if hard else SOFT_Y
    w = _drw_weights() if drw else [1.0, 1.0, 1.0]
    per = [-sum(wc * yc * lc for wc, yc, lc in zip(w, ys, _lsm(z))) for ys, z in zip(targets, DIST)]
    denom = (w[0] + w[2]) if (hard and drw) else 2
    assert parts['loss_dist'].item() == pytest.approx(sum(per) / denom, rel=1e-6)


def test_single_head_and_errors():
    crit = DistillationLoss(COUNTS)
    loss, parts = crit(torch.tensor(CLS), None, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(sum(-_lsm(z)[y] for y, z in zip([0, 1], CLS)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match='needs teacher logits'):
        crit(torch.tensor(CLS), torch.tensor(DIST), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='unknown distillation type'):
        DistillationLoss(COUNTS, distill='kd')
