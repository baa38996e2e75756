"""Every GPU figure of the project in one prepared command with a hard time budget (speed first, then CIFAR-10-LT).

    python tools/gpu_run.py --out $OUT --data .device/cifar10_jpeg.npz --budget-s 560
    python tools/gpu_run.py --out /tmp/rehearsal --rehearse          # the same steps at tiny sizes on the CPU

Steps, in the order of how decisive their figures are; each writes its results into --out the moment it ends,
so a command cut off at its limit still returns everything finished before the cut:
  1. env_sync.json: the machine (GPU, driver, library versions) and one training step of the student's fast path
     and of the SAM teacher under `torch.cuda.set_sync_debug_mode('error')` (the step must not synchronise the host);
  2. bench.json: tools/benchmark.py, fast vs ceiling for DeiT-B/4 and DeiT-S/4 at 32 px, fast vs reference for
     DeiT-B/16 at 224 px, with the ratios;
  3. teacher_report.json: the ResNet-32 LDAM+DRW+SAM teacher on CIFAR-10-LT IF100 for its full 200 epochs;
  4. student_report.json, results.json: the DeiT-LT student (DeiT-S/4 at 32 px, the fast config) distilled from it,
     for the largest part of its 1200-epoch schedule that fits the remaining time (`optim.epochs_scale`, from the
     benchmark's images/s); a run stopped at the deadline is checkpointed (SIGTERM) and recorded as unfinished.
run.log holds the output of every step. At most 8 files, flat, as the device tool returns them.

On the lent machine (a bare image without pytorch-optimizer, which SAM needs; see the project's device notes):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
  python3 tools/gpu_run.py --out $OUT --data .device/cifar10_jpeg.npz --budget-s 560
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# at full scale (--data given, GPU) and in the CPU rehearsal (--rehearse, bundled digits)
FULL = {
    'bench': [['--model', 'deit_base_distilled_patch4_32', '--paths', 'fast,ceiling'],
              ['--model', 'deit_small_distilled_patch4_32', '--paths', 'fast,ceiling'],
              ['--model', 'deit_base_distilled_patch16_224', '--img-size', '224', '--paths', 'fast,reference',
               '--steps', '20', '--warmup', '5']],
    'teacher': ['--config', 'configs/teachers/cifar10_lt_if100_ldam_drw_sam.yaml'],
    'student': ['--config', 'configs/cifar10_lt/fast/deit_lt_s_ldam_if100.yaml'],
    'student_model': 'deit_small_distilled_patch4_32', 'images_per_epoch': 12406, 'epochs': 1200,
    'max_student_epochs': None, 'sync_batch': 256,
}
REHEARSAL = {
    'bench': [['--cpu', '--model', 'deit_micro_distilled_patch2_8', '--ref-model', 'deit_micro_distilled_patch2_8',
               '--img-size', '8', '--ref-img-size', '8', '--teacher-size', '8', '--in-chans', '1', '--batch', '8',
               '--steps', '2', '--warmup', '1', '--workers', '0', '--paths', 'fast,ceiling']],
    'teacher': ['--config', 'configs/teachers/digits_lt.yaml', 'optim.epochs_scale=0.05'],
    'student': ['--config', 'configs/digits_lt/deit_lt.yaml'],
    'student_model': 'deit_micro_distilled_patch2_8', 'images_per_epoch': 461, 'epochs': 60,
    'max_student_epochs': 2, 'sync_batch': 64,
}


class Budget:
    """Seconds left of the command's budget, with a margin kept for writing results."""

    def __init__(self, total_s: float, margin_s: float):
        self.end = time.monotonic() + total_s
        self.margin = margin_s

    def left(self) -> float:
        return self.end - time.monotonic() - self.margin


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run `cmd` with its output appended to `log`; on timeout send SIGTERM (our tools checkpoint and stop), then
    kill after 30 s. Returns (exit code, seconds)."""
    t0 = time.monotonic()
    with open(log, 'a') as f:
        f.write(f'\n$ {" ".join(cmd)}\n')
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    return code, time.monotonic() - t0


def _write(out: Path, name: str, data) -> None:
    tmp = out / f'.{name}.tmp'
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out / name)


def environment() -> dict:
    """The machine and the versions of what the figures depend on."""
    import accelerate
    import timm
    import torch
    info = {'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
            'accelerate': accelerate.__version__, 'cuda': torch.version.cuda, 'host': platform.node(),
            'cpu_count': os.cpu_count(), 'gpu': None}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
        info['gpu_memory_gb'] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        try:
            info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info['driver'] = None
    return info


def sync_check(rehearse: bool, data: str | None) -> dict:
    """One update of the student fast path and of the SAM teacher under sync debug mode 'error' (GPU only):
    'ok', or the error of the first host synchronisation inside the step."""
    import torch
    if not torch.cuda.is_available():
        return {'skipped': 'no GPU: host synchronisation can only be checked on CUDA'}
    from deit_lt.config import TrainConfig, load_config
    from deit_lt.engine import forward_backward, optimizer_update
    from deit_lt.runtime import create_accelerator
    from deit_lt.student import student_parts
    from teachers.config import TeacherTrainConfig
    from teachers.recipe import teacher_parts
    sizes = REHEARSAL if rehearse else FULL
    root = [] if rehearse else [f'data.root={data}']
    out = {}
    for name, cls, build, args in (('teacher_sam', TeacherTrainConfig, teacher_parts, sizes['teacher']),
                                   ('student_fast', TrainConfig, student_parts, sizes['student'])):
        overrides = args[2:] + root + ['wandb.mode=disabled', 'runtime.compile=off', 'optim.accum_steps=1',
                                       f'optim.batch_size={sizes["sync_batch"]}']
        if cls is TrainConfig:
            overrides.append('distill.type=none')       # the teacher file of step 3 does not exist yet
        cfg = load_config(cls, REPO / args[1], overrides)
        acc = create_accelerator(cfg.runtime)
        parts = build(cfg, acc)
        model, optimizer = acc.prepare(parts.model.to(acc.device), parts.optimizer)
        parts.on_epoch(0)
        batches = parts.train_batches.iter_epoch(0)
        try:
            for i in range(3):
                batch = next(batches)
                if i == 2:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode('error')
                inputs, _, _ = forward_backward(parts, model, acc, batch)
                optimizer_update(parts, model, optimizer, acc, inputs)
            out[name] = 'ok: no host synchronisation in the step'
        except RuntimeError as e:
            out[name] = f'synchronises: {str(e).splitlines()[0]}'
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, required=True, help='folder for the result files ($OUT on the device)')
    p.add_argument('--data', help='CIFAR-10 root or cifar10_jpeg.npz (full scale)')
    p.add_argument('--budget-s', type=float, default=560.0, help='wall time of the whole command')
    p.add_argument('--margin-s', type=float, default=25.0, help='kept free at the end for writing results')
    p.add_argument('--rehearse', action='store_true', help='the same steps at tiny sizes on the CPU')
    p.add_argument('--work', type=Path, default=Path('/tmp/deit_lt_gpu_run'), help='run folders (not returned)')
    p.add_argument('--step', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step == 'sync':
        _write(args.out, 'env_sync.json', {'environment': environment(), 'sync': sync_check(args.rehearse, args.data)})
        return 0
    if not args.rehearse and not args.data:
        p.error('--data is needed at full scale (or --rehearse)')
    budget = Budget(args.budget_s, args.margin_s)
    sizes = REHEARSAL if args.rehearse else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    log = args.out / 'run.log'
    env = dict(os.environ, WANDB_MODE='disabled', PYTHONUNBUFFERED='1')
    root = [] if args.rehearse else [f'data.root={args.data}']
    summary: dict = {'rehearse': args.rehearse, 'budget_s': args.budget_s, 'steps': {}}

    def done(step: str, code: int, seconds: float, **extra) -> None:
        summary['steps'][step] = {'exit': code, 'seconds': round(seconds, 1), **extra}
        _write(args.out, 'summary.json', summary)

    # 1. machine + host synchronisation (in its own process on a GPU: a CUDA context of its own)
    if args.rehearse:
        _write(args.out, 'env_sync.json', {'environment': environment(),
                                           'sync': {'skipped': 'rehearsal: no host-synchronisation check on the CPU'}})
        code, dt = 0, 0.0
    else:
        code, dt = _run([sys.executable, __file__, '--step', 'sync', '--out', str(args.out), '--data', args.data], log,
                        min(120, budget.left()), env)
    done('env_sync', code, dt)
    bench = _throughput(args, sizes, budget, log, env, done)
    teacher = _teacher(args, sizes, budget, log, env, root, done)
    if teacher is None:
        return 1
    _student(args, sizes, budget, log, env, root, done, bench, teacher)
    return 0


def _throughput(args, sizes, budget: Budget, log: Path, env: dict, done) -> dict:
    """Step 2: tools/benchmark.py for each model / path pair; bench.json grows after each."""
    bench = {}
    for i, extra in enumerate(sizes['bench']):
        part = args.work / f'bench{i}.json'
        data = [] if args.rehearse else ['--data', args.data]
        code, dt = _run([sys.executable, 'tools/benchmark.py', *extra, *data, '--json', str(part)], log,
                        min(240, budget.left()), env)
        if part.is_file():
            bench[' '.join(extra)] = json.loads(part.read_text())
        _write(args.out, 'bench.json', bench)
        done(f'bench{i}', code, dt)
    return bench


def _teacher(args, sizes, budget: Budget, log: Path, env: dict, root: list, done) -> Path | None:
    """Step 3: the teacher's whole schedule (at most half the remaining time); returns its last model file."""
    out = args.work / 'teacher'
    code, dt = _run([sys.executable, 'tools/train_teacher.py', *sizes['teacher'], *root, f'runtime.output_dir={out}',
                     'runtime.progress=false', 'wandb.mode=disabled'], log, budget.left() * 0.5, env)
    if (out / 'report.json').is_file():
        shutil.copy(out / 'report.json', args.out / 'teacher_report.json')
    done('teacher', code, dt)
    return out / 'last.safetensors' if (out / 'last.safetensors').is_file() else None


