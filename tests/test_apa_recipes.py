"""The APA recipes end to end on the bundled digits_lt data (CPU): configs, schedule, training, optimizer groups,
model files and classifier re-balancing.

- Configs: the published APA teacher recipes (configs/teachers/apa/) and every AGLU / APA config load, validate and
  hold the published values; the digits and CIFAR-10-LT AGLU / APA files differ from their baselines only in the
  network (so a comparison measures the activation alone); the warmup + cosine schedule equals the official one
  (torch LinearLR then CosineAnnealingLR, stepped per epoch) at every epoch.
- Recipes, through `teachers.recipe` / `deit_lt.student` and the run loop: the SE-APA ResNet-32 teacher of
  configs/teachers/digits_lt_apa.yaml (LDAM + DRW + SAM) runs 8 updates; the same network with the published head
  and loss (cosine classifier, CE, Mixup 0.2, post-hoc IIF / prior) and the AGLU DeiT-LT student of
  configs/digits_lt/deit_lt_aglu.yaml (distilled from that SE-APA teacher) train with a decreasing loss. In the
  optimizers those recipes build (SAM around SGD, SGD, AdamW) every kappa / lambda has weight decay 0 and a
  non-zero gradient, and training moves it.
- Model files: last.safetensors rebuilds through `create_model_from_meta` and reproduces the reported test accuracy
  of every predictor, the post-hoc adjusted ones included.
- Re-balancing: tools/rebalance.py's runner works on the AGLU student (cRT, tau-norm, LWS, NCM) and on the SE-APA
  teacher (cRT, NCM); the re-balanced model files rebuild and reproduce their reported accuracy.
"""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import yaml

from conftest import REPO
from deit_lt.config import AugConfig, DataConfig, TrainConfig, load_config, to_dict
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_eval_batches
from deit_lt.engine import fit
from deit_lt.eval import evaluate
from deit_lt.models.cnn import create_teacher_model
from deit_lt.models.factory import create_model_from_checkpoint, model_predictors
from deit_lt.models.layers import APA
from deit_lt.models.resnet_cifar import CosNormClassifier
from deit_lt.optim import create_scheduler
from deit_lt.rebalance import load_rebalance_config, run_rebalance
from deit_lt.runtime import create_accelerator
from deit_lt.student import student_parts
from teachers.config import TeacherTrainConfig, validate_config
from teachers.optim import base_optimizer
from teachers.recipe import posthoc_offsets, teacher_parts

CONFIGS = REPO / 'configs'
APA_TEACHERS = sorted(p for p in (CONFIGS / 'teachers' / 'apa').glob('*.yaml') if not p.name.startswith('_'))
DIGITS_APA_TEACHERS = sorted((CONFIGS / 'teachers').glob('digits_lt_apa*.yaml'))
AGLU_STUDENTS = sorted([*(CONFIGS / 'cifar10_lt').glob('*aglu*.yaml'), *(CONFIGS / 'cifar10_lt' / 'fast').glob(
    '*aglu*.yaml'), *(CONFIGS / 'digits_lt').glob('*aglu*.yaml')])
DATA = DataConfig(name='digits_lt', imb_factor=10, val_per_class=20)
QUIET = ['wandb.mode=disabled', 'runtime.progress=false', 'runtime.log_every=1', 'runtime.eval_every=100']


def _apa_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(('.kappa', '.lambda_'))}


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------

