"""Classifier re-balancing (Decoupling: cRT, tau-norm, LWS, NCM) of a trained deit-lt model.

    python tools/rebalance.py --checkpoint runs/deit_lt/best.safetensors --method all
    python tools/rebalance.py --checkpoint teacher.safetensors --method crt,ncm \\
        --config configs/rebalance/cifar10_lt.yaml crt.heads=[cls] runtime.output_dir=runs/rebalance/c10

Dotted overrides (`section.key=value`) apply on top of the config file, whose `data` / `aug` sections in turn apply
on top of the checkpoint's own training config. Features are cached in `<output_dir>/features/`, so a second run
(e.g. another method) skips the backbone. Writes report.json, weight_norms.png, tau_sweep.{json,png}, one
`<method>.safetensors` per linear method and `ncm_<feature>.safetensors`. Runs on one device (the whole cost is a
single forward pass over the data); no `accelerate launch` needed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from deit_lt.cli import run_tool  # noqa: E402
from deit_lt.rebalance import format_table, load_rebalance_config, run_rebalance  # noqa: E402


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='deit-lt model file (.safetensors) of a student or teacher')
    p.add_argument('--method', default=None,
                   help='crt, tau_norm, lws, ncm, all, or a comma list (default: the config\'s methods, i.e. all)')
    p.add_argument('--config', default=None, help='YAML config (e.g. configs/rebalance/default.yaml)')
    p.add_argument('overrides', nargs='*', help='dotted overrides, e.g. crt.epochs=5 data.val_per_class=20')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    cfg = load_rebalance_config(args.config, args.overrides, checkpoint=args.checkpoint, methods=args.method)
    report = run_rebalance(cfg)
    for split in ('val', 'test'):
        if split in report['joint']:
            print('\n' + format_table(report, split))
    print(f'\nreport: {report["output_dir"]}/report.json')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
