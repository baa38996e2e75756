"""Checkpoint writes that fail (a full disk, a quota, a file-size limit) keep the previous checkpoint and `latest`
valid, leave no temporary files, and stop with one line that says what to do; leftovers of killed writers are
cleaned up or recovered. The file-size limit is real (RLIMIT_FSIZE in a child process); the rest patches writers."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from deit_lt.checkpoint import (CheckpointError, atomic_write_text, latest_checkpoint, load_model_file,
                                load_training_state, save_model_file, save_training_state)
from deit_lt.cli import run_tool


def _save(out, tag, value, **kw):
    return save_training_state(out, tag, model_state={'w': torch.full((8,), float(value))}, meta={'arch': 'x'},
                               optimizer_state={'state': {}, 'param_groups': [{'lr': value}]},
                               state={'epoch': value}, **kw)


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob('*') if p.name.endswith(('.tmp', '.old')))


def _assert_kept(out, tag, value):
    assert latest_checkpoint(out).name == tag
    ckpt = load_training_state(latest_checkpoint(out))
    assert ckpt['state']['epoch'] == value and float(ckpt['model']['w'][0]) == value
    assert ckpt['optimizer']['param_groups'][0]['lr'] == value


@pytest.mark.parametrize('target, error', [
    ('deit_lt.checkpoint.save_file', OSError(errno.ENOSPC, 'No space left on device')),
    ('torch.save', RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')),
])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, target, error):
    _save(tmp_path, 'epoch00001', 1)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(target, fail)
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 'epoch00002', 2)
    msg = str(e.value)
    assert '\n' not in msg and 'epoch00002' in msg and 'runtime.resume=auto' in msg
    assert 'still names the previous checkpoint epoch00001, which is intact' in msg
    if isinstance(error, OSError):
        assert 'the disk is full' in msg
    monkeypatch.undo()
    _assert_kept(tmp_path, 'epoch00001', 1)
    assert _leftovers(tmp_path) == [] and not (tmp_path / 'checkpoints' / 'epoch00002').exists()
    _save(tmp_path, 'epoch00002', 2)                # once there is space again, the next write works
    _assert_kept(tmp_path, 'epoch00002', 2)
    assert not (tmp_path / 'checkpoints' / 'epoch00001').exists()   # keep=1 pruned the older one


def test_failed_pointer_or_report_write_keeps_the_old_content(tmp_path, monkeypatch):
    _save(tmp_path, 'epoch00001', 1)
    atomic_write_text(tmp_path / 'report.json', '{"v": 1}')
    real = os.replace

    def fail_on_text(src, dst):   # the checkpoint folder moves into place; the text files cannot be renamed
        if os.path.basename(dst) in ('latest', 'report.json'):
            raise OSError(errno.EDQUOT, 'Disk quota exceeded')
        return real(src, dst)
    monkeypatch.setattr(os, 'replace', fail_on_text)
    with pytest.raises(CheckpointError, match=r'latest failed: the disk quota is used up .*latest keeps its previous '
                                              r'content'):
        _save(tmp_path, 'epoch00002', 2)
    with pytest.raises(CheckpointError, match='report.json keeps its previous content'):
        atomic_write_text(tmp_path / 'report.json', '{"v": 2}')
    monkeypatch.undo()
    _assert_kept(tmp_path, 'epoch00001', 1)        # the complete new folder exists, but latest still names the old
    assert json.loads((tmp_path / 'report.json').read_text()) == {'v': 1}
    assert _leftovers(tmp_path) == []


def test_failed_model_file_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'best.safetensors'
    save_model_file(path, {'w': torch.ones(3)}, {'epoch': 1})

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, 'File too large')
    monkeypatch.setattr('deit_lt.checkpoint.save_file', too_large)
    with pytest.raises(CheckpointError, match='a file-size limit was hit .*best.safetensors keeps its previous'):
        save_model_file(path, {'w': torch.zeros(3)}, {'epoch': 2})
    monkeypatch.undo()
    sd, meta = load_model_file(path)
    assert meta['epoch'] == 1 and torch.equal(sd['w'], torch.ones(3)) and _leftovers(tmp_path) == []


def test_file_size_limit_in_a_real_process(tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG (Python ignores SIGXFSZ), as a full disk or a
    quota would: the checkpoint, the model file and the report keep their previous versions."""
    script = textwrap.dedent(f'''
        import json, resource, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from deit_lt.checkpoint import CheckpointError, atomic_write_text, save_model_file, save_training_state
        out = {str(tmp_path)!r}
        def save(tag, n):
            save_training_state(out, tag, model_state={{'w': torch.ones(n)}}, meta={{'arch': 'x'}},
                                optimizer_state={{'m': torch.ones(n)}}, state={{'epoch': n}})
        save('epoch00001', 16)
        save_model_file(out + '/best.safetensors', {{'w': torch.ones(16)}}, {{'epoch': 1}})
        atomic_write_text(out + '/report.json', json.dumps({{'epoch': 1}}))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        errors = []
        for write in (lambda: save('epoch00002', 100000),
                      lambda: save_model_file(out + '/best.safetensors', {{'w': torch.ones(100000)}}, {{'epoch': 2}}),
                      lambda: atomic_write_text(out + '/report.json', 'x' * 100000)):
            try:
                write()
                errors.append(None)
            except CheckpointError as e:
                errors.append(str(e))
        print(json.dumps(errors))
    ''')
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(e and 'a file-size limit was hit' in e and '\n' not in e for e in errors), errors
    ckpt = load_training_state(latest_checkpoint(tmp_path))
    assert latest_checkpoint(tmp_path).name == 'epoch00001' and ckpt['state']['epoch'] == 16
    assert load_model_file(tmp_path / 'best.safetensors')[1]['epoch'] == 1
    assert json.loads((tmp_path / 'report.json').read_text()) == {'epoch': 1}
    assert _leftovers(tmp_path) == [] and not (tmp_path / 'checkpoints' / 'epoch00002').exists()