def test_published_apa_teacher_configs_load_and_hold_the_published_recipe():
    assert {p.stem for p in APA_TEACHERS} == {'cifar100_lt_if100_se_resnet32_apa', 'imagenet_lt_se_resnet50_apa',
                                             'imagenet_lt_se_resnext50_32x4d_apa'}
    cfgs = {}
    for path in APA_TEACHERS + DIGITS_APA_TEACHERS:
        cfg = load_config(TeacherTrainConfig, path)
        validate_config(cfg)
        assert cfg.runtime.output_dir.startswith('runs/teachers/'), path
        cfgs[path.stem] = cfg

    def recipe(c):
        o, a = c.optim, c.aug
        return dict(model=c.model.name, head=c.model.kwargs.get('head_type'), use_norm=c.model.use_norm,
                    loss=c.loss.type, drw=c.loss.drw_epoch, sam=c.sam.enabled, opt=o.opt, momentum=o.momentum,
                    nesterov=o.nesterov, batch=o.batch_size, lr=o.lr, warmup_lr=o.warmup_lr, wd=o.weight_decay,
                    decay_all=o.decay_norm_and_bias, epochs=o.epochs, sched=(o.sched, o.sched_unit, o.warmup_epochs,
                                                                            o.warmup_prefix, o.min_lr),
                    aa=a.auto_augment, mix=(a.mixup, a.cutmix, a.mixup_prob, a.smoothing), posthoc=c.posthoc_adjust)

    shared = dict(head='cosnorm', use_norm=False, loss='ce', drw=None, sam=False, opt='sgd', momentum=0.9,
                  nesterov=False, lr=0.2, warmup_lr=0.002, decay_all=True, sched=('cosine', 'epoch', 3, True, 0.0),
                  mix=(0.2, 0.0, 1.0, 0.0), posthoc=['iif', 'prior'])
    assert recipe(cfgs['cifar100_lt_if100_se_resnet32_apa']) == dict(
        shared, model='se_resnet32_apa', batch=512, wd=1e-3, epochs=500, aa='cifar10')
    assert recipe(cfgs['imagenet_lt_se_resnet50_apa']) == dict(
        shared, model='se_resnet50_apa', batch=256, wd=1e-4, epochs=200, aa='imagenet')
    assert recipe(cfgs['imagenet_lt_se_resnext50_32x4d_apa']) == dict(
        shared, model='se_resnext50_32x4d_apa', batch=256, wd=1e-4, epochs=200, aa='imagenet')
    c100 = cfgs['cifar100_lt_if100_se_resnet32_apa']
    assert (c100.data.name, c100.data.imb_factor, c100.aug.crop, c100.aug.padding, c100.aug.cutout) == \
        ('cifar100_lt', 100.0, 'pad_crop', 4, 16)
    assert c100.aug.mean == (0.4914, 0.4822, 0.4465) and c100.aug.std == (0.2023, 0.1994, 0.2010)
    inet = cfgs['imagenet_lt_se_resnet50_apa']
    assert (inet.data.name, inet.aug.crop, inet.aug.interpolation, inet.aug.eval_crop_pct, inet.model.img_size) == \
        ('imagenet_lt', 'rrc', 'bilinear', 0.875, 224)
    # the recipe's network and head build as the teacher trainer builds them
    model, arch, kwargs = create_teacher_model(c100.model.name, 100, use_norm=False, **c100.model.kwargs)
    assert isinstance(model.linear, CosNormClassifier) and kwargs == {'head_type': 'cosnorm', 'in_chans': 3,
                                                                      'use_norm': False}
    assert sum(isinstance(m, APA) for m in model.modules()) == 31 + 15


def _base_of(path):
    base = yaml.safe_load(path.read_text())['base']
    return path.parent / base


@pytest.mark.parametrize('path', AGLU_STUDENTS + DIGITS_APA_TEACHERS, ids=lambda p: p.stem)
def test_aglu_and_apa_configs_change_only_the_network(path):
    """Each AGLU / APA file is its baseline file with another network (and its own name and output folder)."""
    schema = TeacherTrainConfig if 'teachers' in path.parts else TrainConfig
    cfg, base = to_dict(load_config(schema, path)), to_dict(load_config(schema, _base_of(path)))
    for c in (cfg, base):
        c.pop('name')
        c['runtime'].pop('output_dir')
    network = cfg['model'].pop('name'), base['model'].pop('name')
    assert network[0] != network[1] and timm.is_model(network[0]), network
    assert cfg == base
    if schema is TrainConfig:
        assert network[0] == network[1] + '_aglu'


