"""tools/train_teacher.py end to end on the bundled digits_lt data: learning, outputs, exact resume, DDP, bad input.

The main run is the quickstart config (ResNet-32 on 8x8 digits, LDAM+DRW+SAM) with its schedule halved to 20 epochs,
through the tool's main(); the other runs shorten it to 4 epochs with the same shape of schedule; the 2-process DDP run
launches the tool as a script under `accelerate launch`. Chance is 10% on the balanced 10-class test split.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, two_cpu_processes
from deit_lt.cli import run_tool
from deit_lt.checkpoint import CheckpointError, load_model_file, read_model_meta, save_model_file
from deit_lt.config import AugConfig, ConfigError, DataConfig, load_config, to_dict
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_eval_batches
from deit_lt.eval import evaluate
from deit_lt.models.factory import create_model_from_checkpoint
from deit_lt.models.teacher import load_teacher
from teachers.config import TeacherTrainConfig, validate_config
from teachers.optim import sam_rho
from teachers.recipe import train_teacher

TOOL = REPO / 'tools' / 'train_teacher.py'
DIGITS = REPO / 'configs' / 'teachers' / 'digits_lt.yaml'
# the shipped quickstart teacher, with its 40-epoch schedule halved at the same fractions (keeps the test short)
DIGITS_20 = ['runtime.log_every=5', 'optim.epochs=20', 'loss.drw_epoch=16', 'optim.milestones=[16,18]']
SHORT = ['optim.epochs=4', 'loss.drw_epoch=2', 'optim.milestones=[2,3]', 'optim.warmup_epochs=1',
         'runtime.log_every=5', 'wandb.mode=disabled']


def _cli(args: list[str], launcher: list[str] | None = None, env_extra: dict | None = None, check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env_extra or {}))
    r = subprocess.run((launcher or [sys.executable]) + [str(TOOL)] + args, capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f'train_teacher.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
    return r


def _cfg(*overrides: str) -> TeacherTrainConfig:
    return load_config(TeacherTrainConfig, DIGITS, list(SHORT) + list(overrides))


def _main(argv: list[str]) -> int:
    """tools/train_teacher.py's main() in this process (no interpreter start-up; the DDP test runs it as a script)."""
    spec = importlib.util.spec_from_file_location('train_teacher_tool', TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_tool(mod.main, argv)


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('teacher') / 'run'
    old = os.environ.get('OMP_NUM_THREADS')
    os.environ['OMP_NUM_THREADS'] = '1'          # module scope: the per-test fixture is not active yet
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert _main(['--config', str(DIGITS), *DIGITS_20, f'runtime.output_dir={out}']) == 0
    finally:
        torch.set_num_threads(n)
        if old is None:
            os.environ.pop('OMP_NUM_THREADS')
        else:
            os.environ['OMP_NUM_THREADS'] = old
    return out, buf.getvalue()


def test_cli_run_learns_and_writes_outputs(cli_run):
    out, stdout = cli_run
    assert '[teacher] digits_lt_ldam_drw_sam: final after 300 updates' in stdout and 'LDAM+DRW@16+SAM' in stdout
    report = json.loads((out / 'report.json').read_text())
    assert report['progress']['epochs_done'] == 20 and len(report['history']) == 20 and report['finished']
    assert report['last']['test']['logits']['top1'] > 60.0, report['last']['test']     # chance: 10%
    assert report['best']['split'] == 'val' and report['best']['predictor'] == 'logits'
    # The schedule that ran: 2 warmup epochs, DRW from 0-based epoch 16, x0.01 from 16 and x0.0001 from 18.
    hist = report['history']
    assert [h['drw'] for h in hist] == [False] * 16 + [True] * 4
    assert [h['lr'] for h in hist] == pytest.approx([0.05] + [0.1] * 15 + [1e-3] * 2 + [1e-5] * 2)
    assert all(h['rho'] == 0.1 for h in hist)
    # The DRW phase (with its lr decay) lifts the tail: mean tail accuracy of the 4 DRW epochs against the 4 before.
    # Single epochs at lr 0.1 swing by 10+ points between CPU instruction sets; the 4-epoch means were
    # 44.0 -> 54.8 (default), 34.6 -> 45.8 (avx2), 30.2 -> 51.2 (avx512).
    tail = [h['test']['logits']['tail'] for h in hist]
    assert sum(tail[16:]) / 4 > sum(tail[12:16]) / 4 + 5, tail
    for f in ('config.yaml', 'class_counts.json', 'best.safetensors', 'last.safetensors', 'per_class_accuracy.png',
              'log.jsonl'):
        assert (out / f).is_file(), f
    counts = json.loads((out / 'class_counts.json').read_text())
    assert counts['train_counts'] == [114, 88, 68, 52, 40, 31, 24, 19, 14, 11]
    again = load_config(TeacherTrainConfig, out / 'config.yaml')
    assert to_dict(again) == to_dict(load_config(TeacherTrainConfig, DIGITS, [*DIGITS_20, f'runtime.output_dir={out}']))
    logged = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert any('test/logits_top1' in rec for rec in logged) and any('train/loss' in rec for rec in logged)


def test_teacher_model_files_describe_and_reproduce_the_teacher(cli_run):
    out, _ = cli_run
    best, last = read_model_meta(out / 'best.safetensors'), read_model_meta(out / 'last.safetensors')
    for meta, which in ((best, 'best'), (last, 'last')):
        assert meta['kind'] == 'teacher' and meta['checkpoint'] == which
        assert meta['arch'] == 'resnet32' and meta['num_classes'] == 10
        assert meta['model_kwargs'] == {'in_chans': 1, 'use_norm': True}
        assert meta['img_size'] == 8 and meta['in_chans'] == 1 and meta['use_norm'] is True
        assert meta['logit_scale'] == 30.0
        assert meta['mean'] == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and len(meta['std']) == 1
        assert meta['train_counts'] == [114, 88, 68, 52, 40, 31, 24, 19, 14, 11]
        assert meta['class_names'] == [str(i) for i in range(10)] and meta['class_map'] is None
        assert meta['dataset'] == {'name': 'digits_lt', 'imb_factor': 10.0}
        assert meta['config']['loss']['type'] == 'ldam'
        assert set(meta['metrics']) == {'test', 'val'}
    assert best['selection']['split'] == 'val' and best['epoch'] == best['selection']['epoch']
    assert last['epoch'] == 19 and last['finished']                     # 0-based: the 20th epoch
    # The loaded teacher reproduces the recorded test accuracy of its epoch.
    teacher, meta = load_teacher(out / 'best.safetensors', num_classes=10, in_chans=1)
    assert meta['logit_scale'] == 30.0 and meta['mean'] == best['mean']
    test = create_datasets(DataConfig(name='digits_lt', imb_factor=10, val_per_class=10))['test']
    batches = create_eval_batches(test, AugConfig(mean=tuple(meta['mean']), std=tuple(meta['std'])), img_size=8,
                                  batch_size=400, device='cpu')
    report = evaluate(teacher, batches, test.splits.groups, 10)
    assert report['logits']['top1'] == pytest.approx(best['metrics']['test']['logits']['top1'], abs=1e-9)
    model, _ = create_model_from_checkpoint(out / 'last.safetensors')       # the student's factory rebuilds it
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_resume_auto_continues_exactly(tmp_path):
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    ref = train_teacher(_cfg(f'runtime.output_dir={full}'))
    assert ref['progress'] == {'epochs_done': 4, 'epochs': 4, 'updates_done': 60, 'updates': 60, 'fraction': 1.0}
    # (ceil(461 images / 32) = 15 updates per epoch)
    # Stop inside epoch 2 (20 steps), as if killed, then resume=auto: DRW switches on after the restart.
    first = train_teacher(_cfg(f'runtime.output_dir={cut}', 'runtime.max_steps=20'))
    assert first['progress']['updates_done'] == 20 and first['progress']['epochs_done'] == 1
    assert not first['finished'] and first['stopped_by'] == 'max_steps'
    state = json.loads((cut / 'checkpoints' / (cut / 'checkpoints' / 'latest').read_text().strip() /
                        'state.json').read_text())
    assert state['epoch'] == 1 and state['step'] == 5 and state['updates'] == 20
    assert read_model_meta(cut / 'last.safetensors')['step_in_epoch'] == 5
    second = train_teacher(_cfg(f'runtime.output_dir={cut}', 'runtime.resume=auto'))
    assert second['progress']['epochs_done'] == 4 and second['progress']['updates_done'] == 60 and second['finished']
    a, b = load_file(full / 'last.safetensors'), load_file(cut / 'last.safetensors')
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff == 0.0, f'resumed run differs from the uninterrupted one by {diff}'
    assert second['last']['test']['logits']['top1'] == ref['last']['test']['logits']['top1']
    assert [h['train']['loss'] for h in second['history']][2:] == [h['train']['loss'] for h in ref['history']][2:]


def test_two_cpu_processes_match_one_process(tmp_path):
    # Per-sample normalisation (GroupNorm) and no augmentation make the global batch's gradient independent of how
    # it is split over processes; SAM's first pass must see the all-reduced gradient for the runs to agree.
    common = ['model.kwargs={norm_layer: groupnorm1}', 'aug.crop=none', 'loss.drw_epoch=null', 'optim.epochs=2',
              'runtime.max_steps=4', 'sam.rho=0.5']
    one = train_teacher(_cfg(*common, f'runtime.output_dir={tmp_path / "one"}'))
    launcher = two_cpu_processes()
    r = _cli(['--config', str(DIGITS), *SHORT, *common, f'runtime.output_dir={tmp_path / "two"}'], launcher=launcher,
             env_extra={'ACCELERATE_USE_CPU': '1'})
    assert '2 process(es)' in r.stdout
    a, b = load_file(tmp_path / 'one' / 'last.safetensors'), load_file(tmp_path / 'two' / 'last.safetensors')
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    # the all-reduced gradient sums in another order: float32 rounding, larger without AVX-512 (3.5e-5 seen)
    assert diff < 2e-4, f'2-process SAM differs from 1 process by {diff}'
    two = json.loads((tmp_path / 'two' / 'report.json').read_text())
    assert two['world_size'] == 2 and two['progress']['updates_done'] == one['progress']['updates_done'] == 4


@pytest.mark.parametrize('override, code, message', [
    ('sam.rho=-0.1', 2, 'sam.rho is a radius and must be >= 0'),
    ('loss.drw_epoch=4', 2, 'loss.drw_epoch=4 is outside the schedule'),
    ('model.name=resnet33', 2, "unknown teacher architecture 'resnet33'"),
    ('optim.lrr=0.1', 2, "unknown config key 'optim.lrr'"),
    ('runtime.mixed_precision=fp16', 2, 'SAM cannot run under fp16'),
    ('sam.schedule=step', 2, 'needs one more entry'),
    ('optim.accum_steps=2', 2, 'optim.accum_steps must be 1 with sam.enabled=true'),
])
def test_bad_config_fails_before_training(tmp_path, capsys, override, code, message):
    out = tmp_path / 'bad'
    extra = ['sam.rho_steps=[0.1,0.2]'] if override == 'sam.schedule=step' else []
    assert _main(['--config', str(DIGITS), *SHORT, override, *extra, f'runtime.output_dir={out}']) == code
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1 and err.startswith('error: ')   # one line, no traceback
    assert not out.exists()        # nothing was written: the error came before any data or training


def test_bad_resume_checkpoint_fails_clearly(cli_run, tmp_path):
    full, _ = cli_run
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(full / 'checkpoints' / 'epoch00020', ckpt)
    sd, meta = load_model_file(ckpt / 'model.safetensors')
    save_model_file(ckpt / 'model.safetensors', sd, dict(meta, num_classes=100))
    with pytest.raises(CheckpointError, match='the checkpoint has num_classes=100 but this run builds 10'):
        train_teacher(_cfg(f'runtime.output_dir={tmp_path / "a"}', f'runtime.resume={ckpt}'))
    (ckpt / 'model.safetensors').write_bytes((ckpt / 'model.safetensors').read_bytes()[:3000])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        train_teacher(_cfg(f'runtime.output_dir={tmp_path / "b"}', f'runtime.resume={ckpt}'))


def test_published_teacher_configs_load():
    configs = sorted(p for p in (REPO / 'configs' / 'teachers').rglob('*.yaml') if not p.name.startswith('_'))
    names = {p.stem for p in configs}
    assert {'cifar10_lt_if100_ldam_drw_sam', 'cifar10_lt_if50_ldam_drw_sam', 'cifar10_lt_if100_ce_drw_sam',
            'cifar100_lt_if100_ldam_drw_sam', 'cifar100_lt_if50_ldam_drw_sam', 'cifar100_lt_if100_ce_drw_sam',
            'imagenet_lt_ldam_drw_sam', 'inat2018_ldam_drw_sam', 'digits_lt'} <= names
    for p in configs:
        cfg = load_config(TeacherTrainConfig, p)
        if cfg.model.init_from:          # a second stage starts from the first stage's file, not there in a test
            cfg.model.init_from = None
        validate_config(cfg)
        assert cfg.runtime.output_dir.startswith('runs/teachers/'), p
    c10 = load_config(TeacherTrainConfig, REPO / 'configs' / 'teachers' / 'cifar10_lt_if100_ldam_drw_sam.yaml')
    assert (c10.data.name, c10.data.imb_factor, c10.loss.type, c10.sam.rho, c10.loss.drw_epoch) == \
        ('cifar10_lt', 100.0, 'ldam', 0.8, 160)
    assert (c10.optim.lr, c10.optim.weight_decay, c10.optim.batch_size, c10.optim.epochs) == (0.1, 2e-4, 128, 200)
    assert (c10.aug.crop, c10.aug.rand_augment, c10.aug.hflip) == ('pad_crop', None, 0.5)
    assert (c10.optim.opt, c10.optim.sched_unit, c10.optim.decay_norm_and_bias) == ('sgd', 'epoch', True)
    ce = load_config(TeacherTrainConfig, REPO / 'configs' / 'teachers' / 'cifar10_lt_if100_ce_drw_sam.yaml')
    assert (ce.loss.type, ce.sam.rho) == ('ce', 0.5)
    inet = load_config(TeacherTrainConfig, REPO / 'configs' / 'teachers' / 'imagenet_lt_ldam_drw_sam.yaml')
    assert [sam_rho(inet.sam, e) for e in (4, 5, 59, 60, 74, 75, 89)] == [0.05, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5]
    assert (inet.model.name, inet.optim.sched, inet.optim.warmup_epochs, inet.loss.max_m, inet.loss.drw_epoch) == \
        ('resnet50', 'cosine', 0, 0.3, 60)
    inat = load_config(TeacherTrainConfig, REPO / 'configs' / 'teachers' / 'inat2018_ce_drw_sam.yaml')
    assert inat.sam.rho_steps == [0.05, 0.1, 0.1, 0.2] and inat.optim.lr == 0.1
    with pytest.raises(ConfigError, match="unknown config key 'sam.radius'"):
        load_config(TeacherTrainConfig, DIGITS, ['sam.radius=0.1'])


def test_mixup_teacher_and_posthoc_adjusted_predictors(tmp_path):
    # CE with Mixup (APA's teacher recipes), the post-hoc adjustments evaluated beside the plain logits
    r = train_teacher(_cfg('loss.type=ce', 'aug.mixup=0.2', 'optim.epochs=1', 'loss.drw_epoch=null',
                           'optim.milestones=[]', 'optim.warmup_epochs=0', 'posthoc_adjust=[iif,prior]',
                           f'runtime.output_dir={tmp_path}'))
    test = r['last']['test']
    assert set(r['predictors']) == {'logits', 'logits_iif', 'logits_prior'} and r['headline'] == 'logits'
    # the offsets move predictions towards the tail: never fewer tail hits than the plain logits give here
    counts = torch.tensor([114, 88, 68, 52, 40, 31, 24, 19, 14, 11], dtype=torch.float64)
    from teachers.recipe import posthoc_offsets
    off = posthoc_offsets(['iif', 'prior'], counts)
    assert off['iif'][0] == pytest.approx(math.log((counts.sum() - 114) / 114))
    assert off['prior'][-1] == pytest.approx(-math.log(11 / counts.sum()))
    assert all(test[p]['top1'] >= 0 for p in r['predictors'])
    with pytest.raises(ConfigError, match='takes class labels'):
        validate_config(_cfg('loss.type=ldam', 'aug.mixup=0.2'))
