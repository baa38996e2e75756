"""File runs as results records (`<out>/<name>.json`) and render the README "Results" table from them.

    python tools/collect_results.py runs/teachers/cifar10_lt_if100_ldam_drw_sam runs/cifar10_lt_if100_deit_lt_ldam \\
        --out my_results
    python tools/collect_results.py runs/rebalance/cifar10_lt_if100_vit_last --out my_results    # one per method
    python tools/collect_results.py --table --out my_results     # markdown: my_results/*.json beside the paper
    python tools/collect_results.py runs/cifar10_lt_if100_vit --out results --tracked-results   # the README's source

A run folder is a training run (tools/train.py, tools/train_teacher.py: its report.json) or a re-balancing folder
(tools/rebalance.py; `--rebalance DIR` says so explicitly, a folder is also recognised by its report). A training
run's record is named after the run (its config's `name`, else the folder); a re-balancing folder gives one record
per method, named `<name of the run the checkpoint comes from>_<method>` (e.g. cifar10_lt_if100_vit_crt, the
table's "ViT + cRT" row); `--method crt,tau_norm` picks methods. `--name` renames a single record, `--row` sets the
table row (default: inferred from the name, e.g. 'vit_crt').

A record holds the run's name, kind, table row, dataset and imbalance factor, whether the run finished (else how
far it got and what stopped it), the test accuracy (top-1, top-5, head / mid / tail) of every predictor at the last
epoch and at the best checkpoint (when there is one, with the split it was selected on), wall time, git commit,
machine, library versions and the resolved config.

Rules: nothing is written without `--out`, and the repository's tracked results/ (the README table's source) only
with `--tracked-results`. An unfinished run (stopped by runtime.max_steps, a signal or an error; for a
re-balancing folder: the run its checkpoint comes from, or one whose end is unknown) is refused unless
`--allow-unfinished`; its record and its table row then say so, and how far it got. An existing record of the same
name is an error unless `--force`, and so are two records of one name in one call. Only runs that exist produce
rows: nothing is estimated or copied into our columns. `--table` without `--out` reads the tracked results/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a checkout without installing

from deit_lt.cli import run_tool  # noqa: E402
from deit_lt.errors import ConfigError  # noqa: E402

TRACKED = REPO / 'results'
RESULTS_VERSION = 2
METRICS = ('top1', 'top5', 'head', 'mid', 'tail')

# Published top-1 (overall / head / mid / tail where given) from the DeiT-LT project page and README
# (val-iisc/DeiT-LT) and the teacher paper's README (Saddle-LongTail). Keys: (dataset, IF or None, row).
PUBLISHED = {
    ('cifar10_lt', 100, 'teacher_ldam_drw_sam'): (81.9,), ('cifar10_lt', 100, 'teacher_ce_drw_sam'): (80.6,),
    ('cifar10_lt', 50, 'teacher_ldam_drw_sam'): (84.8,),
    ('cifar10_lt', 100, 'deit_lt_ldam'): (84.8,), ('cifar10_lt', 50, 'deit_lt_ldam'): (87.5,),
    ('cifar10_lt', 100, 'deit_lt_paco'): (87.5, 94.5, 84.1, 85.0),
    ('cifar10_lt', 50, 'deit_lt_paco'): (89.8, 94.9, 87.0, 88.6),
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
    ('imagenet_lt', None, 'deit_lt_paco'): (59.1, 66.6, 58.3, 40.0),
    ('imagenet_lt', None, 'vit'): (37.5, 56.9, 30.4, 10.3),
    ('inat2018', None, 'teacher_ldam_drw_sam'): (70.1, 64.1, 70.5, 71.2),
    ('inat2018', None, 'deit_lt_ldam'): (72.9, 69.0, 73.3, 73.3),
    ('inat2018', None, 'deit_lt_paco'): (75.1, 70.3, 75.2, 76.2),
    ('inat2018', None, 'vit'): (54.2, 64.3, 53.9, 52.1),
    # multi-expert teachers: RIDE (ICLR 2021; MODEL_ZOO.md of frank-xwang/RIDE-LongTailRecognition), MDCS (ICCV 2023,
    # supplementary Table 1), SHIKE (CVPR 2023, abstract)
    ('cifar100_lt', 100, 'teacher_ride'): (48.0,),
    ('cifar100_lt', 100, 'teacher_ride_router'): (48.6, 67.0, 49.9, 25.7),
    ('imagenet_lt', None, 'teacher_ride_resnext50_router'): (55.7, 67.0, 52.2, 36.0),
    ('cifar100_lt', 100, 'teacher_mdcs'): (56.1,),
    ('cifar100_lt', 100, 'teacher_shike_stage2'): (56.3,),
}
ROW_LABELS = {
    'teacher_ldam_drw_sam': 'Teacher ResNet-32/50, LDAM+DRW+SAM',
    'teacher_ce_drw_sam': 'Teacher ResNet-32/50, CE+DRW+SAM',
    'vit': 'ViT (no distillation)', 'vit_crt': 'ViT + cRT', 'vit_tau_norm': 'ViT + tau-norm', 'deit': 'DeiT (no DRW)',
    'deit_lt_ldam': 'DeiT-LT, LDAM+DRW+SAM teacher', 'deit_lt_ce': 'DeiT-LT, CE+DRW+SAM teacher',
    'deit_lt_paco': 'DeiT-LT, PaCo+SAM teacher',
    'teacher_ride': 'RIDE, 3 experts (ResNet-32)', 'teacher_ride_router': 'RIDE, 3 experts + router',
    'teacher_ride_resnext50_router': 'RIDE, 3 experts + router (ResNeXt-50)', 'teacher_mdcs': 'MDCS, 3 experts',
    'teacher_shike_stage2': 'SHIKE, 3 experts (both stages)',
}
# Datasets whose imbalance factor is a setting (the others have one fixed long-tailed split).
_IF_DATASETS = ('cifar10_lt', 'cifar100_lt', 'digits_lt')
_DATASET_PREFIX = re.compile(r'^(cifar10_lt|cifar100_lt|imagenet_lt|inat2018|places_lt|digits_lt)(_if\d+)?_')


def _number(v: Any) -> float | None:
    """A finite metric rounded to 2 decimals; None for missing or NaN values (a group without classes)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return round(float(v), 2)
    return None


