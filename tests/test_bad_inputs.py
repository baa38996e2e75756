"""Every user error is one line: a battery of bad inputs across the tools (train, train_teacher, rebalance, analyze,
dataset_stats, cluster), each of which must exit non-zero with exactly one stderr line `error: ...` and no traceback.

Tools run in this process through `deit_lt.cli.run_tool(tool.main, argv)` (what their `__main__` does) with stderr
captured, which keeps the battery to seconds; two cases run as real processes to check the exit status itself, one
of them with a DataLoader worker (whose errors torch re-raises with the worker's traceback in the message).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from deit_lt.checkpoint import save_model_file
from deit_lt.cli import run_tool
from deit_lt.models.cnn import create_teacher_model

# a one-epoch student on whatever data the case names: no DRW, no mixing, small batches, no workers
TINY = ['model.name=deit_micro_distilled_patch2_8', 'wandb.mode=disabled', 'runtime.progress=false',
        'runtime.compile=off', 'optim.epochs=1', 'optim.batch_size=8', 'optim.accum_steps=1', 'optim.sched=multistep',
        'distill.drw_epoch=null', 'aug.mixup=0', 'aug.cutmix=0', 'aug.repeated_aug=1', 'aug.num_workers=0',
        'aug.rand_augment=null']
TEACHER_CFG = str(REPO / 'configs' / 'teachers' / 'digits_lt.yaml')
CLUSTER_CFG = str(REPO / 'configs' / 'cluster' / 'digits_lt.yaml')


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f'_bad_inputs_{name}', REPO / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Bad (and good) inputs on disk: a 3-class image list with a missing and a corrupt image, broken YAML, broken
    model files, a 10-class teacher file, a broken CIFAR pack, and a real one-step student run to resume from."""
    t = tmp_path_factory.mktemp('bad_inputs')
    (t / 'img').mkdir()
    good = []
    for c in range(3):
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 30 * c + i, np.uint8)).save(t / 'img' / f'{c}_{i}.png')
            good.append(f'img/{c}_{i}.png {c}')
    (t / 'img' / 'bad.png').write_bytes(b'not an image')

    def write(name, lines):
        (t / name).write_text('\n'.join(lines) + '\n')
    write('train.txt', good)
    write('missing.txt', good + ['img/nope.png 1', 'img/gone.png 2'])          # lines 13, 14
    write('corrupt.txt', good[:5] + ['img/bad.png 1'] + good[5:])             # line 6
    write('malformed.txt', good[:2] + ['img/0_2.png'] + good[3:])             # line 3
    write('label.txt', good + ['img/0_0.png -1'])                              # line 13
    (t / 'bad.yaml').write_text('optim: [1, 2\n')
    (t / 'list.yaml').write_text('- just\n- a list\n')
    (t / 'junk.safetensors').write_bytes(b'\x00' * 64)
    (t / 'cifar10_jpeg.npz').write_bytes(b'PK\x03\x04 cut short')
    model, arch, kwargs = create_teacher_model('resnet32', 10, in_chans=3)
    save_model_file(t / 'teacher10.safetensors', model.state_dict(),
                    {'kind': 'teacher', 'arch': arch, 'model_kwargs': kwargs, 'num_classes': 10, 'in_chans': 3})
    run = t / 'run'
    code = run_tool(_tool('train').main, ['data.name=digits_lt', 'data.imb_factor=10', 'distill.type=none',
                                          'runtime.max_steps=1', f'runtime.output_dir={run}'] + TINY)
    assert code == 0
    broken = t / 'broken_ckpt'
    broken.mkdir()
    ckpt = next(p for p in (run / 'checkpoints').iterdir() if p.is_dir())
    for f in ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / 'model.safetensors').read_bytes()
    (broken / 'model.safetensors').write_bytes(data[:len(data) // 2])       # a checkpoint cut off mid-write
    return t


def _list(t: Path, train: str = 'train.txt', test: str = 'train.txt') -> list[str]:
    return ['data.name=image_list', f'data.root={t}', f'data.train_list={train}', f'data.test_list={test}',
            'data.split=threshold']


# (tool, argv(files) -> list, expected exit code or None when the tool does not document one, message pattern)
CASES = {
    # configs and command lines
    'train/missing_config': ('train', lambda t: ['--config', str(t / 'nope.yaml')], 2, 'config file not found'),
    'train/bad_yaml': ('train', lambda t: ['--config', str(t / 'bad.yaml')], 2, 'not valid YAML'),
    'train/yaml_not_mapping': ('train', lambda t: ['--config', str(t / 'list.yaml')], 2, 'must be a mapping'),
    'train/unknown_key': ('train', lambda t: ['optim.lrr=1'], 2, r"unknown config key 'optim.lrr'\. Did you mean"),
    'train/wrong_type': ('train', lambda t: ['optim.lr=fast'], 2, "optim.lr: expected a number, got 'fast'"),
    'train/bad_choice': ('train', lambda t: ['data.verify=maybe'], 2, "data.verify: 'maybe' is not one of"),
    'train/override_syntax': ('train', lambda t: ['optim.lr'], 2, 'not of the form key.sub=value'),
    # data
    'train/missing_list_file': ('train', lambda t: _list(t, train='nope.txt') + TINY + ['distill.type=none'], 3,
                                'list file not found: .*nope.txt'),
    'train/missing_images': ('train', lambda t: _list(t, train='missing.txt') + TINY + ['distill.type=none'], 3,
                             r'2 of 26 listed images do not exist .*missing\.txt:13: .*nope\.png; '
                             r'.*missing\.txt:14: .*gone\.png'),
    'train/corrupt_image_decode_check': ('train', lambda t: _list(t, train='corrupt.txt') + TINY + [
        'distill.type=none', 'data.verify=decode'], 3, r'1 of 25 listed images cannot be decoded: .*corrupt\.txt:6: '),
    # met while reading batches (training, or at the latest the evaluation, which reads every image)
    'train/corrupt_image_while_running': ('train', lambda t: _list(t, train='corrupt.txt', test='corrupt.txt') + TINY
                                          + ['distill.type=none'], 3, r'corrupt\.txt:6: .*bad\.png: cannot read'),
    'train/malformed_list_line': ('train', lambda t: _list(t, train='malformed.txt') + TINY + ['distill.type=none'], 3,
                                  r'malformed\.txt:3: expected "relative/path label"'),
    'train/negative_label': ('train', lambda t: _list(t, train='label.txt') + TINY + ['distill.type=none'], 3,
                             r'label\.txt:13: label -1 outside the class range'),
    'train/val_per_class_on_a_list': ('train', lambda t: _list(t) + TINY + ['distill.type=none',
                                                                            'data.val_per_class=2'], 2,
                                      'training list is the subset itself'),
    'train/device_placement_on_files': ('train', lambda t: _list(t) + TINY + ['distill.type=none',
                                                                              'aug.placement=device'], 2,
                                        'aug.placement=device needs an in-memory dataset'),
    'train/batch_larger_than_data': ('train', lambda t: _list(t) + TINY + ['distill.type=none',
                                                                           'optim.batch_size=64'], 2,
                                     r'the batch \(64 per device\) is larger than the samples'),
    'train/image_size_vs_patch': ('train', lambda t: ['data.name=digits_lt'] + TINY + ['distill.type=none',
                                                                                      'model.img_size=9'], 2,
                                  'not a multiple of the patch size'),
    # teachers and checkpoints
    'train/missing_teacher': ('train', lambda t: ['data.name=digits_lt'] + TINY + ['teacher.checkpoint=/no/t.pt'],
                              2, 'teacher checkpoint not found'),
    'train/corrupt_teacher': ('train', lambda t: ['data.name=digits_lt'] + TINY + [
        f'teacher.checkpoint={t / "junk.safetensors"}'], 4, 'not a readable safetensors file'),
    'train/teacher_class_count': ('train', lambda t: _list(t) + TINY + [
        f'teacher.checkpoint={t / "teacher10.safetensors"}'], 4, 'the teacher has 10 classes but the data has 3'),
    'train/resume_missing': ('train', lambda t: ['data.name=digits_lt'] + TINY + [
        'distill.type=none', f'runtime.resume={t / "nope"}'], 4, 'no such checkpoint folder'),
    'train/resume_truncated_checkpoint': ('train', lambda t: ['data.name=digits_lt', 'data.imb_factor=10'] + TINY + [
        'distill.type=none', f'runtime.resume={t / "broken_ckpt"}', f'runtime.output_dir={t / "resumed"}'], 4,
        'truncated or corrupt'),
    # the teacher tool
    'train_teacher/unknown_loss': ('train_teacher', lambda t: ['--config', TEACHER_CFG, 'loss.type=focal'], 2,
                                   "unknown loss.type 'focal'"),
    'train_teacher/cifar_without_root': ('train_teacher', lambda t: ['data.name=cifar10_lt'], 3,
                                         'cifar10_lt needs data.root'),
    'train_teacher/corrupt_cifar_pack': ('train_teacher', lambda t: [
        'data.name=cifar10_lt', f'data.root={t / "cifar10_jpeg.npz"}'], 3, r'not a readable \.npz file'),
    'train_teacher/batch_larger_than_data': ('train_teacher', lambda t: ['--config', TEACHER_CFG] + _list(t) + [
        'data.val_per_class=0', 'optim.batch_size=64', 'aug.placement=loader', 'wandb.mode=disabled'], 2,
        'larger than the samples'),
    # re-balancing, analysis, dataset statistics, clustering
    'rebalance/missing_checkpoint': ('rebalance', lambda t: ['--checkpoint', str(t / 'nope.safetensors')], 4,
                                     'checkpoint not found'),
    'rebalance/corrupt_checkpoint': ('rebalance', lambda t: ['--checkpoint', str(t / 'junk.safetensors')], 4,
                                     'not a readable safetensors file'),
    'rebalance/unknown_method': ('rebalance', lambda t: ['--checkpoint', str(t / 'run' / 'last.safetensors'),
                                                         '--method', 'svm'], 2, "unknown method 'svm'"),
    'rebalance/class_count_vs_data': ('rebalance', lambda t: ['--checkpoint', str(t / 'run' / 'last.safetensors'),
                                                              '--method', 'ncm'] + _list(t) + ['data.val_per_class=0'],
                                      2, 'has 3 classes but the checkpoint predicts 10'),
    'analyze/missing_checkpoint': ('analyze', lambda t: ['--checkpoint', str(t / 'nope.safetensors')], 4,
                                   'checkpoint not found'),
    'analyze/corrupt_checkpoint': ('analyze', lambda t: ['--checkpoint', str(t / 'junk.safetensors')], 4,
                                   'not a readable safetensors file'),
    'dataset_stats/unknown_dataset': ('dataset_stats', lambda t: ['--dataset', 'cifar10'], None, 'unknown dataset'),
    'dataset_stats/missing_images': ('dataset_stats', lambda t: ['--dataset', 'image_list', '--root', str(t),
                                                                 'data.train_list=missing.txt',
                                                                 'data.test_list=train.txt'], None,
                                     r'missing\.txt:13: '),
    'cluster/unknown_key': ('cluster', lambda t: ['cluster.bank=3'], 2, "unknown config key 'cluster.bank'"),
    'cluster/missing_checkpoint': ('cluster', lambda t: ['--config', CLUSTER_CFG, 'wandb.mode=disabled',
                                                         f'model.checkpoint={t / "nope.safetensors"}'], 2,
                                   'no such file'),
}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_line_error(case, files, capsys, monkeypatch):
    tool, argv, code, pattern = CASES[case]
    monkeypatch.chdir(files)              # relative outputs (runs/...) of a case land in the temporary folder
    result = run_tool(_tool(tool).main, argv(files))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert result != 0, f'{case}: exit code 0, stderr: {err[-2000:]}'
    assert 'Traceback' not in err, f'{case}: traceback on stderr:\n{err[-3000:]}'
    assert len(lines) == 1 and lines[0].startswith('error: '), f'{case}: not one error line:\n{err[-3000:]}'
    assert re.search(pattern, lines[0]), f'{case}: {lines[0]!r} does not match {pattern!r}'
    if code is not None:
        assert result == code, f'{case}: exit code {result}, documented {code}: {lines[0]}'


@pytest.mark.parametrize('extra, pattern', [
    ([], r'missing\.txt:13: '),                                     # the up-front existence check
    (['data.train_list=corrupt.txt', 'data.test_list=corrupt.txt', 'aug.num_workers=1'],
     r'corrupt\.txt:6: .*cannot read this image'),                  # met by a DataLoader worker during training
])
def test_real_process_exit_code(files, extra, pattern):
    args = _list(files, train='missing.txt') + TINY + ['distill.type=none', f'runtime.output_dir={files / "sub"}']
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py')] + args + extra, capture_output=True,
                       text=True, cwd=files, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