def test_leftovers_of_a_killed_writer_are_removed_or_recovered(tmp_path):
    _save(tmp_path, 'epoch00001', 1)
    root = tmp_path / 'checkpoints'
    (root / '.epoch00002.99999.tmp').mkdir()                 # killed while writing a new checkpoint
    (root / '.epoch00002.99999.tmp' / 'model.safetensors').write_bytes(b'partial')
    (root / '.latest.99999.tmp').write_text('epoch0')
    # killed while re-saving epoch00001 between its two renames: only the moved-aside copy exists
    os.replace(root / 'epoch00001', root / '.epoch00001.99999.old')
    _assert_kept(tmp_path, 'epoch00001', 1)                  # put back by latest_checkpoint
    assert _leftovers(tmp_path) == ['.epoch00002.99999.tmp', '.latest.99999.tmp']
    _save(tmp_path, 'epoch00003', 3)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize('content, pattern', [(b'\xff\xfe\x00', 'cannot be read'), (b'../../etc\n', 'does not name'),
                                              (b'epoch00009\n', 'which does not exist')])
def test_bad_latest_pointer_is_a_checkpoint_error(tmp_path, content, pattern):
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'latest').write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern):
        latest_checkpoint(tmp_path)


def test_training_run_stops_on_a_failed_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    """A student run whose second checkpoint cannot be written stops with exit code 4 and one error line; the first
    checkpoint stays `latest` and the run resumes from it once the disk has room."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    spec = importlib.util.spec_from_file_location('_ckpt_train_tool', REPO / 'tools' / 'train.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'run'
    args = ['data.name=digits_lt', 'data.imb_factor=10', 'model.name=deit_micro_distilled_patch2_8',
            'distill.type=none', 'distill.drw_epoch=null', 'optim.batch_size=16', 'optim.accum_steps=1',
            'optim.epochs=1', 'aug.mixup=0', 'aug.cutmix=0', 'aug.repeated_aug=1', 'aug.rand_augment=null',
            'runtime.save_every_steps=2', 'runtime.max_steps=6', 'runtime.progress=false', 'runtime.compile=off',
            'wandb.mode=disabled', f'runtime.output_dir={out}']
    real_save, calls = torch.save, []

    def full_disk_after_first(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full_disk_after_first)
    code = run_tool(tool.main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and err[0].startswith('error: writing ') and 'the disk is full' in err[0]
    assert 'still names the previous checkpoint epoch00000-update00000002' in err[0]
    assert latest_checkpoint(out).name == 'epoch00000-update00000002' and _leftovers(out) == []
    monkeypatch.setattr(torch, 'save', real_save)
    assert run_tool(tool.main, args + ['runtime.resume=auto']) == 0
    assert json.loads((out / 'report.json').read_text())['progress']['updates_done'] == 6
