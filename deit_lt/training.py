"""Wiring of a DeiT-LT student run: data, student, teacher, optimizer, resume, evaluation, checkpoints, report.

`train(cfg, accelerator)` is what `tools/train.py` calls (the part of DeiT's `main.py` that is not argument
parsing). Everything it checks, it checks before the first step: class counts of teacher and data, the teacher
file, image size against the model, batch against the dataset, the DRW epoch against the schedule.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from .checkpoint import load_training_state, save_model_file, save_training_state
from .config import TrainConfig, save_config, to_dict
from .data import create_datasets
from .data.pipeline import create_eval_batches, create_train_batches, resolve_placement
from .data.samplers import create_sampler
from .data.transforms import resolve_norm
from .engine import EpochState, TeacherAdapter, train_one_epoch, updates_per_epoch
from .eval import evaluate
from .losses import DistillationLoss
from .models import deit as _register_students  # noqa: F401
from .models.factory import is_distilled, load_state_dict_checked, unwrap_model
from .runtime import gather_fn, resolve_resume, run_provenance, seed_step, want_compile
from .tracking import RunLogger, plot_per_class_accuracy

__all__ = ['ConfigurationError', 'train', 'build_student', 'format_report_table']


class ConfigurationError(ValueError):
    """Settings that cannot work together; raised before any training."""


def build_student(cfg: TrainConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    """timm.create_model for the student, with a readable error when the image size does not fit the model."""
    kwargs: dict[str, Any] = dict(cfg.model.kwargs)
    if cfg.model.img_size is not None:
        kwargs['img_size'] = cfg.model.img_size
    try:
        model = timm.create_model(cfg.model.name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                  drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ConfigurationError(f'unknown model {cfg.model.name!r} (any timm model name, or one of ours: '
                                     f'{", ".join(timm.list_models("deit_*_patch*_32") + timm.list_models("deit_micro*"))})') from None
        raise
    pe = getattr(model, 'patch_embed', None)
    if pe is not None:
        size, patch = tuple(pe.img_size), tuple(pe.patch_size)
        if any(s % p for s, p in zip(size, patch)):
            raise ConfigurationError(f'image size {size} is not a multiple of the patch size {patch} of '
                                     f'{cfg.model.name}; choose model.img_size divisible by {patch[0]}')
    if hasattr(model, 'set_distilled_training'):
        model.set_distilled_training(True)
    return model


def _model_img_size(model: torch.nn.Module) -> int:
    pe = getattr(unwrap_model(model), 'patch_embed', None)
    if pe is not None:
        return int(pe.img_size[0])
    return int(unwrap_model(model).pretrained_cfg['input_size'][-1])


def _check_config(cfg: TrainConfig) -> None:
    o, d = cfg.optim, cfg.distill
    if o.epochs < 1:
        raise ConfigurationError('optim.epochs must be >= 1')
    if d.drw_epoch is not None and not 0 <= d.drw_epoch < o.epochs:
        raise ConfigurationError(f'distill.drw_epoch={d.drw_epoch} is past the last epoch (optim.epochs={o.epochs}); '
                                 f'set it below {o.epochs} or to null')
    if o.batch_size < 1 or o.accum_steps < 1:
        raise ConfigurationError('optim.batch_size and optim.accum_steps must be >= 1')
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and o.batch_size % 2:
        raise ConfigurationError(f'Mixup/CutMix pair images within a batch: optim.batch_size={o.batch_size} '
                                 f'must be even')
    if d.type != 'none' and not cfg.teacher.checkpoint:
        raise ConfigurationError(f'distill.type={d.type} needs teacher.checkpoint (a trained teacher; see '
                                 f'tools/train_teacher.py), or distill.type=none for the no-teacher baseline')


def _load_teacher(cfg: TrainConfig, num_classes: int, in_chans: int, student_norm, device, channels_last: bool,
                  class_map=None):
    from .models.teacher import load_teacher
    tc = cfg.teacher
    if not Path(tc.checkpoint).is_file():
        raise ConfigurationError(f'teacher checkpoint not found: {tc.checkpoint}')
    model, meta = load_teacher(tc.checkpoint, num_classes=tc.num_classes or num_classes, arch=tc.arch,
                               format=tc.format, use_norm=tc.use_norm, in_chans=in_chans, device=device)
    if (tc.num_classes or num_classes) != num_classes:
        raise ConfigurationError(f'teacher.num_classes={tc.num_classes} but the data has {num_classes} classes')
    mean = tc.mean or meta.get('mean')
    std = tc.std or meta.get('std')
    teacher_norm = resolve_norm(mean, std, in_chans) if mean and std else None
    scale = tc.logit_scale if tc.logit_scale is not None else (
        meta.get('logit_scale') or 1.0 if cfg.distill.type == 'soft' else 1.0)
    return TeacherAdapter(model, tc.img_size or meta.get('img_size'), student_norm, teacher_norm,
                          logit_scale=float(scale), class_map=class_map if tc.map_targets else None,
                          channels_last=channels_last).to(device), meta


def format_report_table(report: dict, title: str = '') -> str:
    """Console table: one row per predictor with top-1 / top-5 / head / mid / tail."""
    rows = [(k, report[k]) for k in ('cls', 'dist', 'avg', 'logits') if k in report]
    lines = [title] if title else []
    lines.append(f'{"predictor":<10}{"top1":>8}{"top5":>8}{"head":>8}{"mid":>8}{"tail":>8}')
    for name, r in rows:
        lines.append(f'{name.upper():<10}' + ''.join(f'{r[k]:8.2f}' for k in ('top1', 'top5', 'head', 'mid', 'tail')))
    return '\n'.join(lines)


def _compact(report: dict) -> dict:
    """The report without confusion matrices (for logs / JSON lines)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != 'confusion'} if isinstance(v, dict) else v)
            for k, v in report.items()}


