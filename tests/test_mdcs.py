"""MDCS: the loss (teachers/mdcs.py) and its 3-expert network (deit_lt/models/multi_expert.py `mdcs_resnet32`).

Reference values were computed with the official `MDCSLoss` (fistyee/MDCS@1a1d54e `model/loss.py`) on the same
inputs: 3 classes, n = (100, 10, 1). Its 1-based epochs are 0-based here (1-based 1 / 10 / 20 = 0-based 0 / 9 / 19).
Also checked: which view each gradient reaches, an empty CIS set, that inference uses raw logits (no priors), both
views in one batch, the parameter count, and a safetensors round trip through timm.create_model.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from deit_lt.checkpoint import save_model_file
from deit_lt.models.factory import create_model_from_checkpoint
from deit_lt.models.multi_expert import convert_official_state_dict
from teachers.mdcs import MDCSLoss, cis_masks, forward_two_views, mdcs_prior_offsets

COUNTS = (100, 10, 1)
TOL = 1e-5


def test_prior_offsets():
    off = mdcs_prior_offsets(COUNTS)
    assert off[0].tolist() == pytest.approx([-2.302585, -1.151293, 0.0], abs=TOL)
    assert off[1].tolist() == pytest.approx([4.605170, 2.302585, 0.0], abs=TOL)
    assert off[2].tolist() == pytest.approx([11.512925, 5.756463, 0.0], abs=TOL)
    with pytest.raises(ValueError):
        mdcs_prior_offsets((5, 0, 1))


def test_ce_of_zero_logits_per_expert():
    off = mdcs_prior_offsets(COUNTS)
    for y, expected in ((2, (0.347997, 4.709530, 11.516093)), (0, (2.650582, 0.104360, 0.003167))):
        ce = [float(F.cross_entropy(off[k:k + 1], torch.tensor([y]))) for k in range(3)]
        assert ce == pytest.approx(expected, abs=TOL)


def _oracle_views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B = 2, y = (0, 2): every raw logit 0 except the strong view of sample 1, (0, 1, 0) in all experts."""
    weak = torch.zeros(3, 2, 3)
    strong = torch.zeros(3, 2, 3)
    strong[:, 0] = torch.tensor([0.0, 1.0, 0.0])
    return weak, strong, torch.tensor([0, 2])


def test_full_loss_oracle():
    weak, strong, y = _oracle_views()
    off = mdcs_prior_offsets(COUNTS)
    assert cis_masks(weak + off.unsqueeze(1), y).int().tolist() == [[0, 1], [1, 0], [1, 0]]
    # per expert (a one-exponent loss is expert k alone): CE over the 4 rows and the CIS-averaged KL
    ce, kl = [], []
    for k, q in enumerate((-0.5, 1.0, 2.5)):
        one = MDCSLoss(COUNTS, prior_exponents=(q,))
        _, parts = one(weak[k:k + 1], strong[k:k + 1], y)
        ce.append(float(parts['ce']))
        kl.append(float(parts['cs']))
    assert ce == pytest.approx([1.580475, 2.442927, 5.760980], abs=TOL)
    assert kl == pytest.approx([0.0, 0.053837, 0.002250], abs=TOL)

    loss_fn = MDCSLoss(COUNTS)
    for epoch, expected in ((0, 9.786065), (9, 9.801208), (19, 9.818034), (300, 9.818034)):
        loss_fn.set_epoch(epoch)
        loss, parts = loss_fn(weak, strong, y)
        assert float(loss) == pytest.approx(expected, abs=TOL), epoch
    assert loss_fn.cs_factor == pytest.approx(0.6)
    loss_fn.set_epoch(0)
    assert loss_fn.cs_factor == pytest.approx(0.03)
    assert float(parts['cis']) == pytest.approx(3 / 6)
    assert all(not v.requires_grad for v in parts.values())