def _metrics(split: dict) -> dict[str, dict[str, float | None]]:
    """{predictor: {top1, top5, head, mid, tail}} of one split's report (entries that are not predictors, such as
    'num_samples' or 'agreement', are left out)."""
    return {p: {k: _number(r.get(k)) for k in METRICS if k in r} for p, r in split.items() if isinstance(r, dict)}


def infer_row(name: str, kind: str) -> str:
    """Table row id from a run name: 'cifar10_lt_if100_deit_lt_ldam' -> 'deit_lt_ldam', the teacher
    'cifar10_lt_if100_ldam_drw_sam' -> 'teacher_ldam_drw_sam', 'cifar10_lt_if100_vit_crt' -> 'vit_crt'."""
    base = _DATASET_PREFIX.sub('', name)
    if kind == 'teacher':
        return 'teacher_' + base.replace('_teacher', '')
    return base


def _imb_factor(dataset: str | None, value: Any) -> int | float | None:
    if dataset not in _IF_DATASETS or value is None:
        return None
    return int(value) if float(value).is_integer() else float(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f'{path.parent} has no report.json: not a run folder, or the run never got to its end '
                          f'(an interrupted run writes its report when it stops)') from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f'{path} is not readable JSON: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path} is not a report (a JSON object was expected)')
    return data


def _provenance(report: dict) -> dict:
    return {k: report.get(k) for k in ('wall_time_s', 'git_commit', 'git_dirty', 'machine', 'versions')}


def collect_run(run: Path, report: dict | None = None) -> dict:
    """The record of a training run folder (report_version 2: students and teachers have the same shape)."""
    report = report if report is not None else _read_json(run / 'report.json')
    if report.get('report_version') != 2:
        raise ConfigError(f'{run / "report.json"} has report_version {report.get("report_version")!r}; this tool '
                          f'reads version 2 (written by the current tools/train.py and tools/train_teacher.py)')
    config = yaml.safe_load((run / 'config.yaml').read_text()) if (run / 'config.yaml').is_file() else {}
    kind = report.get('kind', 'student')
    name = report.get('name') or run.name
    dataset = (report.get('dataset') or {}).get('name') or (config.get('data') or {}).get('name')
    imb = (report.get('dataset') or {}).get('imb_factor', (config.get('data') or {}).get('imb_factor'))
    record = {
        'results_version': RESULTS_VERSION, 'name': name, 'kind': kind, 'row': infer_row(name, kind),
        'dataset': dataset, 'imb_factor': _imb_factor(dataset, imb), 'arch': report.get('arch'),
        'finished': bool(report.get('finished')), 'progress': report.get('progress'),
        'stopped_by': report.get('stopped_by'), 'headline': report.get('headline'),
        'run_dir': str(run), 'last': _metrics((report.get('last') or {}).get('test') or {}),
    }
    best = report.get('best')
    if best and 'test' in (best.get('metrics') or {}):
        record['best'] = {'epoch': best.get('epoch'), 'selected_on': best.get('split'),
                          'predictor': best.get('predictor'), 'test': _metrics(best['metrics']['test'])}
    record.update(_provenance(report), config=config)
    return record


