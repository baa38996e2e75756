"""The one run loop of every training recipe: students (`deit_lt.student`) and teachers (`teachers.recipe`).

A recipe builds its parts (`RunParts`: model, optimizer, schedule, batches, the loss of one micro-batch, the
optimizer-update rule, what changes at an epoch start); `fit` does everything else, the same way for all of them:
resume, epochs of micro-batches with gradient accumulation, evaluation, best / last model files, resumable
checkpoints, logging, progress and one report schema (after facebookresearch/deit `engine.py` + `main.py`, with the
loop shared instead of copied per model).

Conventions: epochs are 0-based (`epoch` = the epoch in progress = epochs done); `updates` counts optimizer updates
and is the step of every logged scalar; checkpoint tags are `epochNNNNN` (at an epoch end) and
`epochNNNNN-updateNNNNNNNN` (inside an epoch). Exact resume: every micro-step reseeds its random streams from
(seed, epoch, step, rank) (`deit_lt.seeding`), the batches of any step can be regenerated, the learning rate is a
function of (epoch, updates), and checkpoints are taken at optimizer-update boundaries.

Speed: per-step statistics stay on the device; the host reads them every `runtime.log_every` updates (the one
synchronisation point, also where a non-finite loss is detected).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import atomic_write_text, load_training_state, save_model_file, save_training_state
from .config import RuntimeConfig, WandbConfig, save_config, to_dict
from .data.pipeline import EvalBatches, TrainBatches
from .errors import CheckpointError, ConfigError, NonFiniteLossError, PreemptedError, TrainingError
from .eval import HEADLINE_METRICS, compact_report, evaluate, format_report
from .models.factory import load_state_dict_checked
from .progress import Progress, format_seconds
from .runtime import OutputDir, StopSignals, gather_fn, resolve_resume, run_provenance
from .seeding import seed_step
from .tracking import RunLogger, plot_per_class_accuracy

__all__ = ['RunParts', 'PlainUpdate', 'UpdateContext', 'TrainState', 'fit', 'forward_backward', 'optimizer_update',
           'updates_per_epoch', 'windows']

REPORT_VERSION = 2


@dataclasses.dataclass
class UpdateContext:
    """What an update rule may use: the prepared model and optimizer, and `recompute()`, which runs forward and
    backward again on the same micro-batch at the current weights (SAM's second pass)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Any
    recompute: Callable[[], None]


class PlainUpdate:
    """One optimizer step on the accumulated gradients, optionally after clipping their global norm."""

    def __init__(self, clip_grad: float | None = None):
        self.clip_grad = clip_grad

    def __call__(self, ctx: UpdateContext) -> None:
        if self.clip_grad:
            ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), self.clip_grad)
        ctx.optimizer.step()


