"""Wiring of a teacher run: data, CNN, loss, SGD/SAM, schedules, resume, evaluation, checkpoints, report.

`train_teacher(cfg)` is what `tools/train_teacher.py` calls. It reproduces the Saddle-LongTail recipes
(teachers_sam.md sections 4-8) on the project's shared pieces: `deit_lt.data` (the same long-tailed split and
label space the student uses, so teacher and student labels agree), `deit_lt.eval` (overall / head / mid / tail /
per-class), `deit_lt.checkpoint` (model files and resumable states) and `deit_lt.tracking`.

Outputs in `runtime.output_dir`: `best.safetensors` (best top-1 on `select_on`, test by default as the originals)
and `last.safetensors` (final epoch), both deit-lt model files with kind='teacher'; `config.yaml`,
`class_counts.json`, `per_class_accuracy.png`, `report.json`, `log.jsonl` and `checkpoints/` (resumable states
written at epoch ends, and every `runtime.save_every_steps` steps when set).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from deit_lt.checkpoint import CheckpointError, load_training_state, save_model_file, save_training_state
from deit_lt.config import ConfigError, save_config, to_dict
from deit_lt.data import create_datasets
from deit_lt.data.pipeline import create_eval_batches, create_train_batches, resolve_placement
from deit_lt.data.samplers import create_sampler
from deit_lt.data.transforms import resolve_norm
from deit_lt.eval import evaluate
from deit_lt.models.factory import load_state_dict_checked
from deit_lt.runtime import create_accelerator, gather_fn, resolve_resume, seed_step, want_compile
from deit_lt.tracking import RunLogger, plot_per_class_accuracy

from .config import _FP16_SAM, TeacherTrainConfig, validate_config
from .engine import train_one_epoch
from deit_lt.models.cnn import create_teacher_model, display_arch
from .losses import TeacherLoss
from deit_lt.models.layers.normed_linear import COSINE_LOGIT_SCALE
from .optim import base_optimizer, create_lr_scheduler, create_optimizer, sam_rho, set_rho

__all__ = ['train_teacher', 'format_teacher_report']

_METRICS = ('top1', 'top5', 'head', 'mid', 'tail')


def format_teacher_report(report: dict, title: str = '') -> str:
    """One console line per evaluated split: top-1 / top-5 / head / mid / tail."""
    lines = [title] if title else []
    for split, r in report.items():
        lines.append(f'  {split:<5} ' + '  '.join(f'{m} {r["logits"][m]:6.2f}' for m in _METRICS))
    return '\n'.join(lines)


def _summary(report: dict) -> dict:
    """Per split: the headline numbers and per-class accuracy (no confusion matrix)."""
    return {split: {k: v for k, v in r['logits'].items() if k != 'confusion'} for split, r in report.items()}


def _headline(report: dict) -> dict:
    return {split: {m: r['logits'][m] for m in _METRICS} for split, r in report.items()}


def train_teacher(cfg: TeacherTrainConfig, accelerator=None) -> dict:
    """Train (or resume) the teacher described by `cfg`; returns the final report (also written to report.json).

    Args:
        cfg: the resolved config.
        accelerator: an `accelerate.Accelerator` (default: `deit_lt.runtime.create_accelerator(cfg.runtime)`).
    """
    validate_config(cfg)
    accelerator = accelerator or create_accelerator(cfg.runtime)
    if cfg.sam.enabled and accelerator.mixed_precision == 'fp16':
        raise ConfigError(_FP16_SAM + f' (runtime.mixed_precision={cfg.runtime.mixed_precision} resolved to fp16)')
    is_main, device = accelerator.is_main_process, accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    out_dir = Path(cfg.runtime.output_dir)
    o = cfg.optim
    if o.batch_size % world:
        raise ConfigError(f'optim.batch_size={o.batch_size} is the global batch; it must divide evenly over the '
                          f'{world} processes')

    # ---- data: the student's long-tailed split and label space
    data = create_datasets(cfg.data)
    train_set, test_set, val_set = data['train'], data['test'], data.get('val')
    if cfg.select_on == 'val' and val_set is None:
        raise ConfigError('select_on=val needs a validation split: set data.val_per_class > 0 (CIFAR, digits) or '
                          'a val list, or use select_on=test')
    num_classes, in_chans = train_set.num_classes, train_set.in_chans
    counts = train_set.train_counts
    groups = train_set.splits.groups
    mean, std = resolve_norm(cfg.aug.mean, cfg.aug.std, in_chans)
    img_size = cfg.model.img_size or (train_set.image_size[0] if train_set.image_size else 224)

    # ---- model and loss (initialised from runtime.seed: identical on every rank and in every repeat)
    seed_step(cfg.runtime.seed)
    use_norm = cfg.model.use_norm if cfg.model.use_norm is not None else cfg.loss.type == 'ldam'
    model_kwargs = dict(cfg.model.kwargs)
    if cfg.model.drop_rate:
        model_kwargs['drop_rate'] = cfg.model.drop_rate
    try:
        model, arch, model_kwargs = create_teacher_model(cfg.model.arch, num_classes, use_norm=use_norm,
                                                         in_chans=in_chans, **model_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f'model: {e}') from None
    try:
        criterion = TeacherLoss(counts, cfg.loss.type, drw_epoch=cfg.loss.drw_epoch, beta=cfg.loss.beta,
                                max_m=cfg.loss.max_m, s=cfg.loss.s, cosine_head=use_norm).to(device)
    except ValueError as e:
        raise ConfigError(f'loss: {e}') from None

    # ---- batches
    placement = resolve_placement(train_set, cfg.aug, cfg.data.in_memory_max_mb)
    per_device = o.batch_size // world
    sampler = create_sampler('repeated_aug' if cfg.aug.repeated_aug > 1 else 'instance', train_set.targets,
                             num_replicas=world, rank=rank, seed=cfg.runtime.seed, num_repeats=cfg.aug.repeated_aug)
    # no Mixup in the teacher recipes: keep the last partial batch, as the originals' loaders do (97 steps of
    # CIFAR-10-LT IF100 at batch 128, not 96)
    batches = create_train_batches(train_set, cfg.aug, img_size=img_size, batch_size=per_device, device=device,
                                   sampler=sampler, seed=cfg.runtime.seed, rank=rank, placement=placement,
                                   drop_last=False)
    eval_sets = {'test': test_set} | ({'val': val_set} if val_set is not None else {})
    evals = {k: create_eval_batches(ds, cfg.aug, img_size=img_size, batch_size=cfg.runtime.eval_batch_size,
                                    device=device, num_replicas=world, rank=rank, placement=placement)
             for k, ds in eval_sets.items()}

    # ---- optimisation
    optimizer = create_optimizer(model, o, cfg.sam)
    scheduler = create_lr_scheduler(optimizer, o)

    # ---- resume (before wrapping, so weights load into the plain module)
    state: dict[str, Any] = {'epoch': 0, 'step': 0, 'global_step': 0, 'best': {'top1': -1.0, 'epoch': -1},
                             'history': [], 'wandb_id': None, 'train_time_s': 0.0, 'train_steps_timed': 0}
    resume_dir = resolve_resume(cfg.runtime)
    if resume_dir is not None:
        state = _resume(resume_dir, state, model, optimizer, scheduler, num_classes=num_classes, arch=arch,
                        steps_per_epoch=len(batches), sam=cfg.sam.enabled)

    model.to(device)
    if cfg.runtime.channels_last and device.type == 'cuda':
        model.to(memory_format=torch.channels_last)
    if want_compile(cfg.runtime.compile, device):
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    meta = {
        'kind': 'teacher', 'arch': arch, 'num_classes': num_classes, 'model_kwargs': model_kwargs,
        'img_size': img_size, 'in_chans': in_chans, 'mean': list(mean), 'std': list(std),
        'use_norm': bool(use_norm), 'logit_scale': COSINE_LOGIT_SCALE if use_norm else 1.0,
        'train_counts': counts.tolist(), 'class_names': train_set.class_names,
        'class_map': train_set.class_map.tolist() if train_set.class_map is not None else None,
        'label_space': 'sorted' if train_set.class_map is not None else 'dataset',
        'dataset': {'name': cfg.data.name, 'imb_factor': cfg.data.imb_factor}, 'splits': train_set.splits.as_dict(),
        'loss': {'type': cfg.loss.type, 'drw_epoch': cfg.loss.drw_epoch, 'sam': cfg.sam.enabled},
        'config': to_dict(cfg),
    }
    logger = RunLogger(cfg.wandb, out_dir, to_dict(cfg), enabled=is_main, job_type='teacher',
                       resume_id=state['wandb_id'])
    if is_main:
        save_config(cfg, out_dir / 'config.yaml')
        (out_dir / 'class_counts.json').write_text(json.dumps(
            {'train_counts': counts.tolist(), 'class_names': train_set.class_names,
             'groups': groups, 'class_map': meta['class_map']}, indent=1))
        print(f'[teacher] {cfg.name}: {display_arch(arch, model_kwargs)} ({"cosine" if use_norm else "linear"} head) '
              f'on {cfg.data.name} ({len(train_set)} train images, {num_classes} classes, {img_size}px), '
              f'{cfg.loss.type.upper()}{"+DRW@" + str(cfg.loss.drw_epoch) if cfg.loss.drw_epoch is not None else ""}'
              f'{"+SAM" if cfg.sam.enabled else ""}, {world} process(es) on {device}, {accelerator.mixed_precision}, '
              f'placement={placement}, global batch {o.batch_size}, {len(batches)} steps/epoch'
              + (f', resuming from {resume_dir} (epoch {state["epoch"] + 1}, step {state["step"]})'
                 if resume_dir else ''))
    gather = gather_fn(accelerator)
    select = cfg.select_on

    def save_state(tag: str) -> None:
        if is_main:
            save_training_state(
                out_dir, tag, model_state=accelerator.unwrap_model(model).state_dict(),
                meta=dict(meta, epoch=state['epoch']),
                optimizer_state={'optimizer': _opt(optimizer).state_dict(), 'scheduler': scheduler.state_dict()},
                state=dict(state, steps_per_epoch=len(batches)), keep=cfg.runtime.keep_checkpoints)
        accelerator.wait_for_everyone()

    max_steps = cfg.runtime.max_steps
    last_report, evaluated_at = None, None

    def run_eval(record: dict) -> dict:
        nonlocal last_report, evaluated_at
        t_eval = time.perf_counter()
        last_report = {k: evaluate(model, b, groups, num_classes, autocast=accelerator.autocast, gather=gather)
                       for k, b in evals.items()}
        evaluated_at = state['global_step']
        record['eval_time_s'] = round(time.perf_counter() - t_eval, 2)
        record |= _headline(last_report)
        return last_report

    t_run = time.perf_counter()
    while state['epoch'] < o.epochs:
        epoch = state['epoch']
        rho = sam_rho(cfg.sam, epoch)
        if cfg.sam.enabled:
            set_rho(_opt(optimizer), rho)
        criterion.set_epoch(epoch)
        lr = base_optimizer(_opt(optimizer)).param_groups[0]['lr']

        def after_step(step: int) -> bool:
            state['step'] = step + 1
            state['global_step'] += 1
            n = cfg.runtime.save_every_steps
            if n and state['global_step'] % n == 0 and state['step'] < len(batches):
                save_state(f'epoch{epoch:05d}-step{state["global_step"]:08d}')
            return max_steps is not None and state['global_step'] >= max_steps

        def log_window(scalars: dict, step: int) -> None:
            if is_main:
                logger.log(scalars | {'lr': lr, 'rho': rho, 'epoch': epoch}, state['global_step'])

        stats = train_one_epoch(model, criterion, optimizer, batches, epoch=epoch, start_step=state['step'],
                                seed=cfg.runtime.seed, rank=rank, use_sam=cfg.sam.enabled,
                                bn_second_pass=cfg.sam.bn_second_pass, backward=accelerator.backward,
                                log_every=cfg.runtime.log_every, log=log_window, after_step=after_step)
        state['train_time_s'] += stats['time_s']
        state['train_steps_timed'] += stats['steps']
        epoch_done = state['step'] >= len(batches)
        stopped = max_steps is not None and state['global_step'] >= max_steps
        if epoch_done:
            scheduler.step()
            state['epoch'], state['step'] = epoch + 1, 0
        final = state['epoch'] >= o.epochs
        record = {'epoch': epoch + 1, 'lr': lr, 'rho': rho if cfg.sam.enabled else 0.0,
                  'drw': criterion.drw_active, 'train_loss': stats['loss'], 'train_acc': stats['acc'],
                  'train_time_s': round(stats['time_s'], 2)}
        if epoch_done and ((epoch + 1) % cfg.runtime.eval_every == 0 or final or stopped):
            report = run_eval(record)
            top1 = report[select]['logits']['top1']
            if top1 > state['best']['top1']:
                state['best'] = {'top1': top1, 'epoch': epoch + 1, 'split': select, **_headline(report),
                                 'per_class': report['test']['logits']['per_class']}
                if is_main:
                    save_model_file(out_dir / 'best.safetensors', accelerator.unwrap_model(model).state_dict(),
                                    _file_meta(meta, epoch + 1, report, 'best', state['best'], select))
            if is_main:
                print(format_teacher_report(report, f'epoch {epoch + 1}/{o.epochs}: train loss {stats["loss"]:.4f} '
                                                    f'acc {stats["acc"]:.2f}, lr {lr:.4g}, rho {record["rho"]:.3g}, '
                                                    f'{"DRW, " if criterion.drw_active else ""}'
                                                    f'{stats["time_s"]:.1f}s train + {record["eval_time_s"]:.1f}s '
                                                    f'eval; best {select} top1 {state["best"]["top1"]:.2f} '
                                                    f'(epoch {state["best"]["epoch"]})'))
        if is_main:
            logger.log({f'epoch/{k}': v for k, v in record.items() if not isinstance(v, dict)}
                       | {f'{s}/{m}': v for s, r in record.items() if isinstance(r, dict) for m, v in r.items()},
                       state['global_step'])
        if epoch_done:
            state['history'].append(record)
        if epoch_done and ((epoch + 1) % cfg.runtime.save_every == 0 or final or stopped):
            save_state(f'epoch{state["epoch"]:05d}')
        elif stopped:
            save_state(f'epoch{epoch:05d}-step{state["global_step"]:08d}')
        if stopped:
            break

    if evaluated_at != state['global_step']:
        # Stopped inside an epoch, or resumed a finished run: the final weights have not been evaluated yet.
        run_eval({})
    return _finish(cfg, accelerator, model, meta, state, last_report, train_set, groups, logger, out_dir,
                   wall=time.perf_counter() - t_run)


def _opt(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer under accelerate's wrapper (SAM or SGD)."""
    return getattr(optimizer, 'optimizer', optimizer)