def test_warmup_and_cosine_equal_the_official_schedule():
    """deit-lt's scheduler with the recipe's optim section gives, at every epoch, the lr of the official
    LinearLR(start_factor=0.01, total_iters=3) -> CosineAnnealingLR(T_max=epochs - 3) sequence."""
    for path, epochs in ((APA_TEACHERS[0], None), (APA_TEACHERS[1], None), (APA_TEACHERS[0], 7)):
        o = load_config(TeacherTrainConfig, path).optim
        if epochs is not None:
            o.epochs = epochs
        ours = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
        sched = create_scheduler(ours, o, updates_per_epoch=5)
        ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
        ref = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
            torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=0.01, total_iters=3),
            torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=o.epochs - 3, eta_min=0.0)], milestones=[3])
        got, want = [], []
        for epoch in range(o.epochs):
            sched.step(epoch)                     # the run loop: step(epoch) at every epoch start
            for u in range(5):
                sched.step_update(epoch * 5 + u + 1)
            got.append(ours.param_groups[0]['lr'])
            want.append(ref_opt.param_groups[0]['lr'])
            ref_opt.step()
            ref.step()
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12), path
        assert got[0] == pytest.approx(0.01 * o.lr) and got[3] == pytest.approx(o.lr)


# --------------------------------------------------------------------------------------------------------------
# Training through the recipes
# --------------------------------------------------------------------------------------------------------------

def _losses(out) -> list[float]:
    return [rec['train/loss'] for rec in map(json.loads, (out / 'log.jsonl').read_text().splitlines())
            if 'train/loss' in rec]


def _check_apa_optimizer(parts, optimizer) -> dict[str, torch.Tensor]:
    """Every kappa / lambda sits in a weight-decay-0 group of `optimizer` and gets a non-zero gradient from one
    micro-batch of the recipe's own loss; returns their values before training."""
    model = parts.model
    params = _apa_params(model)
    assert params
    wd = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    assert all(wd[id(p)] == 0.0 for p in params.values())
    assert any(v > 0 for v in wd.values())                  # the other weights do decay
    batch = next(iter(parts.train_batches.iter_epoch(0)))
    loss, _ = parts.loss_fn(model, parts.prepare(batch))
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in params.items()}


def _run(parts, cfg, name):
    accelerator = create_accelerator(cfg.runtime)
    return fit(parts, cfg.runtime, cfg.wandb, accelerator, name=name, epochs=cfg.optim.epochs, config=cfg)


def _decreasing(losses: list[float], k: int = 5) -> bool:
    return sum(losses[-k:]) / k < 0.9 * sum(losses[:k]) / k


@pytest.fixture(scope='module')
def apa_teacher(tmp_path_factory):
    """The digits SE-APA teacher (LDAM + DRW + SAM) after 8 updates of its own recipe: (output folder, report)."""
    out = tmp_path_factory.mktemp('apa_teacher')
    cfg = load_config(TeacherTrainConfig, CONFIGS / 'teachers' / 'digits_lt_apa.yaml',
                      QUIET + ['runtime.max_steps=8', f'runtime.output_dir={out}'])
    accelerator = create_accelerator(cfg.runtime)
    parts = teacher_parts(cfg, accelerator)
    sam = parts.optimizer
    assert type(sam).__name__ == 'SAM' and base_optimizer(sam) is not sam
    before = _check_apa_optimizer(parts, sam)
    assert all(g['weight_decay'] in (0.0, 2e-4) for g in base_optimizer(sam).param_groups)
    report = fit(parts, cfg.runtime, cfg.wandb, accelerator, name=cfg.name, epochs=cfg.optim.epochs, config=cfg)
    assert report['stopped_by'] == 'max_steps' and report['progress']['updates_done'] == 8
    after = _apa_params(parts.model)
    assert all(not torch.equal(after[n].detach(), v) for n, v in before.items())   # every kappa / lambda moved
    return out, report


