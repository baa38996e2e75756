"""The quickstart pipeline (teacher, DeiT-LT student, ViT + cRT / tau-norm, table, next steps) at a smaller size."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO


def test_quickstart_pipeline_small(tmp_path):
    out = tmp_path / 'qs'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'quickstart.py'), '--output-dir', str(out),
                        '--scale', '0.1', '--wandb', 'disabled'], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads((out / 'summary.json').read_text())
    models = [row['model'] for row in summary['rows']]
    assert models == ['Teacher ResNet-32 (LDAM+DRW+SAM)', 'ViT (no teacher)', 'ViT + cRT', 'ViT + tau-norm',
                      'DeiT-LT CLS', 'DeiT-LT DIST', 'DeiT-LT AVG']
    for row in summary['rows']:
        for k in ('top1', 'head', 'mid', 'tail'):
            assert 0.0 <= row[k] <= 100.0 and not math.isnan(row[k]), row
    teacher = summary['rows'][0]
    # 10 classes, chance 10%; six teacher epochs: 27.8 / 31.8 / 31.5 with ATEN_CPU_CAPABILITY default / avx2 / avx512
    assert teacher['top1'] > 20.0
    assert (out / 'per_class_accuracy.png').stat().st_size > 5000
    for stage in ('teacher', 'vit', 'deit_lt', 'vit_rebalance'):
        assert (out / stage / 'report.json').is_file()
    assert all(row['finished'] for row in summary['rows']) and summary['scale'] == 0.1
    assert 'DeiT-LT DIST' in r.stdout and 'Outputs:' in r.stdout
    for stage in ('teacher', 'vit', 'deit_lt', 'vit+crt'):
        assert (out / f'{stage}.log').stat().st_size > 0
    # the next steps are printed as commands
    assert f'python tools/analyze.py --checkpoint {out}/deit_lt --compare {out}/vit {out}/teacher' in r.stdout
    assert f'python tools/collect_results.py {out}/teacher' in r.stdout and f'--out {out}/results' in r.stdout