@dataclasses.dataclass
class RunParts:
    """Everything a recipe builds for `fit`.

    Attributes:
        kind: 'student' or 'teacher'; recorded in model files and reports.
        model: the plain module to train (fit moves, compiles and wraps it).
        optimizer: its optimizer (for SAM, the SAM optimizer).
        scheduler: a timm scheduler; fit calls `step(epoch)` at epoch starts and `step_update(updates)` after
            updates (`deit_lt.optim.create_scheduler`).
        train_batches: this process's micro-batches (`deit_lt.data.pipeline`).
        eval_batches: {'test': ..., 'val': ...} evaluation batches.
        loss_fn: (model, prepared micro-batch) -> (loss, {name: 0-d tensor} statistics to log), under autocast;
            statistics are averaged over samples ('acc' in percent).
        prepare: micro-batch -> what `loss_fn` reads (Mixup, the teacher's labels); runs once per micro-step after
            the step's random streams are seeded.
        on_epoch: epoch -> scalars recorded for that epoch (DRW switch, SAM radius); runs at every epoch start.
        update: the optimizer-update rule (`PlainUpdate`, or SAM's two-pass rule).
        accum_steps: micro-batches per optimizer update.
        meta: model-file metadata (arch, model_kwargs, num_classes, img_size, in_chans, mean, std, ...).
        train_counts, groups, class_names, class_map: the training data's class sizes and head/mid/tail groups.
        description: the run's header line (model, data, loss, batch).
        compile: torch.compile the model for training.
        files: JSON files written into the output folder at the start ({name: data}).
        logit_adjust: {name: (C,) offsets}: post-hoc adjusted predictors evaluated beside the plain ones.
        evaluate: a recipe's own evaluation of one split, (model, split name, batches) -> {predictor: {'top1', 'top5',
            'head', 'mid', 'tail', ...}, ...} (clustering matches clusters to classes first); default
            `deit_lt.eval.evaluate`.
        selection: (split reports of the epoch, the epoch's record) -> score; best.safetensors keeps the epoch with
            the highest score (default: top-1 of the headline predictor on the selection split). A label-free
            recipe selects on its training statistics here.
        headline: the predictor a run is judged by (default: 'avg' for distilled students, else 'logits').
        metrics: the metrics of each predictor kept per epoch in the history and logged (clustering adds its own).
    """
    kind: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_batches: TrainBatches
    eval_batches: dict[str, EvalBatches]
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    meta: dict[str, Any]
    train_counts: list[int]
    groups: dict[str, list[int]]
    class_names: list[str] | None = None
    prepare: Callable[[Any], Any] = lambda batch: batch
    on_epoch: Callable[[int], dict[str, Any]] = lambda epoch: {}
    update: Callable[[UpdateContext], None] = dataclasses.field(default_factory=PlainUpdate)
    accum_steps: int = 1
    description: str = ''
    compile: bool = False
    files: dict[str, Any] = dataclasses.field(default_factory=dict)
    logit_adjust: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    evaluate: Callable[[nn.Module, str, EvalBatches], dict] | None = None
    selection: Callable[[dict, dict], float] | None = None
    headline: str | None = None
    metrics: tuple[str, ...] = HEADLINE_METRICS


@dataclasses.dataclass
class TrainState:
    """Where training stands (saved in every checkpoint's state.json)."""
    epoch: int = 0                      # the epoch in progress (= complete epochs)
    step: int = 0                       # next micro-step of that epoch
    updates: int = 0                    # optimizer updates so far
    best: dict | None = None            # {'epoch', 'split', 'predictor', 'top1'} of best.safetensors
    history: list = dataclasses.field(default_factory=list)   # one record per finished epoch
    elapsed_s: float = 0.0              # training wall time of earlier (resumed-from) processes
    wandb_id: str | None = None


def updates_per_epoch(num_steps: int, accum_steps: int) -> int:
    """Optimizer updates in an epoch of `num_steps` micro-batches (a trailing partial window still updates)."""
    return math.ceil(num_steps / accum_steps)


def windows(num_steps: int, accum: int, step: int) -> tuple[int, bool]:
    """Length of the accumulation window that contains micro-step `step`, and whether `step` ends it."""
    start = step - step % accum
    length = min(accum, num_steps - start)
    return length, step == start + length - 1