def test_published_head_and_loss_train_and_their_files_reproduce_every_predictor(tmp_path):
    """se_resnet32_apa with the APA recipe's head and loss (cosine classifier, CE, Mixup 0.2, the official
    warmup + cosine) and both post-hoc adjustments, on digits."""
    cfg = load_config(TeacherTrainConfig, CONFIGS / 'teachers' / 'digits_lt_apa.yaml', QUIET + [
        'loss.type=ce', 'loss.drw_epoch=null', 'model.use_norm=false', 'model.kwargs.head_type=cosnorm',
        'sam.enabled=false', 'aug.mixup=0.2', 'optim.sched=cosine', 'optim.milestones=[]', 'optim.warmup_epochs=1',
        'optim.warmup_lr=0.001', 'optim.warmup_prefix=true', 'optim.epochs=20', 'posthoc_adjust=[iif,prior]',
        'runtime.max_steps=30', f'runtime.output_dir={tmp_path}'])
    parts = teacher_parts(cfg, create_accelerator(cfg.runtime))
    assert isinstance(parts.model.linear, CosNormClassifier) and parts.meta['logit_scale'] == 1.0
    before = _check_apa_optimizer(parts, parts.optimizer)
    report = _run(parts, cfg, cfg.name)
    after = _apa_params(parts.model)
    assert all(not torch.equal(after[n].detach(), v) for n, v in before.items())
    losses = _losses(tmp_path)
    assert len(losses) == 30 and _decreasing(losses), losses
    assert set(report['predictors']) == {'logits', 'logits_iif', 'logits_prior'}
    # the files rebuild through the factory and give the reported accuracy of each predictor
    model, meta = create_model_from_checkpoint(tmp_path / 'last.safetensors')
    assert meta['model_kwargs'] == {'head_type': 'cosnorm', 'in_chans': 1, 'use_norm': False}
    test = create_datasets(DATA)['test']
    aug = AugConfig(mean=tuple(meta['mean']), std=tuple(meta['std']))
    (x, y), = list(create_eval_batches(test, aug, img_size=8, batch_size=1024, device='cpu'))
    with torch.no_grad():
        z = model(x)
    offsets = posthoc_offsets(['iif', 'prior'], meta['train_counts'])
    for name, logits in (('logits', z), ('logits_iif', z + offsets['iif']), ('logits_prior', z + offsets['prior'])):
        top1 = 100.0 * (logits.argmax(1) == y).double().mean().item()
        assert top1 == pytest.approx(report['last']['test'][name]['top1'], abs=1e-9), name
    # the official 'raw' IIF, ln(N / n_c), is deit-lt's prior offset; 'rel' is ln((N - n_c) / n_c)
    n = torch.tensor(meta['train_counts'], dtype=torch.float64)
    assert torch.allclose(offsets['prior'].double(), torch.log(n.sum() / n), atol=1e-6)
    assert torch.allclose(offsets['iif'].double(), torch.log((n.sum() - n) / n), atol=1e-6)


@pytest.fixture(scope='module')
def aglu_student(apa_teacher, tmp_path_factory):
    """The digits AGLU DeiT-LT student distilled from the SE-APA teacher, 40 updates of its recipe (AdamW)."""
    out = tmp_path_factory.mktemp('aglu_student')
    teacher_dir, _ = apa_teacher
    cfg = load_config(TrainConfig, CONFIGS / 'digits_lt' / 'deit_lt_aglu.yaml', QUIET + [
        f'teacher.checkpoint={teacher_dir / "last.safetensors"}', 'runtime.max_steps=40', 'runtime.compile=off',
        f'runtime.output_dir={out}'])
    accelerator = create_accelerator(cfg.runtime)
    parts = student_parts(cfg, accelerator)
    assert isinstance(parts.optimizer, torch.optim.AdamW)
    assert len(_apa_params(parts.model)) == 2 * 4              # one kappa, lambda per block of the micro DeiT
    before = _check_apa_optimizer(parts, parts.optimizer)
    report = fit(parts, cfg.runtime, cfg.wandb, accelerator, name=cfg.name, epochs=cfg.optim.epochs, config=cfg)
    after = _apa_params(parts.model)
    assert all(not torch.equal(after[n].detach(), v) for n, v in before.items())
    return out, report


