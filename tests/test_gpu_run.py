"""tools/gpu_run.py rehearsed on the CPU at tiny sizes (the command prepared for a lent GPU cannot rot)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_run_rehearsal_writes_every_result(tmp_path):
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'gpu_run.py'), '--rehearse', '--out', str(out),
                        '--work', str(tmp_path / 'work'), '--budget-s', '400', '--margin-s', '10'],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    log = (out / 'run.log').read_text() if (out / 'run.log').is_file() else ''
    assert r.returncode == 0, (r.stderr[-2000:], log[-3000:])
    summary = json.loads((out / 'summary.json').read_text())
    assert all(step['exit'] == 0 for step in summary['steps'].values()), summary
    env = json.loads((out / 'env_sync.json').read_text())
    assert env['environment']['torch'] and 'skipped' in env['sync']         # no GPU here: nothing to check
    bench = json.loads((out / 'bench.json').read_text())
    ((_, fig),) = bench.items()
    assert fig['results']['fast']['images_per_s'] > 0 and 'fast/ceiling' in fig['ratios']
    teacher = json.loads((out / 'teacher_report.json').read_text())
    student = json.loads((out / 'student_report.json').read_text())
    assert teacher['finished'] and teacher['kind'] == 'teacher'
    assert student['kind'] == 'student' and set(student['predictors']) == {'cls', 'dist', 'avg'}
    assert summary['steps']['student']['epochs_scale'] <= 2 / 60 + 1e-9
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ['bench.json', 'env_sync.json', 'results.json', 'run.log', 'student_report.json', 'summary.json',
         'teacher_report.json'])