def collect_rebalance(folder: Path, methods: list[str] | None = None, report: dict | None = None) -> list[dict]:
    """One record per method of a tools/rebalance.py folder, named `<source run>_<method>`."""
    report = report if report is not None else _read_json(folder / 'report.json')
    if 'methods' not in report or 'joint' not in report:
        raise ConfigError(f'{folder / "report.json"} is not a re-balancing report (no methods / joint sections)')
    available = list(report['methods'])
    chosen = available if not methods else methods
    missing = [m for m in chosen if m not in available]
    if missing:
        raise ConfigError(f'{folder} has no {missing[0]!r} results; it has {", ".join(available) or "none"}')
    source = report.get('source') or _source_of(Path(report['checkpoint']))
    base = source.get('name') or Path(report['checkpoint']).parent.name
    ident = report.get('dataset') or {}
    config = yaml.safe_load((folder / 'config.yaml').read_text()) if (folder / 'config.yaml').is_file() else {}
    records = []
    for method in chosen:
        entry = report['methods'][method]
        name = f'{base}_{method}'
        records.append({
            'results_version': RESULTS_VERSION, 'name': name, 'kind': 'rebalance', 'row': infer_row(name, 'rebalance'),
            'method': method, 'dataset': ident.get('name'), 'imb_factor': _imb_factor(ident.get('name'),
                                                                                      ident.get('imb_factor')),
            'arch': report.get('arch'), 'finished': source.get('finished'), 'progress': source.get('progress'),
            'stopped_by': source.get('stopped_by'), 'source': source, 'checkpoint': report.get('checkpoint'),
            'run_dir': str(folder), 'last': _metrics(entry.get('test') or {}),
            'joint': _metrics((report['joint'] or {}).get('test') or {}),
            'selection': report.get('selection_metric'), **_provenance(report), 'config': config,
        })
    return records


def _source_of(checkpoint: Path) -> dict:
    """For re-balancing reports written before they recorded their source: the checkpoint's run report."""
    path = checkpoint.parent / 'report.json'
    try:
        run = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        run = {}
    run = run if isinstance(run, dict) else {}
    return {'name': run.get('name') or checkpoint.parent.name, 'finished': run.get('finished'),
            'progress': run.get('progress'), 'stopped_by': run.get('stopped_by'),
            'report': str(path) if run else None}


def how_far(record: dict) -> str:
    """'finished', or e.g. 'UNFINISHED: 3/150 updates (2.0%), stopped by max_steps'."""
    if record.get('finished') is True:
        return 'finished'
    if record.get('finished') is None:
        return 'UNFINISHED?: whether the source run finished is unknown'
    prog = record.get('progress') or {}
    done = f'{prog.get("updates_done")}/{prog.get("updates")} updates ({100 * (prog.get("fraction") or 0):.1f}%)'
    by = f', stopped by {record["stopped_by"]}' if record.get('stopped_by') else ''
    who = 'source run ' if record.get('kind') == 'rebalance' else ''
    return f'UNFINISHED: {who}{done}{by}'


def _fmt(values) -> str:
    return ' / '.join('-' if v is None else f'{v:.1f}' for v in values) if values else '-'


def _headline(record: dict) -> tuple[str, dict]:
    last = record['last']
    for p in (record.get('headline'), 'avg', 'logits'):
        if p in last:
            return p, last[p]
    p = next(iter(last), None)
    return p, last.get(p, {})


def table(records: list[dict]) -> str:
    """Markdown: ours (the headline predictor, AVG for students, the logits otherwise; last epoch, test split)
    beside the published number of the same row; an unfinished run says so in its row."""
    lines = ['| dataset | IF | model | predictor | ours: overall / head / mid / tail | paper | status | wall time |',
             '|---|---|---|---|---|---|---|---|']
    for r in sorted(records, key=lambda r: (r.get('dataset') or '', -(r.get('imb_factor') or 0), r['row'],
                                            r['name'])):
        pred, m = _headline(r)
        ours = _fmt([m.get(k) for k in ('top1', 'head', 'mid', 'tail')])
        status = how_far(r)
        if status != 'finished':
            ours += ' (unfinished)'
        paper = PUBLISHED.get((r.get('dataset'), r.get('imb_factor'), r['row']))
        wall = f'{r["wall_time_s"] / 60:.1f} min' if r.get('wall_time_s') else ''
        label = ROW_LABELS.get(r['row'], r['row'])
        lines.append(f'| {r.get("dataset")} | {r.get("imb_factor") or "-"} | {label} ({r["name"]}) | '
                     f'{(pred or "-").upper()} | {ours} | {_fmt(paper)} | {status} | {wall} |')
    return '\n'.join(lines)