def _file_meta(meta: dict, epoch: int, report: dict, which: str, best: dict, select: str) -> dict:
    return dict(meta, epoch=epoch, checkpoint=which, metrics=_summary(report),
                selection={'split': select, 'metric': 'top1', 'best_epoch': best['epoch'],
                           'note': 'best checkpoint picked on the test split, as Saddle-LongTail did'
                           if select == 'test' else 'best checkpoint picked on the validation split'})


def _resume(resume_dir: Path, state: dict, model, optimizer, scheduler, *, num_classes: int, arch: str,
            steps_per_epoch: int, sam: bool) -> dict:
    ckpt = load_training_state(resume_dir, map_location='cpu')
    meta = ckpt['meta'] or {}
    if meta.get('num_classes') != num_classes:
        raise CheckpointError(f'{resume_dir}: checkpoint has {meta.get("num_classes")} classes, the data has '
                              f'{num_classes}; resume only with the same dataset (or start a new output_dir)')
    if meta.get('arch') != arch:
        raise CheckpointError(f'{resume_dir}: checkpoint is a {meta.get("arch")!r}, the config builds {arch!r}')
    load_state_dict_checked(model, ckpt['model'], str(resume_dir / 'model.safetensors'))
    saved = ckpt['state']
    if saved.get('steps_per_epoch') not in (None, steps_per_epoch):
        raise CheckpointError(f'{resume_dir} was written with {saved["steps_per_epoch"]} steps per epoch, this run '
                              f'has {steps_per_epoch}: the batch size, data or number of processes changed')
    opt_state = ckpt['optimizer']
    if opt_state is None:
        raise CheckpointError(f'{resume_dir} has no optimizer state (optimizer.pt); cannot resume exactly')
    if ('rho' in opt_state['optimizer']['param_groups'][0]) != sam:
        raise CheckpointError(f'{resume_dir}: the run was trained with sam.enabled={not sam}; keep the setting '
                              f'to resume')
    optimizer.load_state_dict(opt_state['optimizer'])
    scheduler.load_state_dict(opt_state['scheduler'])
    return {k: saved.get(k, v) for k, v in state.items()}


