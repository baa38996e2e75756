"""Train a CNN teacher (CE / LDAM, DRW, SAM) on long-tailed data, for DeiT-LT to distil from.

    python tools/train_teacher.py --config configs/teachers/cifar10_lt_if100_ldam_drw_sam.yaml [key.sub=value ...]
    accelerate launch --multi_gpu --num_processes 8 tools/train_teacher.py \\
        --config configs/teachers/imagenet_lt_ldam_drw_sam.yaml                      # several GPUs (DDP)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no tools/train_teacher.py --config configs/teachers/digits_lt.yaml   # 2 CPU processes

Overrides are dotted config keys (`optim.epochs=2 sam.rho=0.5 runtime.output_dir=runs/t wandb.mode=disabled`); an
unknown key is an error. `optim.batch_size` is the global batch of one update, as for the student.
`runtime.resume=auto` continues the run in `runtime.output_dir` from its latest checkpoint. The trained teacher is
`<output_dir>/best.safetensors` (best top-1 on the selection split) and `last.safetensors`; pass either as
`teacher.checkpoint` to tools/train.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deit_lt.cli import run_tool, train_main  # noqa: E402
from teachers.config import TeacherTrainConfig, validate_config  # noqa: E402
from teachers.recipe import train_teacher  # noqa: E402


def main(argv=None) -> int:
    return train_main(argv, doc=__doc__, example='configs/teachers/digits_lt.yaml', config_cls=TeacherTrainConfig,
                      train=train_teacher, validate=validate_config)


if __name__ == '__main__':
    sys.exit(run_tool(main))