def train(cfg: TrainConfig, accelerator) -> dict:
    """Run (or resume) training described by `cfg`; returns the final report."""
    _check_config(cfg)
    is_main = accelerator.is_main_process
    device = accelerator.device
    out_dir = Path(cfg.runtime.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index

    # ---- data
    data = create_datasets(cfg.data)
    train_set, test_set, val_set = data['train'], data['test'], data.get('val')
    num_classes, in_chans = train_set.num_classes, train_set.in_chans
    groups = train_set.splits.groups
    mean, std = resolve_norm(cfg.aug.mean, cfg.aug.std, in_chans)

    # ---- student (initial weights from the run's seed, identical on every rank)
    seed_step(cfg.runtime.seed, 0x1A17, 0, 0)
    model = build_student(cfg, num_classes, in_chans)
    img_size = _model_img_size(model)
    distilled = is_distilled(model)
    if cfg.distill.type != 'none' and not distilled:
        raise ConfigurationError(f'{cfg.model.name} has no DIST token: use a *_distilled_* model, or '
                                 f'distill.type=none for the ViT baseline')
    channels_last = cfg.runtime.channels_last and device.type == 'cuda'

    # ---- teacher
    teacher, teacher_meta = None, None
    if cfg.distill.type != 'none':
        teacher, teacher_meta = _load_teacher(cfg, num_classes, in_chans, (mean, std), device, channels_last,
                                              train_set.class_map)

    # ---- batches
    placement = resolve_placement(train_set, cfg.aug, cfg.data.in_memory_max_mb)
    sampler = create_sampler('repeated_aug', train_set.targets, num_replicas=world, rank=rank, seed=cfg.runtime.seed,
                             num_repeats=cfg.aug.repeated_aug)
    batches = create_train_batches(train_set, cfg.aug, img_size=img_size, batch_size=cfg.optim.batch_size,
                                   device=device, sampler=sampler, seed=cfg.runtime.seed, rank=rank,
                                   return_clean=teacher is not None and cfg.teacher.input == 'clean',
                                   placement=None if cfg.aug.placement == 'auto' else placement,
                                   max_device_mb=cfg.data.in_memory_max_mb,
                                   compile=want_compile(cfg.runtime.compile, device))
    eval_sets = {'test': test_set} | ({'val': val_set} if val_set is not None else {})
    evals = {k: create_eval_batches(ds, cfg.aug, img_size=img_size, batch_size=cfg.runtime.eval_batch_size,
                                    device=device, num_replicas=world, rank=rank, placement=placement)
             for k, ds in eval_sets.items()}
    select_on = 'val' if val_set is not None else 'test'

    # ---- optimisation
    global_batch = cfg.optim.batch_size * world * cfg.optim.accum_steps
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_base_batch
    opt_kwargs = {}
    if cfg.optim.opt.lower() in ('adamw', 'adam'):
        fused = cfg.optim.fused if cfg.optim.fused is not None else device.type == 'cuda'
        if fused:
            opt_kwargs['fused'] = True
    optimizer = create_optimizer_v2(model, opt=cfg.optim.opt, lr=lr, weight_decay=cfg.optim.weight_decay,
                                    momentum=cfg.optim.momentum, **opt_kwargs)
    upe = updates_per_epoch(len(batches), cfg.optim.accum_steps)
    total_updates = cfg.optim.epochs * upe
    if cfg.optim.sched == 'cosine':
        scheduler = CosineLRScheduler(optimizer, t_initial=total_updates, lr_min=cfg.optim.min_lr,
                                      warmup_t=round(cfg.optim.warmup_epochs * upe),
                                      warmup_lr_init=cfg.optim.warmup_lr, t_in_epochs=False)
    else:
        scheduler = CosineLRScheduler(optimizer, t_initial=total_updates, lr_min=lr, t_in_epochs=False)
    criterion = DistillationLoss(train_set.train_counts, distill=cfg.distill.type, alpha=cfg.distill.alpha,
                                 tau=cfg.distill.tau, drw_epoch=cfg.distill.drw_epoch,
                                 beta=cfg.distill.beta).to(device)
    mixup_fn = None
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                         switch_prob=cfg.aug.mixup_switch_prob, mode=cfg.aug.mixup_mode,
                         label_smoothing=cfg.aug.smoothing, num_classes=num_classes)

    # ---- resume (before wrapping, so weights load into the plain module)
    state = EpochState(epoch=0)
    elapsed_before = 0.0   # training time of earlier (resumed-from) processes
    best = {'top1': -1.0, 'epoch': -1}
    history: list[dict] = []
    resume_dir = resolve_resume(cfg.runtime)
    wandb_id = None
    if resume_dir is not None:
        ckpt = load_training_state(resume_dir, map_location='cpu')
        load_state_dict_checked(model, ckpt['model'], str(resume_dir / 'model.safetensors'))
        if ckpt['optimizer'] is not None:
            optimizer.load_state_dict(ckpt['optimizer'])
        s = ckpt['state']
        state = EpochState(epoch=s['epoch'], step=s['step'], updates=s['updates'])
        best, history, wandb_id = s.get('best', best), s.get('history', []), s.get('wandb_id')
        elapsed_before = float(s.get('elapsed_s', 0.0))
        if s.get('micro_steps_per_epoch') not in (None, len(batches)):
            raise ConfigurationError(f'{resume_dir} was written with {s["micro_steps_per_epoch"]} micro-batches per '
                                     f'epoch, this run has {len(batches)}: batch size or processes changed')
    scheduler.step_update(state.updates)

    model.to(device)
    if want_compile(cfg.runtime.compile, device):
        model = torch.compile(model)
        if teacher is not None:
            teacher = torch.compile(teacher)   # forward only (no_grad inside); a ResNet-32 is launch-bound eager
    model, optimizer = accelerator.prepare(model, optimizer)

    meta = {
        'kind': 'student', 'arch': cfg.model.name, 'num_classes': num_classes,
        'model_kwargs': dict(cfg.model.kwargs, in_chans=in_chans,
                             **({'img_size': cfg.model.img_size} if cfg.model.img_size else {})),
        'img_size': img_size, 'in_chans': in_chans, 'mean': list(mean), 'std': list(std),
        'train_counts': train_set.train_counts.tolist(), 'class_names': train_set.class_names,
        'class_map': train_set.class_map.tolist() if train_set.class_map is not None else None,
        'dataset': {'name': cfg.data.name, 'imb_factor': cfg.data.imb_factor}, 'splits': train_set.splits.as_dict(),
        'config': to_dict(cfg),
    }
    logger = RunLogger(cfg.wandb, out_dir, to_dict(cfg), enabled=is_main, resume_id=wandb_id)
    if is_main:
        save_config(cfg, out_dir / 'config.yaml')
        if train_set.class_map is not None:
            (out_dir / 'class_map.json').write_text(json.dumps(
                {'student_label_of_original_id': train_set.class_map.tolist()}))
        print(f'[deit-lt] {cfg.name}: {len(train_set)} train images, {num_classes} classes, '
              f'{cfg.model.name} @ {img_size}px, {"teacher " + str(cfg.teacher.checkpoint) if teacher else "no teacher"}'
              f', {world} process(es) on {device}, {accelerator.mixed_precision}, placement={placement}, '
              f'global batch {global_batch}, lr {lr:.3g}, {upe} updates/epoch'
              + (f', resuming from {resume_dir} (epoch {state.epoch}, step {state.step})' if resume_dir else ''))
    gather = gather_fn(accelerator)

    def save_state(tag: str) -> None:
        if is_main:
            save_training_state(out_dir, tag, model_state=accelerator.unwrap_model(model).state_dict(),
                                meta=dict(meta, epoch=state.epoch), optimizer_state=optimizer.state_dict(),
                                state={'epoch': state.epoch, 'step': state.step, 'updates': state.updates,
                                       'best': best, 'history': history, 'wandb_id': logger.run_id,
                                       'micro_steps_per_epoch': len(batches),
                                       'elapsed_s': elapsed_before + time.time() - t_start},
                                keep=cfg.runtime.keep_checkpoints)
        accelerator.wait_for_everyone()

    def on_update(st: EpochState) -> None:
        n = cfg.runtime.save_every_steps
        if n and st.updates % n == 0 and st.step < len(batches):
            save_state(f'epoch{st.epoch:05d}-update{st.updates:08d}')

    max_updates = cfg.runtime.max_steps
    last_report, evaluated_at = None, -1

    def run_eval() -> dict:
        nonlocal last_report, evaluated_at
        last_report = {k: evaluate(model, b, groups, num_classes, autocast=accelerator.autocast, gather=gather)
                       for k, b in evals.items()}
        evaluated_at = state.updates
        return last_report
    t_start = time.time()
    progress = None
    while state.epoch < cfg.optim.epochs:
        epoch = state.epoch
        if is_main and cfg.runtime.progress:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(batches), initial=state.step, desc=f'epoch {epoch}', leave=False,
                            dynamic_ncols=True)
        train_stats = train_one_epoch(
            model, criterion, batches, optimizer, scheduler, accelerator, state, teacher=teacher,
            teacher_input=cfg.teacher.input, mixup_fn=mixup_fn, no_mixup_drw=cfg.distill.no_mixup_drw,
            smoothing=cfg.aug.smoothing, num_classes=num_classes, accum_steps=cfg.optim.accum_steps,
            clip_grad=cfg.optim.clip_grad, seed=cfg.runtime.seed, log_every=cfg.runtime.log_every,
            max_updates=max_updates, on_log=logger.log, on_update=on_update, progress=progress)
        if progress is not None:
            progress.close()
        stopped = max_updates is not None and state.updates >= max_updates
        epoch_done = state.step >= len(batches)
        if epoch_done:
            state.epoch, state.step = epoch + 1, 0
        final_epoch = state.epoch >= cfg.optim.epochs
        if epoch_done and ((epoch + 1) % cfg.runtime.eval_every == 0 or final_epoch):
            reports = run_eval()
            head = 'avg' if distilled else 'logits'
            sel = reports[select_on][head]['top1']
            record = {'epoch': epoch, 'updates': state.updates, 'time_s': round(time.time() - t_start, 1),
                      'train': train_stats,
                      **{k: {p: {m: r[p][m] for m in ('top1', 'top5', 'head', 'mid', 'tail')}
                             for p in r if isinstance(r[p], dict)} for k, r in reports.items()}}
            history.append(record)
            if is_main:
                scalars = {f'{k}/{p}_{m}': r[p][m] for k, r in reports.items() for p in r if isinstance(r[p], dict)
                           for m in ('top1', 'top5', 'head', 'mid', 'tail', 'ece')}
                if 'agreement' in reports['test']:
                    scalars['test/cls_dist_agreement'] = reports['test']['agreement']
                logger.log(scalars | {'epoch': epoch}, state.updates)
                print(format_report_table(reports['test'], f'epoch {epoch} test ({len(test_set)} images)'))
            if sel > best['top1']:
                best = {'top1': sel, 'epoch': epoch, 'select_on': select_on, 'predictor': head}
                if is_main:
                    save_model_file(out_dir / 'best.safetensors', accelerator.unwrap_model(model).state_dict(),
                                    dict(meta, epoch=epoch, metrics=_compact(reports)))
        if epoch_done and ((epoch + 1) % cfg.runtime.save_every == 0 or final_epoch or stopped):
            save_state(f'epoch{state.epoch:05d}')
        elif stopped:
            save_state(f'epoch{state.epoch:05d}-update{state.updates:08d}')
        if stopped:
            break

    if evaluated_at != state.updates:   # stopped inside an epoch: the final weights have not been evaluated yet
        run_eval()
    result = {'name': cfg.name, 'kind': 'student', 'epochs_done': state.epoch, 'updates': state.updates,
              'best': best, 'wall_time_s': round(time.time() - t_start, 1) + elapsed_before,
              'world_size': world, 'device': str(device), 'mixed_precision': accelerator.mixed_precision,
              'splits': train_set.splits.as_dict(), **run_provenance()}
    if last_report is not None:
        result['last'] = _compact(last_report)
        best_hist = next((h for h in history if h['epoch'] == best['epoch']), None)
        result['best_epoch_metrics'] = best_hist
    if is_main:
        save_model_file(out_dir / 'last.safetensors', accelerator.unwrap_model(model).state_dict(),
                        dict(meta, epoch=state.epoch - 1, metrics=result.get('last')))
        if last_report is not None:
            r = last_report['test']
            per_class = {p.upper(): r[p]['per_class'] for p in ('cls', 'dist', 'avg', 'logits') if p in r}
            png = plot_per_class_accuracy(per_class, train_set.train_counts, out_dir / 'per_class_accuracy.png',
                                          title=f'{cfg.name}: per-class test accuracy (epoch {state.epoch - 1})',
                                          groups=groups, class_names=train_set.class_names)
            logger.log_image('per_class_accuracy', png, state.updates)
            result['per_class_plot'] = str(png)
            logger.log_summary({'best/top1': best['top1'], 'best/epoch': best['epoch']})
        (out_dir / 'report.json').write_text(json.dumps(result, indent=1))
        result['wandb_dir'] = logger.wandb_dir
    logger.finish()
    return result