class _Run:
    """The state and outputs of one `fit` call (main process writes, every process trains and evaluates)."""

    def __init__(self, parts: RunParts, cfg: RuntimeConfig, wandb_cfg: WandbConfig, accelerator, *, name: str,
                 epochs: int, config: Any):
        self.p, self.cfg, self.acc, self.name, self.epochs, self.config = parts, cfg, accelerator, name, epochs, config
        self.is_main = accelerator.is_main_process
        self.out = Path(cfg.output_dir)
        self.n_steps = len(parts.train_batches)
        self.upe = updates_per_epoch(self.n_steps, parts.accum_steps)
        self.select_on = _select_split(cfg.select_on, parts.eval_batches)
        self.headline = _headline(parts)
        self.state = TrainState()
        self.resume_dir = resolve_resume(cfg)
        if self.resume_dir is not None:
            self._load(self.resume_dir)
        self.t_start = time.time()
        self.last_report: dict | None = None
        self.evaluated_at = -1
        self.stopped_by: str | None = None
        self.model = self.optimizer = None
        self.logger: RunLogger | None = None
        self.wandb_cfg = wandb_cfg
        self.signals = StopSignals()

    def stop_requested(self, sync_point: bool) -> str | None:
        """The signal that asks this run to stop, agreed by every process. A single process checks after every
        update; several processes agree at their synchronisation points (the log interval), so that all of them
        stop after the same update."""
        if self.acc.num_processes == 1:
            return self.signals.requested
        if not sync_point:
            return None
        names = StopSignals.NAMES
        code = names.index(self.signals.requested) + 1 if self.signals.requested else 0
        agreed = int(self.acc.reduce(torch.tensor([code], device=self.acc.device), reduction='max').item())
        return names[agreed - 1] if agreed else None

    # ---- resume -------------------------------------------------------------------------------------------------
    def _load(self, ckpt_dir: Path) -> None:
        ckpt = load_training_state(ckpt_dir, map_location='cpu')
        saved, meta = ckpt['state'], ckpt['meta'] or {}
        for key in ('kind', 'arch', 'num_classes'):
            if meta.get(key) != self.p.meta.get(key):
                raise CheckpointError(f'{ckpt_dir}: the checkpoint has {key}={meta.get(key)!r} but this run builds '
                                      f'{self.p.meta.get(key)!r}; resume with the same settings or use a new '
                                      f'runtime.output_dir')
        if saved.get('micro_steps_per_epoch') not in (None, self.n_steps):
            raise CheckpointError(f'{ckpt_dir} was written with {saved["micro_steps_per_epoch"]} micro-batches per '
                                  f'epoch, this run has {self.n_steps}: the batch size, the data or the number of '
                                  f'processes changed')
        if ckpt['optimizer'] is None:
            raise CheckpointError(f'{ckpt_dir} has no optimizer state (optimizer.pt); cannot resume exactly')
        load_state_dict_checked(self.p.model, ckpt['model'], str(ckpt_dir / 'model.safetensors'))
        try:
            self.p.optimizer.load_state_dict(ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f'{ckpt_dir}: the optimizer state does not fit this optimizer ({e}); keep the '
                                  f'optimizer settings (optim.opt, sam.enabled) to resume') from None
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in saved.items() if k in fields})

    # ---- outputs ------------------------------------------------------------------------------------------------
    def _file_meta(self, **extra) -> dict:
        return dict(self.p.meta, kind=self.p.kind, **extra)

    def save_state(self, tag: str) -> None:
        if self.is_main:
            st = dataclasses.asdict(self.state)
            st.update(elapsed_s=self.elapsed(), wandb_id=self.logger.run_id if self.logger else None,
                      micro_steps_per_epoch=self.n_steps)
            save_training_state(self.out, tag, model_state=self.acc.unwrap_model(self.model).state_dict(),
                                meta=self._file_meta(epoch=self.state.epoch), optimizer_state=self.p.optimizer
                                .state_dict(), state=st, keep=self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.time() - self.t_start

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def run_eval(self, label: str) -> dict:
        gather = gather_fn(self.acc)
        if self.p.evaluate is not None:
            self.last_report = {split: self.p.evaluate(self.model, split, batches)
                                for split, batches in self.p.eval_batches.items()}
        else:
            self.last_report = {
                split: evaluate(self.model, batches, self.p.groups, self.p.meta['num_classes'],
                                autocast=self.acc.autocast, gather=gather, desc=f'{label} {split}',
                                show_progress=self.is_main and self.cfg.progress, logit_adjust=self.p.logit_adjust)
                for split, batches in self.p.eval_batches.items()}
        self.evaluated_at = self.state.updates
        return self.last_report

    def headline_of(self, report: dict) -> dict:
        return {split: {p: {m: r[p].get(m) for m in self.p.metrics} for p in r if isinstance(r[p], dict)}
                for split, r in report.items()}


def _select_split(setting: str, eval_batches: dict) -> str:
    if setting == 'auto':
        return 'val' if 'val' in eval_batches else 'test'
    if setting not in eval_batches:
        raise ConfigError(f'runtime.select_on={setting} but the data has no {setting} split (set data.val_per_class '
                          f'> 0 or a val list, or runtime.select_on=auto)')
    return setting


def _headline(parts: RunParts) -> str:
    from .models.factory import headline_predictor
    return parts.headline or headline_predictor(parts.model)


def fit(parts: RunParts, cfg: RuntimeConfig, wandb_cfg: WandbConfig, accelerator, *, name: str, epochs: int,
        config: Any) -> dict:
    """Train (or resume) `parts` for `epochs` epochs; returns the report (also written to report.json).

    Args:
        parts: what the recipe built.
        cfg: the run's runtime section (seed, outputs, evaluation cadence, checkpoints, resume, logging).
        wandb_cfg: W&B settings.
        accelerator: an `accelerate.Accelerator` (`deit_lt.runtime.create_accelerator`).
        name: run name.
        epochs: length of the schedule.
        config: the resolved config dataclass (saved as config.yaml and logged to W&B).
    """
    guard = OutputDir(cfg, accelerator.is_main_process)
    run = None
    try:
        accelerator.wait_for_everyone()
        run = _Run(parts, cfg, wandb_cfg, accelerator, name=name, epochs=epochs, config=config)
        _start(run)
        with run.signals:
            while run.state.epoch < epochs and run.stopped_by is None:
                _epoch(run)
        preempted = run.stopped_by is not None and run.stopped_by.startswith('SIG')
        if run.evaluated_at != run.state.updates and not preempted:
            # stopped inside an epoch, or resumed a finished run: the final weights have not been evaluated yet
            run.run_eval('final')
        report = _finish(run)
        if preempted:
            raise PreemptedError(f'stopped by {run.stopped_by} after update {run.state.updates} (epoch '
                                 f'{run.state.epoch}); the checkpoint in {cfg.output_dir}/checkpoints is resumable: '
                                 f'run the same command with runtime.resume=auto')
        return report
    except RuntimeError as e:
        # a collective whose peer died (gloo: "Connection closed by peer"; NCCL ends the survivors by the launcher)
        if accelerator.num_processes > 1 and 'closed by peer' in str(e):
            raise TrainingError(f'another process of this run stopped (see its log); the last checkpoint in '
                                f'{cfg.output_dir}/checkpoints is intact: resume with runtime.resume=auto') from None
        raise
    finally:
        if run is not None and run.logger is not None:
            run.logger.finish()
        guard.release()


def _start(run: _Run) -> None:
    p, acc, st = run.p, run.acc, run.state
    run.p.scheduler.step(st.epoch)
    run.p.scheduler.step_update(st.updates)
    # where the data layer records images it had to skip (data.bad_images=skip)
    p.train_batches.attach_run_dir(run.out)
    model = p.model.to(acc.device)
    if p.compile:
        model = torch.compile(model)
    run.model, run.optimizer = acc.prepare(model, p.optimizer)
    run.logger = RunLogger(run.wandb_cfg, run.out, to_dict(run.config), enabled=run.is_main, job_type=p.kind,
                           resume_id=st.wandb_id)
    if run.is_main:
        save_config(run.config, run.out / 'config.yaml')
        files = dict(p.files, class_counts={'train_counts': list(p.train_counts), 'class_names': p.class_names,
                                            'groups': p.groups})
        for fname, data in files.items():
            atomic_write_text(run.out / f'{fname}.json', json.dumps(data, indent=1))
        resumed = (f', resuming from {run.resume_dir} (epoch {st.epoch}, micro-step {st.step}, update {st.updates})'
                   if run.resume_dir else '')
        print(f'[{p.kind}] {run.name}: {p.description}; {acc.num_processes} process(es), device {acc.device}, '
              f'mixed precision {acc.mixed_precision}; {run.n_steps} micro-batches = {run.upe} updates per epoch, '
              f'{run.epochs} epochs; best checkpoint selected on {run.select_on}{resumed}', flush=True)


def _epoch(run: _Run) -> None:
    """One epoch (from the resumed micro-step), then evaluation / best / checkpoint as due."""
    st, cfg, epoch = run.state, run.cfg, run.state.epoch
    run.p.scheduler.step(epoch)
    scalars = run.p.on_epoch(epoch)
    lr = run.optimizer.param_groups[0]['lr']
    t0 = time.time()
    train_stats = _train_epoch(run, epoch)
    epoch_done = st.step >= run.n_steps
    if epoch_done:
        st.epoch, st.step = epoch + 1, 0
    final = st.epoch >= run.epochs
    stopped = run.stopped_by is not None
    record = {'epoch': epoch, 'updates': st.updates, 'lr': lr, **scalars,
              'train': dict(train_stats, time_s=round(time.time() - t0, 2))}
    preempted = stopped and run.stopped_by.startswith('SIG')   # a signal: save quickly, no evaluation
    if epoch_done and not preempted and ((epoch + 1) % cfg.eval_every == 0 or final or stopped):
        report = run.run_eval(f'epoch {epoch + 1}/{run.epochs}')
        record.update(run.headline_of(report))
        _maybe_best(run, report, record)
    if run.is_main:
        _print_epoch(run, record)
        run.logger.log({f'epoch/{k}': v for k, v in record.items() if isinstance(v, (int, float))}
                       | {f'{split}/{p}_{m}': v for split in run.p.eval_batches if split in record
                          for p, r in record[split].items() for m, v in r.items() if v is not None}, st.updates)
    if epoch_done:
        st.history.append(record)
    if epoch_done and ((epoch + 1) % cfg.save_every == 0 or final or stopped):
        run.save_state(f'epoch{st.epoch:05d}')
    elif stopped:
        run.save_state(f'epoch{st.epoch:05d}-update{st.updates:08d}')


def _maybe_best(run: _Run, report: dict, record: dict) -> None:
    epoch = record['epoch']
    top1 = report[run.select_on][run.headline]['top1']
    score = run.p.selection(report, record) if run.p.selection is not None else top1
    if run.state.best is None or score > run.state.best['score']:
        run.state.best = {'epoch': epoch, 'split': run.select_on, 'predictor': run.headline, 'top1': top1,
                          'score': score}
        if run.is_main:
            save_model_file(run.out / 'best.safetensors', run.acc.unwrap_model(run.model).state_dict(),
                            run._file_meta(epoch=epoch, checkpoint='best', selection=run.state.best,
                                           metrics=compact_report(report)))


def _print_epoch(run: _Run, record: dict) -> None:
    tr = record['train']
    parts = [f'{k} {v:.4f}' for k, v in tr.items() if k.startswith('loss')] + \
            [f'{k} {v:.2f}' for k, v in tr.items() if k == 'acc']
    extra = ''.join(f', {k} {v:.3g}' if isinstance(v, float) else f', {k} {v}'
                    for k, v in record.items() if k not in ('epoch', 'updates', 'lr', 'train', *run.p.eval_batches))
    print(f'epoch {record["epoch"] + 1}/{run.epochs}: {", ".join(parts)}, lr {record["lr"]:.3g}{extra}, '
          f'{tr["time_s"]:.1f} s, {tr.get("img_per_s", 0):.0f} img/s', flush=True)
    if 'test' in record and run.last_report is not None:
        for split in ('val', 'test'):
            if split in run.last_report:
                print(format_report(run.last_report[split], f'  {split} ({run.last_report[split]["num_samples"]} '
                                                            f'images)'), flush=True)
        if run.state.best is not None:
            b = run.state.best
            print(f'  best {b["predictor"].upper()} top-1 on {b["split"]}: {b["top1"]:.2f} (epoch {b["epoch"] + 1})',
                  flush=True)


class _Stats:
    """Sample-weighted sums of the step statistics, kept on the device between log points (no host sync per step);
    `flush` reads them (the one synchronisation of a log interval), checks the loss is finite and logs the means."""

    def __init__(self, run: _Run, epoch: int, progress: Progress):
        self.run, self.epoch, self.progress = run, epoch, progress
        device = run.acc.device
        self.window: dict[str, torch.Tensor] = {}
        self.count = torch.zeros((), device=device, dtype=torch.float64)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.totals: dict[str, float] = {}
        self.total_n = 0.0
        self.t_window, self.n_window = time.perf_counter(), 0

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], n: int) -> None:
        for k, v in stats.items():
            if k not in self.window:
                self.window[k] = torch.zeros((), device=self.count.device, dtype=torch.float64)
            self.window[k] += v.double() * n
        self.count.add_(n)
        self.bad |= ~torch.isfinite(loss)
        self.n_window += n

    def flush(self) -> None:
        run, st = self.run, self.run.state
        if self.bad.item():
            raise NonFiniteLossError(f'the training loss became non-finite in epoch {self.epoch + 1} before update '
                                     f'{st.updates}; stopped, the last good checkpoint is kept. Lower optim.lr '
                                     f'(or sam.rho) and resume')
        n = self.count.item()
        if n == 0:
            return
        vals = {k: (v / n).item() for k, v in self.window.items()}
        dt = time.perf_counter() - self.t_window
        for k, v in vals.items():
            self.totals[k] = self.totals.get(k, 0.0) + v * n
            self.window[k].zero_()
        self.total_n += n
        self.count.zero_()
        if run.is_main:
            run.logger.log({f'train/{k}': v for k, v in vals.items()}
                           | {'train/lr': run.optimizer.param_groups[0]['lr'],
                              'train/epoch': self.epoch + st.step / run.n_steps,
                              'train/img_per_s': self.n_window * run.acc.num_processes / max(dt, 1e-9)}, st.updates)
            self.progress.set_postfix(f'loss {vals.get("loss", float("nan")):.4f}')
        self.t_window, self.n_window = time.perf_counter(), 0

    def means(self) -> dict[str, float]:
        return {k: v / max(self.total_n, 1.0) for k, v in self.totals.items()}


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """Micro-steps of `epoch` from `state.step` to the end (or until a stop); returns the epoch's mean statistics."""
    p, acc, st, cfg = run.p, run.acc, run.state, run.cfg
    model, optimizer = run.model, run.optimizer
    if st.step % p.accum_steps:
        raise CheckpointError(f'resume micro-step {st.step} is not at an accumulation boundary ({p.accum_steps})')
    model.train()
    progress = Progress(run.n_steps, f'epoch {epoch + 1}/{run.epochs}', enabled=run.is_main and cfg.progress,
                        initial=st.step)
    stats = _Stats(run, epoch, progress)
    t0, n_seen = time.perf_counter(), 0
    for batch in p.train_batches.iter_epoch(epoch, start_step=st.step):
        step = st.step
        seed_step(cfg.seed, epoch, step, acc.process_index)
        length, sync = windows(run.n_steps, p.accum_steps, step)
        inputs, loss, step_stats = forward_backward(p, model, acc, batch, scale=1.0 / length, sync=sync)
        stats.add(loss, step_stats, batch.y.shape[0])
        n_seen += batch.y.shape[0]
        st.step = step + 1
        progress.update()
        if not sync:
            continue
        optimizer_update(p, model, optimizer, acc, inputs)
        st.updates += 1
        p.scheduler.step_update(st.updates)
        if cfg.max_steps is not None and st.updates >= cfg.max_steps:
            run.stopped_by = 'max_steps'
        save_due = bool(cfg.save_every_steps) and st.updates % cfg.save_every_steps == 0 and st.step < run.n_steps
        sync_point = st.updates % max(cfg.log_every, 1) == 0 or st.step == run.n_steps or save_due
        signal_name = run.stop_requested(sync_point)
        if signal_name is not None and run.stopped_by is None:
            run.stopped_by = signal_name
        if sync_point or run.stopped_by is not None:
            stats.flush()   # also the finiteness check before anything is saved
        if run.stopped_by is not None:
            break
        if save_due:
            run.save_state(f'epoch{st.epoch:05d}-update{st.updates:08d}')
    stats.flush()
    progress.close()
    dt = time.perf_counter() - t0
    return stats.means() | {'img_per_s': round(n_seen * acc.num_processes / max(dt, 1e-9), 1)}


