"""The whole DeiT-LT pipeline on the bundled, real long-tailed digits data, on a laptop CPU (no GPU, no download).

    python tools/quickstart.py                      # (bash quickstart.sh installs first, then runs this)
    python tools/quickstart.py --output-dir runs/qs --scale 0.25    # shorter schedules (the test suite does this)
    python tools/quickstart.py --analyze            # and the DeiT-LT analyses of the three models at the end

Stages (two at a time on a 2-core machine, since each run uses one core well):
  1. teacher  ResNet-32 with LDAM + DRW + SAM             tools/train_teacher.py
     vit      ViT baseline (CLS token only, no teacher)    tools/train.py runtime.cpu=true
  2. deit_lt  DeiT-LT student distilled from the teacher   tools/train.py runtime.cpu=true
     vit+crt  cRT / tau-norm on the ViT's frozen features  tools/rebalance.py
  3. analyze  (with --analyze) attention distance, feature rank, CLS/DIST expertise, calibration  tools/analyze.py
then a comparison table (overall / head / mid / tail test accuracy), a per-class accuracy plot, the locations of all
outputs and the commands of the next steps. Every number comes from the final epoch of a fixed schedule: nothing is
selected on the test split (the rebalancing picks tau and the cRT epoch on a validation split of held-out training
images). `--scale s` passes `optim.epochs_scale=s` to the three training runs (epochs, warm-up, DRW epoch, learning
rate steps and evaluation cadence scale together). Each stage's output goes to `<output-dir>/<stage>.log` and,
prefixed with the stage name, to the console; training and feature extraction report progress at least every 10 s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from a checkout without installing

TRAIN = str(REPO / 'tools' / 'train.py')
# One CPU process per stage: tools/train.py builds its own Accelerator, so `accelerate launch --cpu` would only add a
# launcher process (3-4 s of start and exit per stage here) for the same run: the reports are identical either way.
ROWS = (('teacher', 'logits', 'Teacher ResNet-32 (LDAM+DRW+SAM)'), ('vit', 'logits', 'ViT (no teacher)'),
        ('crt', 'logits', 'ViT + cRT'), ('tau_norm', 'logits', 'ViT + tau-norm'),
        ('deit_lt', 'cls', 'DeiT-LT CLS'), ('deit_lt', 'dist', 'DeiT-LT DIST'), ('deit_lt', 'avg', 'DeiT-LT AVG'))


def _stream(name: str, proc: subprocess.Popen, log: Path, lines: list[str]) -> None:
    with open(log, 'w') as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            text = line.rstrip()
            if text:
                lines.append(text)
                print(f'[{name:>8}] {text}', flush=True)


def run_parallel(stages: list[tuple[str, list[str]]], out: Path, threads: int) -> None:
    """Run commands side by side, prefixing their output; stop with the first failure's log tail."""
    # Output is a pipe, so deit_lt's progress displays print a plain line at most every 10 s (no bars).
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(threads), WANDB_SILENT='true')
    procs = []
    for name, cmd in stages:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        t = threading.Thread(target=_stream, args=(name, p, out / f'{name}.log', lines), daemon=True)
        t.start()
        procs.append((name, p, t, lines))
    failed = []
    for name, p, t, lines in procs:
        p.wait()
        t.join()
        if p.returncode != 0:
            failed.append((name, p.returncode, lines))
    if failed:
        for name, code, lines in failed:
            print(f'\n[quickstart] stage {name} failed (exit {code}); last lines:\n  ' + '\n  '.join(lines[-15:]))
        raise SystemExit(1)


def _value(v) -> float | None:
    """A metric, or None for a group without classes (NaN / null in the reports)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def collect(out: Path) -> list[dict]:
    """Table rows (test split, final epochs) from the stages' reports; a row of an unfinished run says so."""
    runs = {stage: _read(out / stage / 'report.json') for stage in ('teacher', 'vit', 'deit_lt')}
    reb = _read(out / 'vit_rebalance' / 'report.json')
    rows = []
    for source, predictor, label in ROWS:
        if source in runs:
            report = runs[source]
            metrics = report['last']['test'][predictor]
            finished = bool(report.get('finished'))
        elif source in reb['methods']:
            metrics = reb['methods'][source]['test'][predictor]
            finished = bool(runs['vit'].get('finished'))   # re-balancing runs to its end; its ViT may not have
        else:
            continue
        rows.append({'model': label, **{k: _value(metrics.get(k)) for k in ('top1', 'head', 'mid', 'tail')},
                     'finished': finished})
    return rows


