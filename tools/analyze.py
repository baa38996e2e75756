"""The DeiT-LT analyses of one or more trained models: figures and one JSON of the numbers behind them.

    python tools/analyze.py --checkpoint runs/quickstart/deit_lt --compare runs/quickstart/vit \\
        runs/quickstart/teacher --labels DeiT-LT,ViT,teacher --out runs/analysis/quickstart
    python tools/analyze.py --checkpoint runs/cifar10_lt_if100_vit/last.safetensors \\
        --compare runs/rebalance/cifar10_lt_if100_vit_last/crt.safetensors --data /data --analyses geometry,calibration
    python tools/analyze.py --checkpoint runs/deit_lt_sam --compare runs/deit_lt_nosam --analyses rank \\
        num_images=2048 rank_rtol=1e-4 wandb.mode=disabled

A checkpoint is a run folder (its last.safetensors) or a model file: students, teachers and re-balanced models.
The data come from the first checkpoint's training config (`--data` sets its root; `data.*` / `aug.*` override).
Writes to `--out`: attention_distance.png, feature_rank.png, feature_spectrum.png, expertise.png,
classifier_norms.png, reliability.png and analysis.json, and logs them to W&B (offline by default, in
`<out>/wandb/`). Runs on the GPU when there is one (`cpu=true` to force the CPU); one process, no accelerate.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from deit_lt.analysis import load_analysis_config, run_analysis  # noqa: E402
from deit_lt.cli import run_tool  # noqa: E402


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--checkpoint', required=True, help='run folder or .safetensors model file (supplies the data)')
    p.add_argument('--compare', nargs='+', action='extend', default=[], metavar='CKPT',
                   help='more run folders / model files, analysed on the same data and drawn side by side')
    p.add_argument('--labels', default=None, help='comma list, one per checkpoint (default: <folder>/<file stem>)')
    p.add_argument('--teacher', default=None,
                   help="teacher model file for the DIST-teacher agreement (default: each distilled student's own "
                        "teacher.checkpoint; 'none' to skip)")
    p.add_argument('--data', default=None, metavar='ROOT', help='dataset root (data.root); not needed for digits_lt')
    p.add_argument('--out', default=None, help='output folder (default: runs/analysis/<folder>_<stem>)')
    p.add_argument('--analyses', default=None,
                   help='attention, rank, expertise, geometry, calibration, all, or a comma list (default: all)')
    p.add_argument('--cpu', action='store_true', default=None, help='run on the CPU even when a GPU is present')
    p.add_argument('overrides', nargs='*', help='dotted overrides, e.g. num_images=512 split=val data.root=/data')
    return p.parse_args(argv)


def _summary(report: dict) -> str:
    lines = [f'{report["data"]["name"]} {report["data"]["split"]} split ({report["data"]["num_samples"]} images), '
             f'{report["probe"]["num_images"]} images for attention and rank, on {report["device"]}']
    for label, r in report['results'].items():
        acc = (r.get('expertise') or {}).get('accuracy') or {}
        parts = [f'{p} {a["top1"]:.1f}%' for p, a in acc.items()]
        agree = (r.get('expertise') or {}).get('agreement') or {}
        parts += [f'{k.replace("_", "-")} agree {a["overall"]:.1f}%' for k, a in agree.items() if k != 'avg_teacher']
        att = r.get('attention') or {}
        if 'distance' in att:
            first = sum(att['distance'][0]) / len(att['distance'][0])
            parts.append(f'attn dist block 1 {first:.2f}px')
        lines.append(f'  {label}: ' + ', '.join(parts))
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # `--compare a b key=value`: argparse hands trailing overrides to --compare; give them back
    moved = [c for c in args.compare if '=' in c and not Path(c).exists()]
    args.compare = [c for c in args.compare if c not in moved]
    args.overrides = moved + args.overrides
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    cfg = load_analysis_config(
        [args.checkpoint, *args.compare], args.overrides, data_root=args.data, output_dir=args.out,
        teacher=args.teacher, cpu=args.cpu, analyses=args.analyses.split(',') if args.analyses else None,
        labels=[s.strip() for s in args.labels.split(',')] if args.labels else None)
    report = run_analysis(cfg)
    print(_summary(report))
    for name, path in report['figures'].items():
        print(f'  {name:<19} {path}')
    print(f'report: {report["output_dir"]}/analysis.json ({report["analysis_time_s"]:.1f} s)')
    if report['wandb']:
        print(f'W&B: {report["wandb"]}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
