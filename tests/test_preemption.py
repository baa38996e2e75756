"""Cluster-style interruptions of tools/train.py on digits_lt: a SIGTERM mid-epoch then `runtime.resume=auto`
ends with the weights of an uninterrupted run; a process of a 2-process run that dies ends the other within
seconds; one run per output folder (live lock, finished run, overwrite)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, two_cpu_processes
from deit_lt.config import RuntimeConfig
from deit_lt.errors import ConfigError
from deit_lt.runtime import OutputDir

TRAIN = str(REPO / 'tools' / 'train.py')
RUN = ['--config', str(REPO / 'configs' / 'digits_lt' / 'vit.yaml'), 'optim.epochs=3', 'runtime.eval_every=3',
       'wandb.mode=disabled', 'runtime.log_every=1', 'runtime.progress=false']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', WANDB_MODE='disabled')


def _updates_logged(out) -> int:
    log = out / 'log.jsonl'
    if not log.is_file():
        return 0
    return sum('train/loss' in line for line in log.read_text().splitlines())


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    subprocess.run([sys.executable, TRAIN, *RUN, f'runtime.output_dir={full}'], env=ENV, check=True,
                   capture_output=True, cwd=REPO, timeout=600)
    proc = subprocess.Popen([sys.executable, TRAIN, *RUN, f'runtime.output_dir={cut}'], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _updates_logged(cut) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)          # as a scheduler preempting the job (mid-epoch: 28 updates / epoch)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert err.count('\n') == 1 and 'stopped by SIGTERM' in err and 'runtime.resume=auto' in err
    report = json.loads((cut / 'report.json').read_text())
    assert not report['finished'] and report['stopped_by'] == 'SIGTERM' and 0 < report['progress']['fraction'] < 1
    r = subprocess.run([sys.executable, TRAIN, *RUN, f'runtime.output_dir={cut}', 'runtime.resume=auto'], env=ENV,
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(full / 'last.safetensors'), load_file(cut / 'last.safetensors')
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert json.loads((cut / 'report.json').read_text())['finished']


def test_a_dying_process_ends_the_other_quickly(tmp_path):
    # rank 1 raises at its 5th update; rank 0 must stop with an error within seconds, not wait for a timeout
    wrapper = tmp_path / 'fail_on_rank1.py'
    wrapper.write_text(
        'import runpy, sys\n'
        f'sys.path.insert(0, {str(REPO)!r})\n'
        'import deit_lt.engine as engine\n'
        'update, calls = engine.optimizer_update, [0]\n'
        'def failing(parts, model, optimizer, acc, inputs):\n'
        '    calls[0] += 1\n'
        '    if acc.process_index == 1 and calls[0] == 5:\n'
        '        raise RuntimeError("rank 1 fails on purpose")\n'
        '    return update(parts, model, optimizer, acc, inputs)\n'
        'engine.optimizer_update = failing\n'
        f'sys.argv = [{TRAIN!r}] + sys.argv[1:]\n'
        f'runpy.run_path({TRAIN!r}, run_name="__main__")\n')
    launcher = two_cpu_processes()
    t0 = time.time()
    r = subprocess.run(launcher + [str(wrapper), *RUN, f'runtime.output_dir={tmp_path / "run"}'],
                       env=dict(ENV, ACCELERATE_USE_CPU='1'), capture_output=True, text=True, cwd=REPO, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and 'rank 1 fails on purpose' in out
    assert 'another process of this run stopped' in out        # rank 0's one-line error
    assert time.time() - t0 < 120          # start-up (~20 s on 2 shared cores) + seconds, not a 30-min timeout


def test_one_run_per_output_folder(tmp_path):
    cfg = RuntimeConfig(output_dir=str(tmp_path / 'run'))
    live = OutputDir(cfg, is_main=True)
    with pytest.raises(ConfigError, match='in use by a live run'):
        OutputDir(cfg, is_main=True)
    live.release()
    OutputDir(cfg, is_main=True).release()                  # a released (or crashed) holder leaves no stale lock
    (tmp_path / 'run' / 'report.json').write_text(json.dumps({'finished': True}))
    with pytest.raises(ConfigError, match='already holds a run .finished.'):
        OutputDir(cfg, is_main=True)
    OutputDir(RuntimeConfig(output_dir=cfg.output_dir, resume='auto'), is_main=True).release()
    OutputDir(RuntimeConfig(output_dir=cfg.output_dir, overwrite=True), is_main=True).release()
    assert not (tmp_path / 'run' / 'report.json').exists()      # overwrite cleared the run's files
    # and from the tool: a second run into a live folder is refused with one line, exit code 2
    holder = OutputDir(cfg, is_main=True)
    r = subprocess.run([sys.executable, TRAIN, *RUN, f'runtime.output_dir={cfg.output_dir}'], env=ENV,
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    holder.release()
    assert r.returncode == 2 and r.stderr.startswith('error: ') and 'in use by a live run' in r.stderr
    assert r.stderr.count('\n') == 1 and torch.__version__