def test_aglu_student_distils_from_the_apa_teacher_and_its_file_reproduces(aglu_student):
    out, report = aglu_student
    losses = _losses(out)
    assert len(losses) == 40 and _decreasing(losses, k=8), losses
    model, meta = create_model_from_checkpoint(out / 'last.safetensors')
    assert meta['arch'] == 'deit_micro_distilled_patch2_8_aglu'
    assert all(type(b.mlp.act).__name__ == 'AGLU' for b in model.blocks)
    test = create_datasets(DATA)['test']
    batches = create_eval_batches(test, AugConfig(mean=tuple(meta['mean']), std=tuple(meta['std'])), img_size=8,
                                  batch_size=1024, device='cpu')
    groups = {k: list(v) for k, v in meta['splits']['groups'].items()}
    got = evaluate(model, batches, groups, 10)
    for pred in ('cls', 'dist', 'avg'):
        assert got[pred]['top1'] == pytest.approx(report['last']['test'][pred]['top1'], abs=1e-9), pred
        assert got[pred]['tail'] == pytest.approx(report['last']['test'][pred]['tail'], abs=1e-9), pred
    # two rebuilds give identical logits
    again, _ = create_model_from_checkpoint(out / 'last.safetensors')
    (x, _), = list(batches)
    with torch.no_grad():
        for a, b in zip(model_predictors(model, x).values(), model_predictors(again, x).values()):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# Classifier re-balancing (tools/rebalance.py's runner)
# --------------------------------------------------------------------------------------------------------------

def _rebalance(checkpoint, out, methods):
    over = ['wandb.mode=disabled', f'runtime.output_dir={out}', 'crt.epochs=2', 'lws.epochs=1']
    return run_rebalance(load_rebalance_config(CONFIGS / 'rebalance' / 'digits_lt.yaml', over, checkpoint=checkpoint,
                                               methods=methods))


def _reproduces(report, method, predictor):
    entry = report['methods'][method]
    model, meta = create_model_from_checkpoint(entry['model_file'])
    assert meta['kind'] == 'rebalanced' and meta['rebalance']['method'] == method
    test = create_datasets(DATA)['test']
    batches = create_eval_batches(test, AugConfig(mean=tuple(meta['mean']), std=tuple(meta['std'])), img_size=8,
                                  batch_size=1024, device='cpu')
    got = evaluate(model, batches, {k: list(v) for k, v in meta['splits']['groups'].items()}, 10)
    assert got[predictor]['top1'] == pytest.approx(entry['test'][predictor]['top1'], abs=1e-6), (method, predictor)
    return model


def test_rebalance_works_on_the_aglu_student(aglu_student, tmp_path):
    out, _ = aglu_student
    report = _rebalance(out / 'last.safetensors', tmp_path, 'crt,tau_norm,lws,ncm')
    assert report['heads'] == ['cls', 'dist'] and set(report['methods']) == {'crt', 'tau_norm', 'lws', 'ncm'}
    for method in ('crt', 'tau_norm', 'lws'):
        model = _reproduces(report, method, 'avg')
        assert sum(type(m).__name__ == 'AGLU' for m in model.modules()) == 4
    assert all(math.isfinite(v['top1']) for v in report['methods']['ncm']['test'].values())


def test_rebalance_works_on_the_apa_teacher(apa_teacher, tmp_path):
    out, _ = apa_teacher
    report = _rebalance(out / 'last.safetensors', tmp_path, 'crt,ncm')
    assert report['heads'] == ['logits'] and set(report['methods']) == {'crt', 'ncm'}
    model = _reproduces(report, 'crt', 'logits')            # cRT's linear head replaces the cosine (LDAM) one
    assert isinstance(model.linear, torch.nn.Linear) and len(_apa_params(model)) == 2 * (31 + 15)
    assert math.isfinite(report['methods']['ncm']['test']['feat']['top1'])
