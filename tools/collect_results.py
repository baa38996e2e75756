"""Turn finished runs into `results/<name>.json` and render the README "Results" table from them.

    python tools/collect_results.py runs/cifar10_lt_if100_deit_lt_ldam runs/teachers/cifar10_lt_if100_ldam_drw_sam
    python tools/collect_results.py --rebalance runs/rebalance/vit_if100 --name cifar10_lt_if100_vit_crt
    python tools/collect_results.py --table            # markdown table of results/*.json next to the paper

Each results file holds the run's resolved config, git commit, machine, wall time and the test accuracy (overall /
head / mid / tail) of every predictor: CLS, DIST and AVG for students, the logits for teachers and baselines, both
at the last epoch and at the checkpoint the paper's protocol selects (best AVG on the test split). Only runs that
exist produce rows: nothing is estimated or copied into our columns.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'results'

# Published top-1 (overall / head / mid / tail where given), from the DeiT-LT project page, README and the teacher
# papers (DeiT-LT project page and val-iisc/DeiT-LT README; Saddle-LongTail README). Keys: (dataset, IF, row).
PUBLISHED = {
    ('cifar10_lt', 100, 'teacher_ldam_drw_sam'): (81.9,), ('cifar10_lt', 100, 'teacher_ce_drw_sam'): (80.6,),
    ('cifar10_lt', 50, 'teacher_ldam_drw_sam'): (84.8,),
    ('cifar10_lt', 100, 'deit_lt_ldam'): (84.8,), ('cifar10_lt', 50, 'deit_lt_ldam'): (87.5,),
    ('cifar10_lt', 100, 'deit_lt_paco'): (87.5, 94.5, 84.1, 85.0), ('cifar10_lt', 50, 'deit_lt_paco'): (89.8, 94.9, 87.0, 88.6),
    ('cifar10_lt', 100, 'vit'): (62.6,), ('cifar10_lt', 50, 'vit'): (70.1,),
    ('cifar10_lt', 100, 'vit_crt'): (68.9,), ('cifar10_lt', 50, 'vit_crt'): (74.5,),
    ('cifar10_lt', 100, 'deit'): (70.2,), ('cifar10_lt', 50, 'deit'): (77.5,),
    ('cifar100_lt', 100, 'teacher_ldam_drw_sam'): (45.4,), ('cifar100_lt', 100, 'teacher_ce_drw_sam'): (44.6,),
    ('cifar100_lt', 50, 'teacher_ldam_drw_sam'): (49.4,),
    ('cifar100_lt', 100, 'deit_lt_ldam'): (52.0,), ('cifar100_lt', 50, 'deit_lt_ldam'): (54.1,),
    ('cifar100_lt', 100, 'deit_lt_paco'): (55.6, 72.8, 55.4, 31.4),
    ('cifar100_lt', 50, 'deit_lt_paco'): (60.5, 74.8, 60.3, 43.1),
    ('cifar100_lt', 100, 'vit'): (35.0,), ('cifar100_lt', 50, 'vit'): (39.0,),
    ('cifar100_lt', 100, 'vit_crt'): (38.9,), ('cifar100_lt', 50, 'vit_crt'): (42.2,),
    ('cifar100_lt', 100, 'deit'): (31.3,), ('cifar100_lt', 50, 'deit'): (39.1,),
    ('imagenet_lt', None, 'teacher_ldam_drw_sam'): (53.1, 62.0, 52.1, 32.8),
    ('imagenet_lt', None, 'deit_lt_ldam'): (55.6, 65.2, 54.0, 37.1),
    ('imagenet_lt', None, 'deit_lt_paco'): (59.1, 66.6, 58.3, 40.0), ('imagenet_lt', None, 'vit'): (37.5, 56.9, 30.4, 10.3),
    ('inat2018', None, 'teacher_ldam_drw_sam'): (70.1, 64.1, 70.5, 71.2),
    ('inat2018', None, 'deit_lt_ldam'): (72.9, 69.0, 73.3, 73.3),
    ('inat2018', None, 'deit_lt_paco'): (75.1, 70.3, 75.2, 76.2), ('inat2018', None, 'vit'): (54.2, 64.3, 53.9, 52.1),
}
ROW_LABELS = {
    'teacher_ldam_drw_sam': 'Teacher ResNet-32/50, LDAM+DRW+SAM', 'teacher_ce_drw_sam': 'Teacher ResNet-32/50, CE+DRW+SAM',
    'vit': 'ViT (no distillation)', 'vit_crt': 'ViT + cRT', 'vit_tau_norm': 'ViT + tau-norm', 'deit': 'DeiT (no DRW)',
    'deit_lt_ldam': 'DeiT-LT, LDAM+DRW+SAM teacher', 'deit_lt_ce': 'DeiT-LT, CE+DRW+SAM teacher',
    'deit_lt_paco': 'DeiT-LT, PaCo+SAM teacher',
}


def _split4(r: dict) -> dict:
    return {k: round(float(r[k]), 2) for k in ('top1', 'head', 'mid', 'tail') if r.get(k) is not None}


def infer_row(name: str, kind: str) -> str:
    """Row id from a run name such as 'cifar10_lt_if100_deit_lt_ldam' or 'cifar10_lt_if100_ldam_drw_sam'."""
    base = re.sub(r'^(cifar10_lt|cifar100_lt|imagenet_lt|inat2018|digits_lt)(_if\d+)?_', '', name)
    if kind == 'teacher':
        return 'teacher_' + base.replace('_teacher', '')
    return base


def collect_run(run: Path, name: str | None = None, row: str | None = None) -> dict:
    report = json.loads((run / 'report.json').read_text())
    config = yaml.safe_load((run / 'config.yaml').read_text()) if (run / 'config.yaml').is_file() else {}
    kind = report.get('kind') or ('teacher' if 'sam' in report or 'loss' in report else 'student')
    name = name or report.get('name') or run.name
    data = config.get('data', {})
    out = {'name': name, 'kind': kind, 'row': row or infer_row(name, kind), 'dataset': data.get('name'),
           'imb_factor': data.get('imb_factor') if str(data.get('name', '')).startswith(('cifar', 'digits')) else None,
           'run_dir': str(run), 'wall_time_s': report.get('wall_time_s'),
           'git_commit': report.get('git_commit'), 'git_dirty': report.get('git_dirty'),
           'machine': report.get('machine') or {'device': report.get('device')}, 'versions': report.get('versions'),
           'epochs': report.get('epochs_done'), 'config': config}
    last = report['last']['test']
    out['last'] = {p: _split4(last[p]) for p in ('cls', 'dist', 'avg', 'logits') if p in last}
    if kind == 'teacher' and not out['last']:
        out['last'] = {'logits': _split4(last)}
    best = report.get('best_epoch_metrics')
    if best and 'test' in best:
        out['best_on_test'] = {p: _split4(v) for p, v in best['test'].items()}
        out['best_epoch'] = best.get('epoch')
    return out


def collect_rebalance(run: Path, name: str, method: str = 'crt') -> dict:
    report = json.loads((run / 'report.json').read_text())
    test = report['methods'][method]['test']
    ident = report.get('dataset', {})
    return {'name': name, 'kind': 'rebalance', 'row': infer_row(name, 'rebalance'), 'method': method,
            'dataset': ident.get('name'), 'imb_factor': ident.get('imb_factor'), 'run_dir': str(run),
            'checkpoint': report.get('checkpoint'), 'last': {p: _split4(v) for p, v in test.items()},
            'joint': {p: _split4(v) for p, v in report['joint']['test'].items()}}


def table(results: list[dict]) -> str:
    """Markdown: ours (AVG for students, logits otherwise; last epoch) next to the published numbers."""
    lines = ['| dataset | IF | model | ours: overall / head / mid / tail | paper | run |',
             '|---|---|---|---|---|---|']

    def fmt(v):
        return ' / '.join(f'{x:.1f}' for x in v) if v else '-'
    for r in sorted(results, key=lambda r: (r['dataset'] or '', -(r['imb_factor'] or 0), r['row'])):
        pred = r['last'].get('avg') or r['last'].get('logits') or next(iter(r['last'].values()))
        ours = [pred.get(k) for k in ('top1', 'head', 'mid', 'tail')]
        imb = int(r['imb_factor']) if r['imb_factor'] else None
        paper = PUBLISHED.get((r['dataset'], imb, r['row']))
        hours = f'{r["wall_time_s"] / 60:.1f} min' if r.get('wall_time_s') else ''
        lines.append(f'| {r["dataset"]} | {imb or "-"} | {ROW_LABELS.get(r["row"], r["row"])} | '
                     f'{fmt([x for x in ours if x is not None])} | {fmt(paper)} | {hours} |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='*', type=Path, help='run folders (with report.json) to collect')
    p.add_argument('--rebalance', type=Path, help='a tools/rebalance.py output folder to collect')
    p.add_argument('--method', default='crt', help='which rebalancing method to collect')
    p.add_argument('--name', help='results name (default: the run name)')
    p.add_argument('--row', help='table row id (default: inferred from the name)')
    p.add_argument('--out', type=Path, default=RESULTS)
    p.add_argument('--table', action='store_true', help='print the markdown table of all results')
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        if not (run / 'report.json').is_file():
            print(f'error: {run} has no report.json (not finished?)', file=sys.stderr)
            return 2
        r = collect_run(run, args.name if len(args.runs) == 1 else None, args.row)
        (args.out / f'{r["name"]}.json').write_text(json.dumps(r, indent=1))
        print(f'{r["name"]} -> {args.out / (r["name"] + ".json")}')
    if args.rebalance:
        if not args.name:
            p.error('--rebalance needs --name (e.g. cifar10_lt_if100_vit_crt)')
        r = collect_rebalance(args.rebalance, args.name, args.method)
        (args.out / f'{r["name"]}.json').write_text(json.dumps(r, indent=1))
        print(f'{r["name"]} -> {args.out / (r["name"] + ".json")}')
    if args.table:
        results = [json.loads(f.read_text()) for f in sorted(args.out.glob('*.json'))]
        print(table(results) if results else 'no results yet')
    return 0


if __name__ == '__main__':
    sys.exit(main())
