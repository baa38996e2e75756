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

from deit_lt.cli import config_parser, run_tool  # noqa: E402
from deit_lt.config import load_config  # noqa: E402
from deit_lt.eval import format_report  # noqa: E402
from deit_lt.runtime import create_accelerator  # noqa: E402
from teachers.config import TeacherTrainConfig, validate_config  # noqa: E402


def main(argv=None) -> int:
    args = config_parser(__doc__, 'configs/teachers/digits_lt.yaml').parse_args(argv)
    cfg = load_config(TeacherTrainConfig, args.config, args.overrides)
    validate_config(cfg)              # before any process group or device is set up
    accelerator = create_accelerator(cfg.runtime)
    try:
        from teachers.recipe import train_teacher
        result = train_teacher(cfg, accelerator)
    finally:
        accelerator.end_training()
    if accelerator.is_main_process and 'test' in result['last']:
        state = 'done' if result['finished'] else 'UNFINISHED'
        print(format_report(result['last']['test'], f'[teacher] {state} after {result["progress"]["updates_done"]} '
                                                    f'updates: test'))
        if 'best' in result:
            b = result['best']
            print(f'best top-1 on {b["split"]}: {b["top1"]:.2f} (epoch {b["epoch"] + 1})')
        print(f'outputs in {cfg.runtime.output_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
