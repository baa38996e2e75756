"""Throughput of a full DeiT-LT training step: the fast path against the published code's setup and the model alone.

A step is everything training does per optimizer update: data (index gather or DataLoader), augmentation,
Mixup/CutMix, the frozen teacher's forward on the mixed batch, the student's forward and backward, AdamW. Every path
runs tools/train.py's own step (the `deit_lt.student` recipe, the `deit_lt.engine` micro-step and update),
configured differently, each in a fresh process (its own precision, compile cache and memory statistics):

  fast       data held on the device, batched per-sample augmentation there (deit_lt.data.gpu_aug), bf16 autocast,
             fused AdamW, channels-last teacher, torch.compile per --compile (the defaults of tools/train.py)
  reference  configured like the official DeiT-LT code: 224 px DeiT-B/16, per-image PIL augmentation in DataLoader
             workers, fp16 AMP with a GradScaler, eager (no compile), teacher input resized to 32 px
  ceiling    the fast path's step on one fixed batch already on the device (no data loading, no augmentation;
             Mixup, teacher and student as usual): the upper bound for the fast path

    python tools/benchmark.py                                                     # GPU defaults, all three paths
    python tools/benchmark.py --model deit_small_distilled_patch4_32 --paths fast,ceiling
    python tools/benchmark.py --model deit_base_distilled_patch16_224 --img-size 224 --paths fast,reference
    python tools/benchmark.py --data /data/cifar10_jpeg.npz              # real CIFAR-10-LT pixels
    python tools/benchmark.py --cpu --model deit_micro_distilled_patch2_8 --ref-model deit_micro_distilled_patch2_8 \\
        --img-size 8 --ref-img-size 8 --batch 8 --steps 2 --warmup 1 --workers 0  # CPU smoke test

It prints images/s per path, the ratios fast/reference and fast/ceiling, peak GPU memory, the warm-up (compile)
time and the estimated time of the whole CIFAR-10-LT schedule (1200 epochs x 12,406 images) at each rate.
Without --data the images are synthetic uint8 arrays with CIFAR-10-LT IF100's shape and class counts (pixel values
do not change the cost of any step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CIFAR10_LT_SCHEDULE = 1200 * 12406   # images through the student in the official CIFAR-10-LT IF100 schedule


def _dataset(args, img_size_native: int = 32):
    import numpy as np
    from deit_lt.config import DataConfig
    from deit_lt.data import LTDataset, class_splits_from_bounds, create_datasets, lt_class_counts
    if args.data:
        return create_datasets(DataConfig(name='cifar10_lt', root=args.data, imb_factor=100))['train']
    counts = lt_class_counts(5000, 10, 100)
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(10), counts)
    images = rng.integers(0, 256, (len(targets), img_size_native, img_size_native, args.in_chans), dtype=np.uint8)
    ds = LTDataset(name='cifar10_lt', split='train', targets=targets, num_classes=10,
                   class_names=[str(i) for i in range(10)], images=images)
    ds.splits = class_splits_from_bounds(10, 3, 7)
    return ds


def _teacher_file(args, folder: Path) -> Path:
    """A randomly initialised teacher model file (the cost of a step does not depend on its weights)."""
    import timm
    import torch

    import deit_lt.models  # noqa: F401  (registers resnet32)
    from deit_lt.checkpoint import save_model_file
    torch.manual_seed(0)
    net = timm.create_model(args.teacher, num_classes=10, in_chans=args.in_chans)
    meta = {'kind': 'teacher', 'arch': args.teacher, 'num_classes': 10, 'model_kwargs': {'in_chans': args.in_chans},
            'img_size': args.teacher_size, 'in_chans': args.in_chans}
    return save_model_file(folder / 'teacher.safetensors', net.state_dict(), meta)


def _config(path: str, args, teacher: Path, cuda: bool):
    """The student recipe of tools/train.py configured for one path."""
    from deit_lt.config import TrainConfig, load_config
    reference = path == 'reference'
    model, img = (args.ref_model, args.ref_img_size) if reference else (args.model, args.img_size)
    precision = 'no' if not cuda else ('fp16' if reference else 'bf16')
    return load_config(TrainConfig, None, [
        f'model.name={model}', f'model.img_size={img}', f'optim.batch_size={args.batch}', 'optim.accum_steps=1',
        f'optim.fused={str(cuda and not reference).lower()}', 'distill.type=hard', 'distill.drw_epoch=null',
        f'teacher.checkpoint={teacher}', f'teacher.img_size={args.teacher_size}',
        f'aug.placement={"loader" if reference else "device"}', f'aug.num_workers={args.workers}',
        f'runtime.mixed_precision={precision}', f'runtime.compile={"off" if reference else args.compile}',
        f'runtime.channels_last={str(not reference).lower()}', f'runtime.cpu={str(args.cpu).lower()}',
        'wandb.mode=disabled'])


def measure(path: str, args) -> dict:
    """One path in this process: the training step of tools/train.py (`deit_lt.student` recipe, `deit_lt.engine`
    micro-step and update), timed over `args.steps` updates after `args.warmup`; returns its figures."""
    import torch

    from deit_lt.engine import forward_backward, optimizer_update
    from deit_lt.runtime import create_accelerator
    from deit_lt.student import student_parts

    cuda = torch.cuda.is_available() and not args.cpu
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(path, args, _teacher_file(args, Path(tmp)), cuda)
        accelerator = create_accelerator(cfg.runtime)
        data = _dataset(args)
        parts = student_parts(cfg, accelerator, sets={'train': data, 'test': data})
    model = parts.model.to(accelerator.device)
    if parts.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, parts.optimizer)
    parts.on_epoch(0)
    model.train()

    def batches():
        epoch = 0
        while True:
            for batch in parts.train_batches.iter_epoch(epoch):
                yield batch
            epoch += 1
    stream = batches()
    fixed = next(stream) if path == 'ceiling' else None

    def run(n: int) -> None:
        for _ in range(n):
            batch = fixed if fixed is not None else next(stream)
            if fixed is not None:    # Mixup mixes in place: keep the fixed batch as it was
                batch = type(batch)(batch.x.clone(), batch.y, batch.x_clean)
            inputs, _, _ = forward_backward(parts, model, accelerator, batch)
            optimizer_update(parts, model, optimizer, accelerator, inputs)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(args.warmup)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(args.steps)
    dt = time.perf_counter() - t0
    ips = args.steps * args.batch / dt
    return {
        'path': path, 'model': cfg.model.name, 'img_size': cfg.model.img_size, 'batch': args.batch,
        'precision': accelerator.mixed_precision, 'compile': parts.compile,
        'device': torch.cuda.get_device_name() if cuda else 'cpu',
        'images_per_s': ips, 'step_ms': 1000 * dt / args.steps, 'warmup_s': warm,
        'peak_mem_gb': torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        'placement': 'fixed batch on the device' if path == 'ceiling' else cfg.aug.placement,
        'workers': args.workers if path == 'reference' else 0, 'torch': torch.__version__,
        'schedule_hours': CIFAR10_LT_SCHEDULE / ips / 3600,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--paths', default='fast,reference,ceiling', help='comma-separated: fast, reference, ceiling')
    p.add_argument('--model', default='deit_base_distilled_patch4_32', help='student of the fast / ceiling paths')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--ref-model', default='deit_base_distilled_patch16_224', help='student of the reference path')
    p.add_argument('--ref-img-size', type=int, default=224)
    p.add_argument('--teacher', default='resnet32')
    p.add_argument('--teacher-size', type=int, default=32)
    p.add_argument('--in-chans', type=int, default=3)
    p.add_argument('--batch', type=int, default=512, help='images per optimizer step')
    p.add_argument('--steps', type=int, default=50, help='timed optimizer steps')
    p.add_argument('--warmup', type=int, default=15, help='untimed steps first (compile, allocator, workers)')
    p.add_argument('--workers', type=int, default=min(16, os.cpu_count() or 1), help='reference DataLoader workers')
    p.add_argument('--compile', choices=('auto', 'on', 'off'), default='auto')
    p.add_argument('--data', help='CIFAR-10 root / JPEG pack: real CIFAR-10-LT IF100 pixels instead of synthetic')
    p.add_argument('--cpu', action='store_true', help='run on the CPU even if a GPU is present')
    p.add_argument('--json', type=Path, help='also write all figures to this JSON file')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--worker-out', help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = measure(args.worker, args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    paths = [s.strip() for s in args.paths.split(',') if s.strip()]
    bad = [s for s in paths if s not in ('fast', 'reference', 'ceiling')]
    if bad:
        p.error(f'unknown path(s) {bad}; choose from fast, reference, ceiling')
    results = {}
    raw = list(argv if argv is not None else sys.argv[1:])
    passthrough = []
    while raw:   # the workers get every option but --json
        a = raw.pop(0)
        if a == '--json':
            raw.pop(0)
        elif not a.startswith('--json='):
            passthrough.append(a)
    for path in paths:
        with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, *passthrough, '--worker', path, '--worker-out', out]
        print(f'[benchmark] {path} ...', flush=True)
        r = subprocess.run(cmd)
        if r.returncode != 0:
            print(f'[benchmark] {path} failed (exit {r.returncode})', file=sys.stderr)
            return r.returncode
        results[path] = json.loads(Path(out).read_text())
        os.unlink(out)

    print(f'\n{"path":<10} {"model":<34} {"px":>4} {"prec":>5} {"compile":>7} {"img/s":>9} {"step ms":>8} '
          f'{"warm-up s":>9} {"peak GB":>8} {"C10-LT schedule":>15}')
    for path, r in results.items():
        mem = f'{r["peak_mem_gb"]:.1f}' if r['peak_mem_gb'] is not None else '-'
        print(f'{path:<10} {r["model"]:<34} {r["img_size"]:>4} {r["precision"]:>5} {str(r["compile"]):>7} '
              f'{r["images_per_s"]:>9.1f} {r["step_ms"]:>8.1f} {r["warmup_s"]:>9.1f} {mem:>8} '
              f'{r["schedule_hours"]:>14.2f}h')
    ratios = {}
    if 'fast' in results and 'reference' in results:
        ratios['fast/reference'] = results['fast']['images_per_s'] / results['reference']['images_per_s']
    if 'fast' in results and 'ceiling' in results:
        ratios['fast/ceiling'] = results['fast']['images_per_s'] / results['ceiling']['images_per_s']
    for k, v in ratios.items():
        print(f'{k}: {v:.2f}x')
    any_r = next(iter(results.values()))
    print(f'device: {any_r["device"]}, torch {any_r["torch"]}, batch {args.batch}, {args.steps} timed steps after '
          f'{args.warmup} warm-up steps; schedule = {CIFAR10_LT_SCHEDULE / 1e6:.1f} M images')
    if args.json:
        args.json.write_text(json.dumps({'results': results, 'ratios': ratios, 'argv': passthrough}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