def _finish(cfg: TeacherTrainConfig, accelerator, model, meta: dict, state: dict, last_report: dict,
            train_set, groups: dict, logger: RunLogger, out_dir: Path, wall: float) -> dict:
    epochs_done = state['epoch']
    history = state['history']
    timed = [h['train_time_s'] for h in history]
    result = {
        'name': cfg.name, 'arch': display_arch(meta['arch'], meta['model_kwargs']), 'dataset': meta['dataset'],
        'num_classes': meta['num_classes'], 'loss': cfg.loss.type, 'drw_epoch': cfg.loss.drw_epoch,
        'sam': {'enabled': cfg.sam.enabled, 'schedule': cfg.sam.schedule,
                'rho': cfg.sam.rho if cfg.sam.schedule == 'constant' else cfg.sam.rho_steps},
        'epochs_done': epochs_done, 'epochs': cfg.optim.epochs, 'global_step': state['global_step'],
        'best': state['best'], 'selection': f'best.safetensors = best top-1 on the {cfg.select_on} split '
                                            f'(epoch {state["best"]["epoch"]}); last.safetensors = epoch '
                                            f'{epochs_done}',
        'world_size': accelerator.num_processes, 'device': str(accelerator.device),
        'mixed_precision': accelerator.mixed_precision,
        'train_time_per_epoch_s': round(sum(timed) / len(timed), 2) if timed else None,
        'train_time_per_step_s': round(state['train_time_s'] / state['train_steps_timed'], 4)
        if state['train_steps_timed'] else None,
        'wall_time_s': round(wall, 1), 'history': history,
    }
    result['last'] = _summary(last_report)
    if accelerator.is_main_process:
        last_meta = _file_meta(meta, epochs_done, last_report, 'last', state['best'], cfg.select_on)
        if state['step']:
            last_meta['step_in_epoch'] = state['step']   # stopped inside epoch epochs_done + 1
        save_model_file(out_dir / 'last.safetensors', accelerator.unwrap_model(model).state_dict(), last_meta)
        per_class = {f'best (epoch {state["best"]["epoch"]})': state['best'].get('per_class'),
                     f'last (epoch {epochs_done})': last_report['test']['logits']['per_class']}
        per_class = {k: v for k, v in per_class.items() if v is not None}
        png = plot_per_class_accuracy(per_class, train_set.train_counts, out_dir / 'per_class_accuracy.png',
                                      title=f'{cfg.name}: per-class test accuracy', groups=groups,
                                      class_names=train_set.class_names)
        logger.log_image('per_class_accuracy', png, state['global_step'])
        result['per_class_plot'] = str(png)
        logger.log_summary({'best/top1': state['best']['top1'], 'best/epoch': state['best']['epoch']})
        (out_dir / 'report.json').write_text(json.dumps(result, indent=1))
    logger.finish()
    accelerator.wait_for_everyone()
    return result