def test_gradients_reach_the_right_views():
    g = torch.Generator().manual_seed(0)
    weak = (torch.randn(3, 6, 3, generator=g) * 3).requires_grad_(True)
    strong = (torch.randn(3, 6, 3, generator=g) * 3).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 0, 1])
    full, ce_only = MDCSLoss(COUNTS), MDCSLoss(COUNTS, cs_weight=0.0)
    full.set_epoch(19)
    loss, parts = full(weak, strong, y)
    assert float(parts['cs']) > 0
    gw, gs = torch.autograd.grad(loss, (weak, strong))
    gw_ce, gs_ce = torch.autograd.grad(ce_only(weak, strong, y)[0], (weak, strong))
    assert torch.allclose(gw, gw_ce, atol=1e-7)                # the teacher (weak view) is detached
    assert not torch.allclose(gs, gs_ce, atol=1e-4)            # the strong view gets the CS gradient
    assert gw_ce.abs().sum() > 0 and gs_ce.abs().sum() > 0     # CE reaches both views


def test_empty_cis_set_contributes_nothing():
    weak = torch.zeros(3, 2, 3)
    weak[:, :, 1] = 50.0                                       # every expert predicts class 1 ...
    strong = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])                                   # ... and no label is 1
    loss, parts = MDCSLoss(COUNTS)(weak, strong, y)
    assert float(parts['cs']) == 0.0 and float(parts['cis']) == 0.0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match='experts'):
        MDCSLoss(COUNTS)(weak[:2], strong[:2], y)


def test_inference_uses_raw_logits():
    """The oracle's raw logits give class 2; with the training priors the ensemble would say class 0."""
    raw = torch.tensor([[0.0, 0.0, 3.0], [0.0, 1.0, 2.0], [1.0, 0.0, 1.0]])
    shifted = (raw + mdcs_prior_offsets(COUNTS)).mean(0)
    assert shifted.tolist() == pytest.approx([4.9385, 2.6359, 2.0], abs=1e-4) and int(shifted.argmax()) == 0
    model = timm.create_model('mdcs_resnet32', num_classes=3).eval()
    # route the oracle's logits through the model's own ensemble code (each head returns a fixed row)
    model.expert_head = lambda feature, e: raw[e].expand(feature.shape[0], -1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8))
    assert out[0].tolist() == pytest.approx([1 / 3, 1 / 3, 2.0], abs=1e-4)
    assert out.argmax(1).tolist() == [2, 2]


def test_two_views_share_one_batch():
    torch.manual_seed(0)
    model = timm.create_model('mdcs_resnet32', num_classes=10)       # train mode: BN uses batch statistics
    g = torch.Generator().manual_seed(3)
    xw, xs = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g) * 2 + 1
    weak, strong = forward_two_views(model, xw, xs)
    assert weak.shape == strong.shape == (3, 3, 10)
    joint = model.forward_experts(torch.cat([xw, xs]))['logits']
    assert torch.allclose(weak, joint[:, :3], atol=1e-5) and torch.allclose(strong, joint[:, 3:], atol=1e-5)
    # separate passes would normalise each view with its own statistics
    assert not torch.allclose(weak, model.forward_experts(xw)['logits'], atol=1e-3)
    loss, parts = MDCSLoss([50, 30, 20, 10, 8, 6, 5, 4, 3, 2])(weak, strong, torch.tensor([0, 3, 9]))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {'ce', 'cs', 'cis'}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mdcs_resnet32_is_ride_resnet32_with_three_experts(tmp_path):
    model = timm.create_model('mdcs_resnet32', num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == 783_856 and model.num_experts == 3
    ride = timm.create_model('ride_resnet32', num_classes=100)
    assert list(model.state_dict()) == list(ride.state_dict())
    with pytest.raises(ValueError, match='exactly 3'):
        timm.create_model('mdcs_resnet32', num_classes=100, num_experts=4)
    assert timm.create_model('mdcs_resnext50_32x4d', num_classes=10).num_experts == 3
    # the official MDCS module carries three untrained heads; they are dropped on conversion
    official = {'backbone.' + k: v for k, v in model.state_dict().items()}
    official.update({'backbone.linear_head.weight': torch.zeros(48, 100), 'backbone.mlp.0.weight': torch.zeros(16, 16)})
    ride.load_state_dict(convert_official_state_dict(official), strict=True)
    # safetensors round trip through timm.create_model (num_experts recorded or not)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    for kwargs in ({}, {'num_experts': 3}):
        path = save_model_file(tmp_path / 'mdcs.safetensors', model.state_dict(),
                               {'arch': 'mdcs_resnet32', 'num_classes': 100, 'model_kwargs': kwargs})
        rebuilt, _ = create_model_from_checkpoint(path)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), model(x))
