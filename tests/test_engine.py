"""Training engine: the teacher sees exactly the student's mixed batch; the teacher adapter's resize / renormalise /
class-map; accumulation windows."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import deit_lt.models  # noqa: F401
from deit_lt.config import AugConfig, DataConfig
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_train_batches
from deit_lt.data.samplers import create_sampler
from deit_lt.engine import EpochState, TeacherAdapter, _windows, train_one_epoch
from deit_lt.losses import DistillationLoss


class RecordingTeacher(torch.nn.Module):
    """A CNN-shaped stand-in that records what it is fed."""

    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, num_classes)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(self.conv(x).mean((2, 3)))


def _setup(teacher_input='mixed', steps=2):
    data = create_datasets(DataConfig(name='digits_lt', imb_factor=10))
    tr = data['train']
    aug = AugConfig(placement='loader', num_workers=0, rand_augment=None)
    sampler = create_sampler('repeated_aug', tr.targets, seed=0)
    batches = create_train_batches(tr, aug, img_size=8, batch_size=16, device='cpu', sampler=sampler, seed=0,
                                   return_clean=teacher_input == 'clean')
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1)
    model.set_distilled_training(True)
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    sched = CosineLRScheduler(opt, t_initial=100, t_in_epochs=False)
    rec = RecordingTeacher()
    teacher = TeacherAdapter(rec, None, ((0.5,), (0.5,)))
    crit = DistillationLoss(tr.train_counts, distill='hard', drw_epoch=5)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    return model, opt, sched, rec, teacher, crit, mix, batches


def _spy(batches, attr='x'):
    """Record the `attr` tensor of every batch the engine draws."""
    seen, orig = [], batches.iter_epoch

    def spy(epoch, start_step=0):
        for b in orig(epoch, start_step):
            seen.append(getattr(b, attr).clone())
            yield b
    batches.iter_epoch = spy
    return seen


def _record_inputs(model):
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_teacher_receives_the_mixed_student_batch():
    model, opt, sched, rec, teacher, crit, mix, batches = _setup()
    student_inputs, raw = _record_inputs(model), _spy(batches)
    state = EpochState(epoch=0)
    train_one_epoch(model, crit, batches, opt, sched, Accelerator(cpu=True), state, teacher=teacher,
                    mixup_fn=mix, max_updates=3, log_every=1)
    assert len(rec.seen) == len(student_inputs) == 3
    for t_in, s_in, x in zip(rec.seen, student_inputs, raw):
        assert torch.equal(t_in, s_in)              # the very same tensor values the student saw
        assert not torch.equal(s_in, x)             # ... which is the mixed batch, not the raw augmented one
        # Mixup/CutMix in batch mode pairs sample i with B-1-i: every mixed pixel lies between the two sources
        lo, hi = torch.minimum(x, x.flip(0)), torch.maximum(x, x.flip(0))
        assert ((s_in >= lo - 1e-5) & (s_in <= hi + 1e-5)).all()
    assert state.updates == 3 and state.step == 3


def test_clean_teacher_input_ablation():
    model, opt, sched, rec, teacher, crit, mix, batches = _setup('clean')
    cleans = _spy(batches, 'x_clean')
    train_one_epoch(model, crit, batches, opt, sched, Accelerator(cpu=True), EpochState(epoch=0), teacher=teacher,
                    teacher_input='clean', mixup_fn=mix, max_updates=2)
    assert all(torch.equal(a, b) for a, b in zip(rec.seen, cleans))


def test_drw_phase_turns_mixup_off():
    model, opt, sched, rec, teacher, crit, mix, batches = _setup()
    student_inputs, raw = _record_inputs(model), _spy(batches)
    state = EpochState(epoch=5)   # drw_epoch=5
    train_one_epoch(model, crit, batches, opt, sched, Accelerator(cpu=True), state, teacher=teacher,
                    mixup_fn=mix, no_mixup_drw=True, max_updates=2)
    assert crit.drw_active
    assert all(torch.equal(s, x) for s, x in zip(student_inputs, raw))
    assert all(torch.equal(t, x) for t, x in zip(rec.seen, raw))


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
    assert [_windows(10, 4, s) for s in range(10)] == [(4, False)] * 3 + [(4, True)] + [(4, False)] * 3 + \
        [(4, True), (2, False), (2, True)]
