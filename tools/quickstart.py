"""The whole DeiT-LT pipeline on the bundled, real long-tailed digits data, on a laptop CPU (no GPU, no download).

    python tools/quickstart.py                      # (bash quickstart.sh installs first, then runs this)
    python tools/quickstart.py --output-dir runs/qs --scale 0.3     # shorter schedules (the test suite does this)

Stages (two at a time on a 2-core machine, since each run uses one core well):
  1. teacher  ResNet-32 with LDAM + DRW + SAM             tools/train_teacher.py
     vit      ViT baseline (CLS token only, no teacher)    accelerate launch --cpu tools/train.py
  2. deit_lt  DeiT-LT student distilled from the teacher   accelerate launch --cpu tools/train.py
     vit+crt  cRT / tau-norm on the ViT's frozen features  tools/rebalance.py
then a comparison table (overall / head / mid / tail test accuracy), a per-class accuracy plot and the locations of
all outputs. Every number comes from the final epoch of a fixed schedule: nothing is selected on the test split
(the rebalancing picks tau and the cRT epoch on a validation split of held-out training images).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN = str(REPO / 'tools' / 'train.py')


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
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(threads), WANDB_SILENT='true',
               TQDM_DISABLE='1')
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


def _row(name: str, r: dict) -> dict:
    return {'model': name, **{k: r[k] for k in ('top1', 'head', 'mid', 'tail')}}


def collect(out: Path) -> list[dict]:
    """Table rows (test split, final epochs) from the stages' reports."""
    teacher = json.loads((out / 'teacher' / 'report.json').read_text())
    vit = json.loads((out / 'vit' / 'report.json').read_text())
    deit = json.loads((out / 'deit_lt' / 'report.json').read_text())
    reb = json.loads((out / 'vit_rebalance' / 'report.json').read_text())
    rows = [_row('Teacher ResNet-32 (LDAM+DRW+SAM)', teacher['last']['test']['logits']),
            _row('ViT (no teacher)', vit['last']['test']['logits'])]
    for method, label in (('crt', 'ViT + cRT'), ('tau_norm', 'ViT + tau-norm')):
        if method in reb['methods']:
            rows.append(_row(label, reb['methods'][method]['test']['logits']))
    for p in ('cls', 'dist', 'avg'):
        rows.append(_row(f'DeiT-LT {p.upper()}', deit['last']['test'][p]))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f'{"model (test accuracy, %)":<36}{"overall":>9}{"head":>8}{"mid":>8}{"tail":>8}']
    for r in rows:
        lines.append(f'{r["model"]:<36}{r["top1"]:>9.1f}{r["head"]:>8.1f}{r["mid"]:>8.1f}{r["tail"]:>8.1f}')
    return '\n'.join(lines)


