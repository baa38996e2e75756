"""Train a CNN teacher (CE / LDAM, DRW, SAM) on long-tailed data, for DeiT-LT to distil from.

    python tools/train_teacher.py --config configs/teachers/cifar10_lt_if100_ldam_drw_sam.yaml [key.sub=value ...]
    accelerate launch --multi_gpu --num_processes 8 tools/train_teacher.py --config \
        configs/teachers/imagenet_lt_r50_ldam_drw_sam.yaml                           # several GPUs (DDP)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tools/train_teacher.py --config configs/teachers/digits_lt.yaml
                                                                                     # 2 CPU processes (gloo)

Overrides are dotted config keys (`optim.epochs=2 sam.rho=0.5 runtime.output_dir=runs/t wandb.mode=disabled`); an
unknown key is an error. `optim.batch_size` is the global batch (split over processes). `runtime.resume=auto`
continues the run in `runtime.output_dir` from its latest checkpoint. The trained teacher is
`<output_dir>/best.safetensors` (best test top-1, as the originals) and `last.safetensors`; pass either as
`teacher.checkpoint` to tools/train.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deit_lt.checkpoint import CheckpointError  # noqa: E402
from deit_lt.config import ConfigError, load_config  # noqa: E402
from deit_lt.data import DatasetError  # noqa: E402
from deit_lt.runtime import NonFiniteLossError, create_accelerator  # noqa: E402
from teachers.config import TeacherTrainConfig, validate_config  # noqa: E402
from teachers.train import train_teacher  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML config (may name `base` files), e.g. configs/teachers/digits_lt.yaml')
    parser.add_argument('overrides', nargs='*', help='dotted overrides, e.g. optim.epochs=2')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TeacherTrainConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        validate_config(cfg)          # before any process group or device is set up
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    accelerator = create_accelerator(cfg.runtime)
    try:
        result = train_teacher(cfg, accelerator)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        accelerator.end_training()
        return 1
    if accelerator.is_main_process:
        best, last = result['best'], result['last']['test']
        summary = (f'best {best["split"]} top-1 {best["top1"]:.2f} (epoch {best["epoch"]}), ' if best['epoch'] > 0
                   else '')
        print(f'[teacher] done after {result["global_step"]} steps: {summary}last test top-1 {last["top1"]:.2f}, '
              f'{result["train_time_per_step_s"]} s/step training; outputs in {cfg.runtime.output_dir}')
    accelerator.end_training()
    return 0


if __name__ == '__main__':
    sys.exit(main())