def forward_backward(parts: RunParts, model: nn.Module, accelerator, batch, *, scale: float = 1.0, sync: bool = True
                     ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-step: prepare the batch, loss under autocast, backward of `loss * scale` (DDP gradient sync only
    when `sync`). Returns (prepared inputs, detached loss, detached statistics including 'loss')."""
    inputs = parts.prepare(batch)
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        with accelerator.autocast():
            loss, stats = parts.loss_fn(model, inputs)
        accelerator.backward(loss * scale if scale != 1.0 else loss)
    loss = loss.detach()
    return inputs, loss, {k: v.detach() for k, v in stats.items()} | {'loss': loss}


def optimizer_update(parts: RunParts, model: nn.Module, optimizer, accelerator, inputs) -> None:
    """The update rule on the accumulated gradients (SAM reruns `inputs` at the perturbed weights), then zero them."""
    def recompute() -> None:
        with accelerator.autocast():
            loss, _ = parts.loss_fn(model, inputs)
        accelerator.backward(loss)
    parts.update(UpdateContext(model, optimizer, accelerator, recompute))
    optimizer.zero_grad(set_to_none=True)


def _finish(run: _Run) -> dict:
    p, st, acc = run.p, run.state, run.acc
    planned = run.epochs * run.upe
    finished = st.epoch >= run.epochs
    report: dict[str, Any] = {
        'report_version': REPORT_VERSION, 'name': run.name, 'kind': p.kind, 'arch': p.meta.get('arch'),
        'finished': finished,
        'progress': {'epochs_done': st.epoch, 'epochs': run.epochs, 'updates_done': st.updates,
                     'updates': planned, 'fraction': round(st.updates / max(planned, 1), 4)},
        'stopped_by': None if finished else (run.stopped_by or 'interrupted'),
        'predictors': [k for k, v in (run.last_report or {}).get('test', {}).items() if isinstance(v, dict)],
        'headline': run.headline, 'select_on': run.select_on,
        'last': {split: compact_report(r) for split, r in (run.last_report or {}).items()},
        'history': st.history,
        'wall_time_s': round(run.elapsed(), 1), 'world_size': acc.num_processes, 'device': str(acc.device),
        'mixed_precision': acc.mixed_precision, 'dataset': p.meta.get('dataset'), 'splits': p.meta.get('splits'),
        **run_provenance(),
    }
    if st.best is not None:
        report['best'] = dict(st.best)
        best_rec = next((h for h in st.history if h['epoch'] == st.best['epoch']), None)
        if best_rec is not None:
            report['best']['metrics'] = {s: best_rec[s] for s in p.eval_batches if s in best_rec}
    if run.is_main:
        # the weights of the last finished epoch, or of a stop inside epoch `st.epoch` after `st.step` micro-steps
        where = {'epoch': st.epoch - 1} if st.step == 0 else {'epoch': st.epoch, 'step_in_epoch': st.step}
        save_model_file(run.out / 'last.safetensors', acc.unwrap_model(run.model).state_dict(),
                        run._file_meta(**where, checkpoint='last', finished=finished, metrics=report['last']))
        test = (run.last_report or {}).get('test')
        if test is not None:
            per_class = {k.upper(): v['per_class'] for k, v in test.items()
                         if isinstance(v, dict) and not k.startswith('expert')}
            png = plot_per_class_accuracy(per_class, p.train_counts, run.out / 'per_class_accuracy.png',
                                          title=f'{run.name}: per-class test accuracy '
                                                f'({"final" if finished else "unfinished"}, epoch {st.epoch})',
                                          groups=p.groups, class_names=p.class_names)
            run.logger.log_image('per_class_accuracy', png, st.updates)
            report['per_class_plot'] = str(png)
        summary = {'finished': finished, 'updates_done': st.updates}
        if st.best is not None:
            summary.update({'best/top1': st.best['top1'], 'best/epoch': st.best['epoch']})
        run.logger.log_summary(summary)
        atomic_write_text(run.out / 'report.json', json.dumps(report, indent=1))
        report['wandb_dir'] = run.logger.wandb_dir
        if not finished:
            print(f'[{p.kind}] {run.name}: UNFINISHED ({run.stopped_by}) after {st.updates}/{planned} updates '
                  f'({100 * st.updates / max(planned, 1):.1f}% of the schedule, {format_seconds(run.elapsed())}); '
                  f'resume with runtime.resume=auto', flush=True)
    acc.wait_for_everyone()
    return report
