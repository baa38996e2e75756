"""The student recipe's micro-step (the teacher sees exactly the student's mixed batch; clean-input ablation; the
DRW phase), the teacher adapter's resize / renormalise / class map, and the loop's accumulation windows."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import deit_lt.models  # noqa: F401
from conftest import REPO
from deit_lt.checkpoint import save_model_file
from deit_lt.config import TrainConfig, load_config
from deit_lt.data.pipeline import Batch
from deit_lt.engine import windows
from deit_lt.models.teacher import TeacherAdapter
from deit_lt.seeding import seed_step
from deit_lt.student import student_parts


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model('resnet32', num_classes=10, in_chans=1)
    meta = {'kind': 'teacher', 'arch': 'resnet32', 'num_classes': 10, 'model_kwargs': {'in_chans': 1},
            'img_size': 8, 'in_chans': 1}
    return save_model_file(tmp_path / 'teacher.safetensors', net.state_dict(), meta)


def _parts(monkeypatch, teacher_file, *overrides):
    """The digits DeiT-LT student with Mixup/CutMix on; records every tensor the teacher and the student see."""
    seen = {'teacher': [], 'student': []}
    forward = TeacherAdapter.forward

    def recording(self, x):
        seen['teacher'].append(x.detach().clone())
        return forward(self, x)
    monkeypatch.setattr(TeacherAdapter, 'forward', recording)
    cfg = load_config(TrainConfig, REPO / 'configs' / 'digits_lt' / 'deit_lt.yaml',
                      [f'teacher.checkpoint={teacher_file}', 'aug.mixup=0.8', 'aug.cutmix=1.0', 'distill.drw_epoch=5',
                       'wandb.mode=disabled', *overrides])
    parts = student_parts(cfg, Accelerator(cpu=True))
    parts.model.register_forward_pre_hook(lambda m, args: seen['student'].append(args[0].detach().clone()))
    return parts, seen


def _steps(parts, epoch, n=3):
    """(raw batch, prepared inputs) of the first `n` micro-steps of `epoch`, as the run loop makes them."""
    parts.on_epoch(epoch)
    out = []
    for step, batch in enumerate(parts.train_batches.iter_epoch(epoch)):
        if step == n:
            break
        seed_step(0, epoch, step, 0)
        raw = Batch(batch.x.clone(), batch.y.clone(), batch.x_clean)   # timm's Mixup mixes in place
        inputs = parts.prepare(batch)
        parts.loss_fn(parts.model, inputs)
        out.append((raw, inputs))
    return out


def test_teacher_receives_the_mixed_student_batch(monkeypatch, teacher_file):
    parts, seen = _parts(monkeypatch, teacher_file)
    steps = _steps(parts, epoch=0)
    assert len(seen['teacher']) == len(seen['student']) == 3
    for (batch, inputs), t_in, s_in in zip(steps, seen['teacher'], seen['student']):
        assert torch.equal(t_in, s_in) and torch.equal(s_in, inputs.x)   # the very same tensor values
        assert not torch.equal(s_in, batch.x)       # ... which is the mixed batch, not the raw augmented one
        assert inputs.targets.ndim == 2             # mixed, smoothed targets
        # Mixup/CutMix in batch mode pairs sample i with B-1-i: every mixed pixel lies between the two sources
        x = batch.x
        lo, hi = torch.minimum(x, x.flip(0)), torch.maximum(x, x.flip(0))
        assert ((s_in >= lo - 1e-5) & (s_in <= hi + 1e-5)).all()


def test_clean_teacher_input_ablation(monkeypatch, teacher_file):
    parts, seen = _parts(monkeypatch, teacher_file, 'teacher.input=clean')
    steps = _steps(parts, epoch=0, n=2)
    assert all(torch.equal(t, batch.x_clean) for t, (batch, _) in zip(seen['teacher'], steps))


def test_drw_phase_turns_mixup_off(monkeypatch, teacher_file):
    parts, seen = _parts(monkeypatch, teacher_file)
    steps = _steps(parts, epoch=5, n=2)           # drw_epoch=5
    assert parts.on_epoch(5) == {'drw': True, 'mixup': False}
    for (batch, inputs), t_in in zip(steps, seen['teacher']):
        assert torch.equal(inputs.x, batch.x) and torch.equal(t_in, batch.x)
        assert torch.equal(inputs.targets, batch.y)   # hard labels, no smoothing (CIFAR recipe)


def test_teacher_adapter_resize_renormalise_and_class_map():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = None

        def forward(self, x):
            self.seen = x
            return torch.tensor([[0.0, 1.0, 5.0, 2.0]]).expand(len(x), 4)
    inner = Fixed()
    s_norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    t_norm = ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    class_map = [3, 0, 1, 2]     # original id -> student label
    ad = TeacherAdapter(inner, 32, s_norm, t_norm, logit_scale=30.0, class_map=class_map)
    x = torch.randn(2, 3, 224, 224)
    out = ad(x)
    ref = F.interpolate(x, size=(32, 32), mode='bicubic', align_corners=False, antialias=False)
    ref = (ref * 0.25 + 0.5 - 0.4) / 0.2
    assert inner.seen.shape == (2, 3, 32, 32) and torch.allclose(inner.seen, ref, atol=1e-5)
    # teacher predicts original class 2 -> student label class_map[2] = 1
    assert out.argmax(1).tolist() == [1, 1]
    assert out[0].tolist() == [30.0, 150.0, 60.0, 0.0]
    assert not out.requires_grad
    ad.train()
    assert not inner.training   # the teacher never leaves eval mode


def test_accumulation_windows():
    # 10 micro-batches, accumulation 4 -> windows of 4, 4, 2
    assert [windows(10, 4, s) for s in range(10)] == [(4, False)] * 3 + [(4, True)] + [(4, False)] * 3 + \
        [(4, True), (2, False), (2, True)]