def _student(args, sizes, budget: Budget, log: Path, env: dict, root: list, done, bench: dict,
             teacher: Path) -> None:
    """Step 4: the student for as many epochs as the rest of the budget allows at the measured speed, then the
    results records of both runs."""
    ips = next((r['results']['fast']['images_per_s'] for k, r in bench.items()
                if sizes['student_model'] in k and 'fast' in r.get('results', {})), None)
    left = budget.left() - 60.0                     # start-up, compile and the final evaluation
    epochs = max(1, int(left * 0.8 * ips / sizes['images_per_epoch'])) if ips else 1
    epochs = min(epochs, sizes['max_student_epochs'] or epochs)
    scale = min(1.0, epochs / sizes['epochs'])
    out = args.work / 'student'
    code, dt = _run([sys.executable, 'tools/train.py', *sizes['student'], *root, f'teacher.checkpoint={teacher}',
                     f'optim.epochs_scale={scale:.6f}', f'runtime.output_dir={out}', 'runtime.progress=false',
                     'wandb.mode=disabled'], log, budget.left(), env)
    if (out / 'report.json').is_file():
        shutil.copy(out / 'report.json', args.out / 'student_report.json')
    done('student', code, dt, epochs_scale=scale, images_per_s_used=ips)
    results = args.work / 'results'
    code, dt = _run([sys.executable, 'tools/collect_results.py', str(teacher.parent), str(out), '--out',
                     str(results), '--allow-unfinished'], log, max(budget.left() + args.margin_s - 5, 5), env)
    _write(args.out, 'results.json', {f.stem: json.loads(f.read_text()) for f in sorted(results.glob('*.json'))})
    done('collect', code, dt)

if __name__ == '__main__':
    sys.exit(main())
