"""Throughput of a full DeiT-LT training step: the fast path against the published code's setup and the model alone.

A step is everything training does per optimizer update: data (index gather or DataLoader), augmentation,
Mixup/CutMix, the frozen teacher's forward on the mixed batch, the student's forward and backward, AdamW. Three
measurements, each in a fresh process (its own precision, compile cache and memory statistics):

  fast       data held on the device, batched per-sample augmentation there (deit_lt.data.gpu_aug), bf16 autocast,
             fused AdamW, channels-last teacher, torch.compile per --compile (the defaults of tools/train.py)
  reference  configured like the official DeiT-LT code: 224 px DeiT-B/16, per-image PIL augmentation in DataLoader
             workers, fp16 AMP with a GradScaler, eager (no compile), teacher input resized to 32 px
  ceiling    the fast path's student + teacher on one fixed random batch already on the device (no data, no
             augmentation): the upper bound for the fast path

    python tools/benchmark.py                                                     # GPU defaults, all three paths
    python tools/benchmark.py --model deit_small_distilled_patch4_32 --paths fast,ceiling
    python tools/benchmark.py --model deit_base_distilled_patch16_224 --img-size 224 --paths fast,reference
    python tools/benchmark.py --data ../shared/data/cifar10_jpeg.npz              # real CIFAR-10-LT pixels
    python tools/benchmark.py --cpu --model deit_micro_distilled_patch2_8 --ref-model deit_micro_distilled_patch2_8 \
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
    from deit_lt.data import LTDataset, create_datasets, lt_class_counts
    if args.data:
        return create_datasets(DataConfig(name='cifar10_lt', root=args.data, imb_factor=100))['train']
    counts = lt_class_counts(5000, 10, 100)
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(10), counts)
    images = rng.integers(0, 256, (len(targets), img_size_native, img_size_native, args.in_chans), dtype=np.uint8)
    return LTDataset(name='cifar10_lt', split='train', targets=targets, num_classes=10,
                     class_names=[str(i) for i in range(10)], images=images)


def measure(path: str, args) -> dict:
    """One path in this process; returns its figures."""
    import timm
    import torch
    from accelerate import Accelerator
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    import deit_lt.models  # noqa: F401
    import deit_lt.models  # noqa: F401
    from deit_lt.config import AugConfig
    from deit_lt.data.pipeline import create_train_batches
    from deit_lt.data.samplers import create_sampler
    from deit_lt.engine import EpochState, TeacherAdapter, train_one_epoch
    from deit_lt.losses import DistillationLoss

    reference = path == 'reference'
    cuda = torch.cuda.is_available() and not args.cpu
    mp = 'no' if not cuda else ('fp16' if reference else 'bf16')
    accelerator = Accelerator(cpu=not cuda, mixed_precision=mp)
    device = accelerator.device
    model_name = args.ref_model if reference else args.model
    img_size = args.ref_img_size if reference else args.img_size
    compile_on = (not reference) and (args.compile == 'on' or (args.compile == 'auto' and cuda))
    torch.manual_seed(0)
    student = timm.create_model(model_name, num_classes=10, in_chans=args.in_chans, drop_path_rate=0.1,
                                **({'img_size': img_size} if 'patch4_32' in model_name else {}))
    student.set_distilled_training(True)
    teacher_net = timm.create_model(args.teacher, num_classes=10, in_chans=args.in_chans)
    channels_last = cuda and not reference
    norm = ((0.485, 0.456, 0.406)[:args.in_chans], (0.229, 0.224, 0.225)[:args.in_chans])
    teacher = TeacherAdapter(teacher_net, args.teacher_size, norm, channels_last=channels_last).to(device)
    aug = AugConfig(placement='loader' if reference else 'device', num_workers=args.workers,
                    mean=norm[0], std=norm[1])
    opt_kwargs = {'fused': True} if (cuda and not reference) else {}
    optimizer = create_optimizer_v2(student, 'adamw', lr=5e-4, weight_decay=0.05, **opt_kwargs)
    dataset = _dataset(args)
    criterion = DistillationLoss(dataset.train_counts, drw_epoch=None).to(device)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    student.to(device)
    if compile_on:
        student = torch.compile(student)
        teacher = torch.compile(teacher)
    student, optimizer = accelerator.prepare(student, optimizer)
    sched = CosineLRScheduler(optimizer, t_initial=10 ** 6, t_in_epochs=False)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if path == 'ceiling':
        x = torch.randn(args.batch, args.in_chans, img_size, img_size, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        student.train()

        def run(n):
            for _ in range(n):
                with accelerator.autocast():
                    t = teacher(x)
                    cls, dist = student(x)
                    loss, _ = criterion(cls, dist, y, t)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
    else:
        sampler = create_sampler('repeated_aug', dataset.targets, seed=0)
        batches = create_train_batches(dataset, aug, img_size=img_size, batch_size=args.batch, device=device,
                                       sampler=sampler, seed=0)
        state = EpochState(epoch=0)

        def run(n):
            target = state.updates + n
            while state.updates < target:
                train_one_epoch(student, criterion, batches, optimizer, sched, accelerator, state, teacher=teacher,
                                mixup_fn=mixup, log_every=10 ** 9, max_updates=target)
                if state.step >= len(batches):
                    state.epoch, state.step = state.epoch + 1, 0
            sync()

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
        'path': path, 'model': model_name, 'img_size': img_size, 'batch': args.batch, 'precision': mp,
        'compile': compile_on, 'device': torch.cuda.get_device_name() if cuda else 'cpu',
        'images_per_s': ips, 'step_ms': 1000 * dt / args.steps, 'warmup_s': warm,
        'peak_mem_gb': torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        'placement': 'synthetic batch' if path == 'ceiling' else aug.placement,
        'workers': args.workers if reference else 0, 'torch': torch.__version__,
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