def load_records(folder: Path) -> list[dict]:
    """The records in `folder` (JSON files of this tool; others are skipped with a note on stderr)."""
    records = []
    for f in sorted(folder.glob('*.json')):
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f'note: skipping {f}: {e}', file=sys.stderr)
            continue
        if not isinstance(r, dict) or r.get('results_version') != RESULTS_VERSION:
            print(f'note: skipping {f}: not a results record of this version (collect the run again)', file=sys.stderr)
            continue
        records.append(r)
    return records


def _is_tracked(out: Path) -> bool:
    out, tracked = out.resolve(), TRACKED.resolve()
    return out == tracked or tracked in out.parents


def _check_free(path: Path, record: dict, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f'{path} exists (a record named {record["name"]!r}); pass --force to replace it, or '
                          f'--name to file this run under another name')


def _write(path: Path, record: dict) -> None:
    """Write through a temporary file and a rename, so a record is never half-written."""
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(record, indent=1) + '\n')
    os.replace(tmp, path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='*', type=Path, help='run folders (training or re-balancing) to collect')
    p.add_argument('--rebalance', type=Path, action='append', default=[], metavar='DIR',
                   help='a tools/rebalance.py output folder (repeatable); one record per method')
    p.add_argument('--method', default=None, help='re-balancing methods to collect, comma list (default: all in '
                                                 'the report)')
    p.add_argument('--name', help='record name of a single record (default: the run name; re-balancing: '
                                  '<source run>_<method>)')
    p.add_argument('--row', help='table row id (default: inferred from the name, e.g. vit_crt)')
    p.add_argument('--out', type=Path, help='results folder to write to (and the table\'s source); required to '
                                            'collect')
    p.add_argument('--tracked-results', action='store_true',
                   help="allow --out to be the repository's results/ (the README table's source)")
    p.add_argument('--allow-unfinished', action='store_true',
                   help='collect unfinished runs too, marked as such with how far they got')
    p.add_argument('--force', action='store_true', help='replace existing records of the same name')
    p.add_argument('--table', action='store_true', help='print the markdown table of the records in --out')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    folders = [(run, False) for run in args.runs] + [(run, True) for run in args.rebalance]
    if not folders and not args.table:
        raise ConfigError('nothing to do: give run folders to collect (with --out) and/or --table')
    if folders and args.out is None:
        raise ConfigError('--out is required to collect: name a results folder, e.g. --out my_results (the '
                          "repository's results/ needs --tracked-results too)")
    if folders and _is_tracked(args.out) and not args.tracked_results:
        raise ConfigError(f"--out {args.out} is the repository's tracked results/ (the README table's source); "
                          f'add --tracked-results to write there, or name another folder')
    methods = [m.strip() for m in args.method.split(',') if m.strip()] if args.method else None
    records: list[dict] = []
    for folder, is_rebalance in folders:
        report = _read_json(folder / 'report.json')
        if is_rebalance or ('methods' in report and 'joint' in report):
            records += collect_rebalance(folder, methods, report)
        else:
            records.append(collect_run(folder, report))
    if args.name or args.row:
        if len(records) != 1:
            raise ConfigError(f'--name / --row name a single record, and this call makes {len(records)}; collect '
                              f'the runs one at a time (re-balancing: pick one with --method)')
        if args.name:
            records[0]['name'] = args.name
            records[0]['row'] = infer_row(args.name, records[0]['kind'])
        if args.row:
            records[0]['row'] = args.row
    for r in records:
        if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.+-]*', r['name']):
            raise ConfigError(f'record name {r["name"]!r} is not usable as a file name; give one with --name')
    seen: dict[str, str] = {}
    for r in records:
        if r['name'] in seen:
            raise ConfigError(f'{seen[r["name"]]} and {r["run_dir"]} would both be filed as {r["name"]!r}; collect '
                              f'them one at a time with --name')
        seen[r['name']] = r['run_dir']
    unfinished = [r for r in records if r['finished'] is not True]
    if unfinished and not args.allow_unfinished:
        r = unfinished[0]
        raise ConfigError(f'{r["run_dir"]} ({r["name"]}): {how_far(r)}; finish it (runtime.resume=auto) or pass '
                          f'--allow-unfinished to file it marked as unfinished')
    if records:
        args.out.mkdir(parents=True, exist_ok=True)
        for r in records:   # every clash is found before anything is written
            _check_free(args.out / f'{r["name"]}.json', r, args.force)
        for r in records:
            path = args.out / f'{r["name"]}.json'
            _write(path, r)
            note = '' if r['finished'] is True else f'  [{how_far(r)}]'
            print(f'{r["name"]} -> {path}{note}')
    if args.table:
        folder = args.out if args.out is not None else TRACKED
        found = load_records(folder) if folder.is_dir() else []
        print(table(found) if found else f'no results in {folder}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
