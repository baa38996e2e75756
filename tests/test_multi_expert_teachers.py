"""RIDE, MDCS and SHIKE as teachers: their configs, each method through the teacher recipe, the stage-2 runs, and a
DeiT-LT student distilled from a RIDE teacher.

- Every config under configs/teachers/{ride,mdcs,shike}/ and the digits_lt demo configs loads, validates, builds its
  method on its model (so `loss.kwargs` are checked too), and each stage-2 config starts from its stage-1 config's
  model file; the configs' learning-rate schedules equal the official ones.
- Each method trains one epoch of its digits_lt demo config through `teachers.recipe.train_teacher` and reports in
  the common schema, with one predictor per expert beside the ensemble ('logits'); model files record logit scale
  1 (the multi-expert models scale their cosines themselves).
- 'ride_router' and 'shike_stage2' start from the stage-1 files: frozen experts / backbone stay bit-identical, the
  router / stage-2 heads train; the router run's average number of experts per sample is checked against
  `forward_routed` on the validation split.
- `tools/train.py` distils a DeiT-LT student from the RIDE teacher for one epoch; the teacher adapter gives the
  ensemble logits, or the routed ones with `teacher.routed`.
These runs check plumbing and schema, not accuracy (the measured accuracies are in README).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from deit_lt.cli import run_tool
from deit_lt.config import AugConfig, DataConfig, load_config
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_eval_batches
from deit_lt.data.lt_datasets import lt_class_counts
from deit_lt.checkpoint import read_model_meta
from deit_lt.errors import CheckpointError, ConfigError
from deit_lt.models.cnn import create_teacher_model
from deit_lt.models.factory import create_model_from_checkpoint
from deit_lt.models.teacher import TeacherAdapter, load_teacher
from deit_lt.optim import create_scheduler, scaled_lr
from deit_lt.runtime import create_accelerator
from teachers.config import TeacherTrainConfig, validate_config
from teachers.methods import get_method
from teachers.recipe import teacher_parts, train_teacher
from teachers.ride import routed_outputs
from teachers.shike import shike_lr

TEACHERS = REPO / 'configs' / 'teachers'
CONFIGS = sorted(p for d in ('ride', 'mdcs', 'shike') for p in (TEACHERS / d).glob('[!_]*.yaml'))
METHODS = ('ride', 'ride_router', 'mdcs', 'shike', 'shike_stage2')
DIGITS = {name: TEACHERS / f'digits_lt_{name}.yaml' for name in METHODS}
STAGE2_SUFFIXES = ('_router', '_stage2')
# one epoch of each demo config, evaluated once
ONE_EPOCH = ['optim.epochs=1', 'optim.warmup_epochs=0', 'runtime.eval_every=1', 'runtime.progress=false',
             'wandb.mode=disabled']
STAGE1_OVERRIDES = {'ride': ['loss.drw_epoch=0', 'optim.milestones=[1]'], 'mdcs': ['optim.milestones=[1]'],
                    'shike': []}


def _stage1_config(path: Path) -> Path | None:
    for suffix in STAGE2_SUFFIXES:
        if path.stem.endswith(suffix):
            return path.with_name(path.stem[:-len(suffix)] + '.yaml')
    return None


def _classes(cfg: TeacherTrainConfig) -> tuple[int, list[int]]:
    num_classes = {'cifar10_lt': 10, 'cifar100_lt': 100, 'imagenet_lt': 1000, 'digits_lt': 10}[cfg.data.name]
    return num_classes, lt_class_counts(500, num_classes, cfg.data.imb_factor)


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('path', CONFIGS + list(DIGITS.values()), ids=lambda p: f'{p.parent.name}/{p.stem}')
def test_config_loads_validates_and_builds_its_method(path, tmp_path):
    cfg = load_config(TeacherTrainConfig, path)
    assert cfg.loss.type in METHODS and not cfg.sam.enabled      # no published recipe uses SAM
    # '<dataset>[_if<N>]_<method>...' run names: tools/collect_results.py reads the table row from them
    family = path.parent.name if path.parent.name != 'teachers' else cfg.loss.type.split('_')[0]
    assert cfg.name.startswith(f'{cfg.data.name}_') and f'_{family}' in cfg.name
    stage1 = _stage1_config(path)
    if stage1 is not None:
        # a stage-2 config starts from the last model file of the stage-1 config it is named after
        first = load_config(TeacherTrainConfig, stage1)
        assert cfg.model.init_from == f'{first.runtime.output_dir}/last.safetensors'
        assert first.loss.type == {'ride_router': 'ride', 'shike_stage2': 'shike'}[cfg.loss.type]
        assert (cfg.data.name, cfg.data.imb_factor) == (first.data.name, first.data.imb_factor)
        stand_in = tmp_path / 'stage1.safetensors'
        stand_in.write_bytes(b'')
        cfg.model.init_from = str(stand_in)                    # validation checks that the file exists
    else:
        assert cfg.model.init_from is None
    validate_config(cfg)
    method_cls = get_method(cfg.loss.type)
    assert method_cls.cosine_logits is False                    # model files record logit scale 1
    num_classes, counts = _classes(cfg)
    use_norm = cfg.model.use_norm if cfg.model.use_norm is not None else method_cls.default_use_norm
    with torch.device('meta'):                                  # structure only: no weights are initialised
        model, _, _ = create_teacher_model(cfg.model.name, num_classes, use_norm=use_norm, **cfg.model.kwargs)
    method_cls(cfg, counts, model)                              # checks the model kind and loss.kwargs


def _lrs(path: Path, epochs: int | None = None) -> list[float]:
    cfg = load_config(TeacherTrainConfig, path)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=scaled_lr(cfg.optim))
    scheduler = create_scheduler(optimizer, cfg.optim, updates_per_epoch=7)
    out = []
    for epoch in range(epochs or cfg.optim.epochs):
        scheduler.step(epoch)
        for update in range(7):         # the run loop also calls step_update; epoch-wise schedules ignore it
            scheduler.step_update(epoch * 7 + update)
        out.append(optimizer.param_groups[0]['lr'])
    return out


def test_config_schedules_are_the_official_ones():
    # SHIKE: stage 1 (180 epochs) and stage 2 (20) as two runs give the official 200-epoch schedule
    shike = (_lrs(TEACHERS / 'shike' / 'cifar100_lt_if100.yaml')
             + _lrs(TEACHERS / 'shike' / 'cifar100_lt_if100_stage2.yaml'))
    assert len(shike) == 200
    assert shike == pytest.approx([shike_lr(e) for e in range(200)], rel=1e-9, abs=1e-12)
    # RIDE CIFAR stage 1: 0.1 (e + 1) / 5 warm-up, x0.01 from epoch 160, x1e-4 from 180 (1-based 161 / 181)
    ride = _lrs(TEACHERS / 'ride' / 'cifar100_lt_if100.yaml')
    assert ride[:6] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert ride[159:161] == pytest.approx([0.1, 1e-3]) and ride[179:181] == pytest.approx([1e-3, 1e-5])
    # RIDE router: torch's CosineAnnealingLR(T_max=5) stepped per epoch
    router = _lrs(TEACHERS / 'ride' / 'cifar100_lt_if100_router.yaml')
    assert router == pytest.approx([0.01 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)])
    # MDCS CIFAR-10-LT IF100: 20 warm-up epochs, x0.1 from 200, 320, 380
    mdcs = _lrs(TEACHERS / 'mdcs' / 'cifar10_lt_if100.yaml')
    assert [mdcs[e] for e in (0, 19, 199, 200, 320, 380, 399)] == pytest.approx([0.005, 0.1, 0.1, 0.01, 1e-3, 1e-4,
                                                                                  1e-4])
    # MDCS ImageNet-LT: cosine to 0 over 180 epochs, no warm-up
    imagenet = _lrs(TEACHERS / 'mdcs' / 'imagenet_lt_resnext50.yaml', epochs=3)
    assert imagenet == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 180)) / 2 for e in range(3)])


# ----------------------------------------------------------------------------------------------------------------
# Training through the teacher recipe
# ----------------------------------------------------------------------------------------------------------------
def _train(name: str, out: Path, *overrides: str) -> dict:
    cfg = load_config(TeacherTrainConfig, DIGITS[name], [*ONE_EPOCH, f'runtime.output_dir={out}', *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        return train_teacher(cfg)


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
    """One epoch of each stage-1 demo config: {method: (output folder, report)}."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)           # module scope: the per-test fixture is not active yet
    try:
        runs = {}
        for name, overrides in STAGE1_OVERRIDES.items():
            out = tmp_path_factory.mktemp(name) / 'run'
            runs[name] = out, _train(name, out, *overrides)
        return runs
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope='module')
def stage2(stage1, tmp_path_factory):
    """One epoch of 'ride_router' and 'shike_stage2' from the stage-1 files: {method: (output folder, report)}."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, first in (('ride_router', 'ride'), ('shike_stage2', 'shike')):
            out = tmp_path_factory.mktemp(name) / 'run'
            runs[name] = out, _train(name, out, f'model.init_from={stage1[first][0] / "last.safetensors"}')
        return runs
    finally:
        torch.set_num_threads(n)


def _check_report(report: dict, out: Path, arch: str, method: str, routed: bool = False) -> None:
    experts = ['expert0', 'expert1', 'expert2'] + (['routed'] if routed else [])   # a router adds its prediction
    assert report['report_version'] == 2 and report['finished'] and report['kind'] == 'teacher'
    assert report['arch'] == arch and report['headline'] == 'logits' and report['select_on'] == 'val'
    assert report['predictors'] == ['logits', *experts]
    for split in ('val', 'test'):
        last = report['last'][split]
        assert set(p for p in last if isinstance(last[p], dict)) == {'logits', *experts}
        assert (1.0 <= last['experts_used'] <= 3.0) if routed else 'experts_used' not in last
        for metrics in (last[p] for p in ('logits', *experts)):
            assert all(0.0 <= metrics[k] <= 100.0 for k in ('top1', 'top5', 'head', 'mid', 'tail'))
            assert len(metrics['per_class']) == 10
    record = report['history'][0]
    assert set(record['val']) == {'logits', *experts} and math.isfinite(record['train']['loss'])
    meta = read_model_meta(out / 'last.safetensors')
    assert meta['kind'] == 'teacher' and meta['arch'] == arch and meta['logit_scale'] == 1.0
    assert meta['config']['loss']['type'] == method
    assert (out / 'best.safetensors').is_file() and (out / 'per_class_accuracy.png').is_file()


@pytest.mark.parametrize('method,arch,stats', [
    ('ride', 'ride_resnet32', {'ldam', 'diversity', 'acc'}),
    ('mdcs', 'mdcs_resnet32', {'ce', 'cs', 'cis', 'acc'}),
    ('shike', 'shike_resnet32', {'ce', 'hns', 'mutual', 'acc'}),
])
def test_stage1_method_trains_and_reports_per_expert(stage1, method, arch, stats):
    out, report = stage1[method]
    _check_report(report, out, arch, method)
    assert stats <= set(report['history'][0]['train'])
    if method == 'ride':
        assert report['history'][0]['drw'] is True and report['history'][0]['class_temperatures'] is True
    if method == 'mdcs':
        assert report['history'][0]['cs_factor'] == pytest.approx(0.6 / 2)       # ramp of 2 epochs, epoch 0
    # the recorded ensemble accuracy is the rebuilt model's: mean of the experts, no extra scale
    model, meta = create_model_from_checkpoint(out / 'last.safetensors')
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        experts = model(x, return_experts=True)['logits']
        assert torch.allclose(model(x), experts.mean(0), atol=1e-5)
        assert experts.abs().max() <= 30.0 + 1e-3                # 30 x cosine


def test_ride_router_starts_from_stage1_and_reports_experts_used(stage1, stage2):
    first, _ = stage1['ride']
    out, report = stage2['ride_router']
    _check_report(report, out, 'ride_resnet32', 'ride_router', routed=True)
    train = report['history'][0]['train']
    assert {'router_bce', 'router_positive', 'experts_used', 'acc'} <= set(train)
    assert 1.0 <= train['experts_used'] <= 3.0
    before, after = load_file(first / 'last.safetensors'), load_file(out / 'last.safetensors')
    for key, value in after.items():
        if key.startswith('router.'):
            continue
        assert torch.equal(value, before[key]), key            # experts and BN statistics frozen
    assert read_model_meta(out / 'last.safetensors')['model_kwargs']['router'] is True
    # routed inference on the validation split: forward_routed equals the routing of one full pass
    model, _ = create_model_from_checkpoint(out / 'last.safetensors')
    val = create_datasets(DataConfig(name='digits_lt', imb_factor=10, val_per_class=20))['val']
    (x, _), = list(create_eval_batches(val, AugConfig(), img_size=8, batch_size=400, device='cpu'))
    with torch.no_grad():
        # a router bias that stops about half of the samples, so that both paths are exercised
        full = model(x, return_experts=True)
        model.router.fc.bias -= full['router_logits'][0].median()
        full = model(x, return_experts=True)
        logits, used = model.forward_routed(x)
    expected_logits, expected_used = routed_outputs(full['logits'], full['router_logits'])
    assert torch.equal(used, expected_used) and torch.allclose(logits, expected_logits, atol=1e-4)
    assert 1.0 < used.float().mean().item() < 3.0


def test_shike_stage2_starts_from_stage1(stage1, stage2):
    first, _ = stage1['shike']
    out, report = stage2['shike_stage2']
    _check_report(report, out, 'shike_resnet32', 'shike_stage2')
    assert 'balanced_ce' in report['history'][0]['train']
    before, after = load_file(first / 'last.safetensors'), load_file(out / 'last.safetensors')
    assert not bool(before['use_retrained_heads']) and bool(after['use_retrained_heads'])
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    heads = {f'rt_classifiers.{i}.weight' for i in range(3)}
    assert heads <= changed and 'use_retrained_heads' in changed
    # everything else that moved is a BatchNorm statistic (the official stage 2 keeps BN in train mode)
    assert all(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) for k in changed - heads
               - {'use_retrained_heads'})
    model, _ = create_model_from_checkpoint(out / 'last.safetensors')
    assert model.stage == 2                                     # predicts with the heads it was evaluated with


def test_stage2_methods_refuse_what_they_cannot_train(stage1, tmp_path):
    accelerator = create_accelerator(load_config(TeacherTrainConfig, DIGITS['ride']).runtime)
    first = stage1['ride'][0] / 'last.safetensors'

    def parts(name, *overrides):
        cfg = load_config(TeacherTrainConfig, DIGITS[name], [f'runtime.output_dir={tmp_path / "x"}', *overrides])
        return teacher_parts(cfg, accelerator)

    with pytest.raises(ConfigError, match='model.init_from'):
        parts('ride_router', 'model.init_from=null')
    with pytest.raises(ConfigError, match='router: true'):
        parts('ride_router', f'model.init_from={first}', 'model.kwargs={}')
    with pytest.raises(CheckpointError, match='experts'):
        parts('ride_router', f'model.init_from={stage1["shike"][0] / "last.safetensors"}')
    with pytest.raises(ConfigError, match='shike_resnet32'):
        parts('shike', 'model.name=ride_resnet32')
    with pytest.raises(ConfigError, match='multi-expert'):
        parts('ride', 'model.name=resnet32')
    with pytest.raises(ConfigError, match='loss.kwargs'):
        parts('mdcs', 'loss.kwargs.tau=2')


# ----------------------------------------------------------------------------------------------------------------
# As a DeiT-LT teacher
# ----------------------------------------------------------------------------------------------------------------
def test_deit_lt_student_distils_from_a_ride_teacher(stage1, tmp_path):
    teacher_file = stage1['ride'][0] / 'last.safetensors'
    teacher, meta = load_teacher(teacher_file, num_classes=10, in_chans=1)
    assert meta['logit_scale'] == 1.0 and meta['use_norm'] is True
    x = torch.randn(6, 1, 8, 8)
    adapter = TeacherAdapter(teacher, 8, (meta['mean'], meta['std']),
                             logit_scale=float(meta['logit_scale']))
    with torch.no_grad():
        assert torch.allclose(adapter(x), teacher(x, return_experts=True)['logits'].mean(0), atol=1e-5)

    tool = REPO / 'tools' / 'train.py'
    spec = importlib.util.spec_from_file_location('train_tool', tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / 'student'
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_tool(module.main, ['--config', str(REPO / 'configs' / 'digits_lt' / 'deit_lt.yaml'),
                                      f'teacher.checkpoint={teacher_file}', 'teacher.logit_scale=auto',
                                      'optim.epochs=1', 'distill.drw_epoch=0', 'runtime.eval_every=1',
                                      'runtime.progress=false', 'wandb.mode=disabled',
                                      f'runtime.output_dir={out}'])
    assert code == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['finished'] and set(report['predictors']) == {'cls', 'dist', 'avg'}
    assert math.isfinite(report['history'][0]['train']['loss'])


def test_routed_teacher_adapter(stage2):
    out, _ = stage2['ride_router']
    teacher, meta = load_teacher(out / 'last.safetensors', num_classes=10, in_chans=1)
    norm = (meta['mean'], meta['std'])
    routed = TeacherAdapter(teacher, 8, norm, routed=True)
    plain = TeacherAdapter(teacher, 8, norm)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(routed(x), teacher.forward_routed(x)[0], atol=1e-5)
        assert torch.allclose(plain(x), teacher(x), atol=1e-5)
