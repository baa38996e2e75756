"""Train a DeiT-LT student (or a ViT / DeiT baseline) on long-tailed data.

    python tools/train.py --config configs/digits_lt/deit_lt.yaml [key.sub=value ...]
    accelerate launch --multi_gpu --num_processes 8 tools/train.py --config configs/cifar10_lt/deit_lt_ldam_if100.yaml
    accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        tools/train.py --config configs/digits_lt/deit_lt.yaml                       # CPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no tools/train.py --config configs/digits_lt/vit.yaml        # 2 CPU processes (gloo)

Overrides are dotted config keys (`optim.lr=1e-3 runtime.output_dir=runs/x wandb.mode=disabled`); an unknown key
is an error. `optim.batch_size` is the global batch of one update (all processes and accumulation steps together).
`runtime.resume=auto` continues the run in `runtime.output_dir` from its latest checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deit_lt.cli import config_parser, run_tool  # noqa: E402
from deit_lt.config import TrainConfig, load_config  # noqa: E402
from deit_lt.eval import format_report  # noqa: E402
from deit_lt.runtime import create_accelerator  # noqa: E402


def main(argv=None) -> int:
    args = config_parser(__doc__, 'configs/digits_lt/deit_lt.yaml').parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    accelerator = create_accelerator(cfg.runtime)
    try:
        from deit_lt.student import train
        result = train(cfg, accelerator)
    finally:
        accelerator.end_training()
    if accelerator.is_main_process and 'test' in result['last']:
        state = 'final' if result['finished'] else 'UNFINISHED'
        print(format_report(result['last']['test'], f'{state} ({cfg.name}, after {result["progress"]["updates_done"]}'
                                                    f' updates): test'))
        if 'best' in result:
            b = result['best']
            print(f'best {b["predictor"].upper()} top-1 on {b["split"]}: {b["top1"]:.2f} (epoch {b["epoch"] + 1})')
        print(f'outputs in {cfg.runtime.output_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