def plot(out: Path) -> Path:
    from deit_lt.tracking import plot_per_class_accuracy
    vit = json.loads((out / 'vit' / 'report.json').read_text())['last']['test']
    deit = json.loads((out / 'deit_lt' / 'report.json').read_text())
    teacher = json.loads((out / 'teacher' / 'report.json').read_text())['last']['test']['logits']
    d = deit['last']['test']
    counts = json.loads((out / 'teacher' / 'class_counts.json').read_text())
    counts = counts.get('train_counts', counts) if isinstance(counts, dict) else counts
    return plot_per_class_accuracy(
        {'ViT': vit['logits']['per_class'], 'teacher': teacher['per_class'], 'DeiT-LT DIST': d['dist']['per_class'],
         'DeiT-LT AVG': d['avg']['per_class']}, counts, out / 'per_class_accuracy.png',
        title='digits_lt (IF 10): per-class test accuracy', groups=deit.get('splits', {}).get('groups'))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--output-dir', type=Path, default=REPO / 'runs' / 'quickstart')
    p.add_argument('--scale', type=float, default=1.0, help='multiply every schedule (epochs) by this factor')
    p.add_argument('--wandb', default='offline', choices=('offline', 'disabled', 'online'))
    p.add_argument('--sequential', action='store_true', help='one stage at a time (all cores each)')
    args = p.parse_args(argv)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def epochs(n: int) -> int:
        return max(2, round(n * args.scale))
    e_t, e_s = epochs(40), epochs(60)
    common = [f'wandb.mode={args.wandb}', 'runtime.progress=false']
    accel = [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1',
             '--mixed_precision', 'no', '--dynamo_backend', 'no']
    # the teacher recipe at the same fractions of a (shorter) schedule: DRW and lr steps at 80% / 90%
    t_drw = min(e_t - 1, round(e_t * 0.8))
    teacher = [sys.executable, str(REPO / 'tools' / 'train_teacher.py'), '--config',
               str(REPO / 'configs' / 'teachers' / 'digits_lt.yaml'), f'runtime.output_dir={out / "teacher"}',
               f'optim.epochs={e_t}', f'optim.warmup_epochs={min(2, e_t - 1)}', f'loss.drw_epoch={t_drw}',
               f'optim.milestones=[{t_drw},{min(e_t - 1, round(e_t * 0.9))}]', *common]
    s_warm = f'optim.warmup_epochs={min(2, e_s - 1)}'
    vit = accel + [TRAIN, '--config', str(REPO / 'configs' / 'digits_lt' / 'vit.yaml'),
                   f'runtime.output_dir={out / "vit"}', f'optim.epochs={e_s}', s_warm, *common]
    deit = accel + [TRAIN, '--config', str(REPO / 'configs' / 'digits_lt' / 'deit_lt.yaml'),
                    f'teacher.checkpoint={out / "teacher" / "last.safetensors"}', f'runtime.output_dir={out / "deit_lt"}',
                    f'optim.epochs={e_s}', f'distill.drw_epoch={e_s // 2}', s_warm, *common]
    rebalance = [sys.executable, str(REPO / 'tools' / 'rebalance.py'), '--checkpoint', str(out / 'vit' / 'last.safetensors'),
                 '--method', 'crt,tau_norm', '--config', str(REPO / 'configs' / 'rebalance' / 'digits_lt.yaml'),
                 f'runtime.output_dir={out / "vit_rebalance"}', f'wandb.mode={args.wandb}']
    phases = [[('teacher', teacher), ('vit', vit)], [('deit_lt', deit), ('vit+crt', rebalance)]]
    cores = os.cpu_count() or 1
    print(f'[quickstart] digits_lt (scikit-learn digits, long-tailed IF 10), {cores} cores, outputs in {out}')
    for i, phase in enumerate(phases, 1):
        print(f'[quickstart] phase {i}/2: {" + ".join(n for n, _ in phase)}', flush=True)
        if args.sequential:
            for stage in phase:
                run_parallel([stage], out, cores)
        else:
            run_parallel(phase, out, max(1, cores // len(phase)))

    rows = collect(out)
    table = format_rows(rows)
    png = plot(out)
    (out / 'summary.json').write_text(json.dumps({'rows': rows, 'wall_time_s': round(time.time() - t0, 1),
                                                  'scale': args.scale}, indent=1))
    print('\n' + table)
    vit_tail = next(r['tail'] for r in rows if r['model'] == 'ViT (no teacher)')
    dist_tail = next(r['tail'] for r in rows if r['model'] == 'DeiT-LT DIST')
    verdict = ('above' if dist_tail > vit_tail + 1 else 'not above' if dist_tail < vit_tail - 1 else 'level with')
    print(f'\nfew-shot (tail) classes: DeiT-LT DIST {dist_tail:.1f}% is {verdict} the ViT\'s {vit_tail:.1f}% '
          f'(test split, final epochs)')
    print(f'\n[quickstart] done in {time.time() - t0:.0f} s. Outputs:')
    for label, path in (('summary', out / 'summary.json'), ('per-class plot', png),
                        ('teacher', out / 'teacher'), ('ViT', out / 'vit'), ('DeiT-LT', out / 'deit_lt'),
                        ('rebalancing', out / 'vit_rebalance'), ('stage logs', out / '*.log')):
        print(f'  {label:<15} {path}')
    wandb_runs = sorted(out.glob('*/wandb/offline-run-*'))
    if wandb_runs:
        print(f'  {"W&B offline":<15} ' + '\n  '.join(f'{"":<15} {w}' if i else str(w) for i, w in enumerate(wandb_runs)))
        print(f'  (upload with: wandb sync {wandb_runs[0].parent}/offline-run-*)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
