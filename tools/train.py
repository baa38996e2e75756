"""Train a DeiT-LT student (or a ViT / DeiT baseline) on long-tailed data.

    python tools/train.py --config configs/cifar10_lt/deit_lt_ldam_if100.yaml [key.sub=value ...]
    accelerate launch --multi_gpu --num_processes 8 tools/train.py --config ...      # several GPUs
    accelerate launch --cpu tools/train.py --config configs/digits_lt/deit_lt.yaml   # CPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tools/train.py --config ...          # 2 CPU processes (gloo)

Overrides are dotted config keys (`optim.lr=1e-3 runtime.output_dir=runs/x wandb.mode=disabled`); an unknown key
is an error. `runtime.resume=auto` continues the run in `runtime.output_dir` from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deit_lt.checkpoint import CheckpointError  # noqa: E402
from deit_lt.config import ConfigError, TrainConfig, load_config  # noqa: E402
from deit_lt.data import DatasetError  # noqa: E402
from deit_lt.runtime import NonFiniteLossError, create_accelerator  # noqa: E402
from deit_lt.training import ConfigurationError, format_report_table, train  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML config (may name `base` files)')
    parser.add_argument('overrides', nargs='*', help='dotted overrides, e.g. optim.lr=1e-3')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    accelerator = create_accelerator(cfg.runtime)
    try:
        result = train(cfg, accelerator)
    except (ConfigError, ConfigurationError, DatasetError, CheckpointError, NonFiniteLossError) as e:
        print(f'error: {e}', file=sys.stderr)
        accelerator.end_training()
        return 1
    if accelerator.is_main_process and 'last' in result:
        print(format_report_table(result['last']['test'], f'final ({cfg.name}, after {result["updates"]} updates)'))
        best = result['best']
        if best.get('epoch', -1) >= 0:
            print(f'best {best["predictor"].upper()} top-1 on {best["select_on"]}: {best["top1"]:.2f} '
                  f'(epoch {best["epoch"]})')
        print(f'outputs in {cfg.runtime.output_dir}')
    accelerator.end_training()
    return 0


if __name__ == '__main__':
    sys.exit(main())