def format_rows(rows: list[dict]) -> str:
    def cell(v: float | None, width: int) -> str:
        return f'{"-":>{width}}' if v is None else f'{v:>{width}.1f}'
    lines = [f'{"model (test accuracy, %)":<36}{"overall":>9}{"head":>8}{"mid":>8}{"tail":>8}']
    for r in rows:
        mark = '' if r['finished'] else '  (unfinished run)'
        lines.append(f'{r["model"]:<36}{cell(r["top1"], 9)}{cell(r["head"], 8)}{cell(r["mid"], 8)}'
                     f'{cell(r["tail"], 8)}{mark}')
    return '\n'.join(lines)


def plot(out: Path) -> Path:
    """Per-class test accuracy of the ViT, the teacher, DeiT-LT's DIST and AVG heads and ViT + cRT."""
    from deit_lt.tracking import plot_per_class_accuracy
    teacher, vit, deit = (_read(out / s / 'report.json') for s in ('teacher', 'vit', 'deit_lt'))
    reb = _read(out / 'vit_rebalance' / 'report.json')
    series = {'ViT': vit['last']['test']['logits']['per_class'],
              'teacher': teacher['last']['test']['logits']['per_class']}
    if 'crt' in reb['methods']:
        series['ViT + cRT'] = reb['methods']['crt']['test']['logits']['per_class']
    series |= {'DeiT-LT DIST': deit['last']['test']['dist']['per_class'],
               'DeiT-LT AVG': deit['last']['test']['avg']['per_class']}
    counts = _read(out / 'deit_lt' / 'class_counts.json')
    data = deit.get('dataset') or {}
    return plot_per_class_accuracy(series, counts['train_counts'], out / 'per_class_accuracy.png',
                                   title=f'{data.get("name", "digits_lt")} (IF {data.get("imb_factor", 10):g}): '
                                         f'per-class test accuracy, final epochs',
                                   groups=counts.get('groups'), class_names=counts.get('class_names'))


def _shown(cmd: list[str]) -> str:
    """A command as a user would type it from the repository root."""
    parts = ['python' if c == sys.executable else c for c in cmd]
    parts = [os.path.relpath(c, REPO) if c.startswith(str(REPO) + os.sep) else c for c in parts]
    return ' '.join(shlex.quote(c) for c in parts)


def stage_commands(out: Path, scale: float, wandb: str) -> dict[str, list[str]]:
    """The command line of each quickstart stage, outputs under `out`."""
    # progress on: stage output is a pipe, so it comes as a plain line at most every 10 s
    # the demo regenerates its outputs on every run: its output folders are taken over, not resumed
    common = [f'wandb.mode={wandb}', 'runtime.progress=true', 'runtime.overwrite=true'] + \
        ([f'optim.epochs_scale={scale:g}'] if scale != 1.0 else [])
    teacher = [sys.executable, str(REPO / 'tools' / 'train_teacher.py'), '--config',
               str(REPO / 'configs' / 'teachers' / 'digits_lt.yaml'), f'runtime.output_dir={out / "teacher"}', *common]
    vit = [sys.executable, TRAIN, '--config', str(REPO / 'configs' / 'digits_lt' / 'vit.yaml'),
           f'runtime.output_dir={out / "vit"}', 'runtime.cpu=true', *common]
    deit = [sys.executable, TRAIN, '--config', str(REPO / 'configs' / 'digits_lt' / 'deit_lt.yaml'),
            f'teacher.checkpoint={out / "teacher" / "last.safetensors"}', f'runtime.output_dir={out / "deit_lt"}',
            'runtime.cpu=true', *common]
    rebalance = [sys.executable, str(REPO / 'tools' / 'rebalance.py'), '--checkpoint',
                 str(out / 'vit' / 'last.safetensors'), '--method', 'crt,tau_norm', '--config',
                 str(REPO / 'configs' / 'rebalance' / 'digits_lt.yaml'), f'runtime.output_dir={out / "vit_rebalance"}',
                 f'wandb.mode={wandb}', 'runtime.progress=true']
    # analyze.py's progress bars are tqdm's own (carriage-return frames in a pipe); its log names each model instead
    analyze = [sys.executable, str(REPO / 'tools' / 'analyze.py'), '--checkpoint', str(out / 'deit_lt'),
               '--compare', str(out / 'vit'), str(out / 'teacher'), '--labels', 'DeiT-LT,ViT,teacher',
               '--out', str(out / 'analysis'), f'wandb.mode={wandb}', 'progress=false']
    collect = [sys.executable, str(REPO / 'tools' / 'collect_results.py'), str(out / 'teacher'), str(out / 'vit'),
               str(out / 'deit_lt'), str(out / 'vit_rebalance'), '--out', str(out / 'results'), '--table']
    return {'teacher': teacher, 'vit': vit, 'deit_lt': deit, 'vit+crt': rebalance, 'analyze': analyze,
            'collect': collect}


