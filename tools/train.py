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

from deit_lt.cli import run_tool, train_main  # noqa: E402
from deit_lt.config import TrainConfig  # noqa: E402
from deit_lt.student import train  # noqa: E402


def main(argv=None) -> int:
    return train_main(argv, doc=__doc__, example='configs/digits_lt/deit_lt.yaml', config_cls=TrainConfig, train=train)


if __name__ == '__main__':
    sys.exit(run_tool(main))