def print_summary(out: Path, rows: list[dict], png: Path, cmds: dict[str, list[str]], analyzed: bool,
                  seconds: float) -> None:
    """The results table, the tail verdict, where the outputs are and what to run next."""
    print('\n' + format_rows(rows))
    vit_tail = next(r['tail'] for r in rows if r['model'] == 'ViT (no teacher)')
    dist_tail = next(r['tail'] for r in rows if r['model'] == 'DeiT-LT DIST')
    if vit_tail is not None and dist_tail is not None:
        verdict = 'above' if dist_tail > vit_tail + 1 else 'below' if dist_tail < vit_tail - 1 else 'level with'
        print(f'\nfew-shot (tail) classes: DeiT-LT DIST {dist_tail:.1f}% is {verdict} the ViT\'s {vit_tail:.1f}% '
              f'(test split, final epochs)')
    print(f'\n[quickstart] done in {seconds:.0f} s. Outputs:')
    outputs = [('summary', out / 'summary.json'), ('per-class plot', png), ('teacher', out / 'teacher'),
               ('ViT', out / 'vit'), ('DeiT-LT', out / 'deit_lt'), ('rebalancing', out / 'vit_rebalance')]
    if analyzed:
        outputs.append(('analysis', out / 'analysis'))
    for label, path in outputs + [('stage logs', out / '*.log')]:
        print(f'  {label:<15} {path}')
    wandb_runs = sorted(out.glob('*/wandb/offline-run-*'))
    for i, w in enumerate(wandb_runs):
        print(f'  {"W&B offline" if i == 0 else "":<15} {w}')
    if wandb_runs:
        print(f'  {"":<15} (upload with: wandb sync {out}/*/wandb/offline-run-*)')
    print('\nNext steps:')
    if not analyzed:
        print(f'  the DeiT-LT analyses (attention distance, feature rank, CLS/DIST expertise, calibration):\n'
              f'    {_shown(cmds["analyze"])}')
    print(f'  results records and their table:\n    {_shown(cmds["collect"])}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output-dir', type=Path, default=REPO / 'runs' / 'quickstart')
    p.add_argument('--scale', type=float, default=1.0,
                   help='multiply every training schedule by this factor (optim.epochs_scale)')
    p.add_argument('--wandb', default='offline', choices=('offline', 'disabled', 'online'))
    p.add_argument('--sequential', action='store_true', help='one stage at a time (all cores each)')
    p.add_argument('--analyze', action='store_true',
                   help='also run tools/analyze.py on DeiT-LT, the ViT and the teacher (about 30 s more)')
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error(f'--scale must be > 0, got {args.scale}')
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    cmds = stage_commands(out, args.scale, args.wandb)
    phases = [[(n, cmds[n]) for n in ('teacher', 'vit')], [(n, cmds[n]) for n in ('deit_lt', 'vit+crt')]]
    if args.analyze:
        phases.append([('analyze', cmds['analyze'])])
    cores = os.cpu_count() or 1
    print(f'[quickstart] digits_lt (scikit-learn digits, long-tailed IF 10), {cores} cores, schedules x{args.scale:g}, '
          f'outputs in {out}', flush=True)
    for i, phase in enumerate(phases, 1):
        print(f'[quickstart] phase {i}/{len(phases)}: {" + ".join(n for n, _ in phase)}', flush=True)
        if args.sequential:
            for stage in phase:
                run_parallel([stage], out, cores)
        else:
            run_parallel(phase, out, max(1, cores // len(phase)))

    rows = collect(out)
    png = plot(out)
    (out / 'summary.json').write_text(json.dumps({'rows': rows, 'wall_time_s': round(time.time() - t0, 1),
                                                  'scale': args.scale, 'analysis': args.analyze}, indent=1))
    print_summary(out, rows, png, cmds, args.analyze, time.time() - t0)
    return 0


if __name__ == '__main__':
    sys.exit(main())
