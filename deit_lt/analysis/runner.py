"""Run the analyses on one or more checkpoints: the library behind tools/analyze.py.

Order of work (the checks of input run before any model does):
1. analysis names and values, checkpoint files, their metadata and class counts, the teacher file, labels;
2. the data, rebuilt from the first checkpoint's training config (`config.load_analysis_config`), and the fixed
   image set for attention and rank: `num_images` images of the split drawn with `seed` (the same for every
   checkpoint);
3. per checkpoint, in eval mode and without gradients: one pass over the fixed image set with the attention and
   feature hooks, and (when the set is not the whole split) one plain pass over the split for the logits of every
   predictor and of the teacher, which reads the student's batch resized to its own input;
4. the numbers (`attention`, `rank`, `expertise`, `geometry`, `calibration`), the figures (`plots`), one JSON
   report `analysis.json`, and W&B (offline by default, `<output_dir>/wandb/`; `wandb.mode=disabled` needs no
   wandb).

A model that lacks what an analysis needs (a CNN has no attention; a cosine head's norms are reported but marked)
gets a 'skipped' entry with the reason instead of failing the run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_write_text, read_model_meta
from ..config import AugConfig, to_dict
from ..data.lt_datasets import LTDataset, create_datasets
from ..data.pipeline import create_eval_batches
from ..data.transforms import resolve_norm
from ..models.cnn import has_cosine_head
from ..models.factory import create_model_from_checkpoint, is_distilled, unwrap_model
from ..models.layers.normed_linear import COSINE_LOGIT_SCALE
from ..tracking import RunLogger
from . import plots
from .attention import AttentionDistanceMeter, attention_hooks, attention_modules
from .calibration import calibration_report
from .config import AnalysisConfig, AnalysisError, resolve_analyses, resolve_checkpoint
from .expertise import expertise_report
from .geometry import classifier_norms
from .rank import FeatureRecorder

from ..models.factory import model_predictors
from ..progress import Progress
from ..models.teacher import TeacherAdapter

__all__ = ['probe_indices', 'subset_dataset', 'predictor_logits', 'analyse_checkpoint',
           'run_analysis', 'default_labels', 'output_dir_of']

_logger = logging.getLogger(__name__)


def default_labels(paths: list[Path]) -> list[str]:
    """'<folder>/<stem>' per checkpoint (e.g. 'deit_lt/last'), made unique with a suffix."""
    labels, seen = [], {}
    for p in paths:
        label = f'{p.parent.name}/{p.stem}' if p.parent.name else p.stem
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f'{label}#{seen[label]}')
    return labels


def output_dir_of(cfg: AnalysisConfig, first: Path) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else Path('runs') / 'analysis' / f'{first.parent.name}_{first.stem}'


def probe_indices(n: int, num_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the fixed image set: all n when num_images >= n, else a seeded random subset."""
    if num_images >= n:
        return np.arange(n)
    g = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(n, generator=g)[:num_images].numpy())


def subset_dataset(ds: LTDataset, idx: np.ndarray) -> LTDataset:
    """The samples `idx` of a split (images or paths, labels), keeping its class counts of the training split,
    class names and head/mid/tail groups."""
    sub = copy.copy(ds)
    sub.targets = ds.targets[idx]
    sub.images = None if ds.images is None else ds.images[idx]
    sub.paths = None if ds.paths is None else [ds.paths[i] for i in idx]
    sub.source_indices = None if ds.source_indices is None else ds.source_indices[idx]
    if getattr(ds, '_preloaded', None) is not None:
        sub._preloaded = [ds._preloaded[i] for i in idx]
    sub.class_counts = np.bincount(sub.targets, minlength=ds.num_classes)
    return sub


def predictor_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits (B, C) of every predictor (`deit_lt.models.factory.model_predictors`): 'cls', 'dist', 'avg' of a
    distilled student, 'logits' (and 'expert<i>' for multi-expert models) of any other."""
    return model_predictors(model, x)


def _img_size(model: nn.Module, meta: Mapping[str, Any]) -> int:
    size = meta.get('img_size')
    if size:
        return int(size if isinstance(size, int) else size[-1])
    return int(unwrap_model(model).pretrained_cfg['input_size'][-1])


def _load_teacher(cfg: AnalysisConfig, meta: Mapping[str, Any], model: nn.Module, ds: LTDataset,
                  student_norm: tuple, device: torch.device, cache: dict) -> tuple[nn.Module | None, dict]:
    """The teacher of a student (its training config's, or `cfg.teacher`) and a record of where it came from."""
    if cfg.teacher == 'none' or meta.get('kind') == 'teacher':
        return None, {'used': False, 'reason': 'no teacher for this model'}
    tc = dict(((meta.get('config') or {}).get('teacher') or {}))
    distilled_with = ((meta.get('config') or {}).get('distill') or {}).get('type', 'none') != 'none'
    if cfg.teacher:
        path, tc = Path(cfg.teacher), {}
        if not path.is_file():
            raise CheckpointError(f'teacher checkpoint not found: {path}')
    elif tc.get('checkpoint') and distilled_with and is_distilled(model):
        path = Path(tc['checkpoint'])
        if not path.is_file():
            note = f'teacher checkpoint {path} (from the training config) not found; pass --teacher <file>'
            _logger.warning(note)
            return None, {'used': False, 'reason': note}
    else:
        return None, {'used': False, 'reason': 'not a distilled student and no --teacher given'}
    from ..models.teacher import load_teacher
    key = str(path.resolve())
    if key not in cache:
        cache[key] = load_teacher(path, num_classes=ds.num_classes, arch=tc.get('arch'),
                                  format=tc.get('format') or 'auto', use_norm=tc.get('use_norm'),
                                  in_chans=ds.in_chans, device=device)
    t_model, t_meta = cache[key]
    mean, std = tc.get('mean') or t_meta.get('mean'), tc.get('std') or t_meta.get('std')
    teacher_norm = resolve_norm(mean, std, ds.in_chans) if mean and std else None
    class_map = ds.class_map if tc.get('map_targets') else None
    # what the teacher saw in training: the student's batch resized to its input and re-normalised
    adapter = TeacherAdapter(t_model, tc.get('img_size') or t_meta.get('img_size'), student_norm, teacher_norm,
                             class_map=class_map).to(device)
    return adapter, {'used': True, 'path': str(path), 'arch': t_meta.get('arch'),
                     'sam': (t_meta.get('loss') or {}).get('sam')}


def _progress(total: int, desc: str, enabled: bool) -> Progress:
    return Progress(total, desc, unit='batch', enabled=enabled)


@torch.no_grad()
def _run_pass(model: nn.Module, batches, *, teacher: nn.Module | None, desc: str,
              progress: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Logits of every predictor (and of the teacher) over `batches`, on the CPU, in dataset order."""
    parts: dict[str, list[torch.Tensor]] = {}
    t_parts, ys = [], []
    with _progress(len(batches), desc, progress) as bar:
        for x, y in batches:
            for name, z in predictor_logits(model, x).items():
                parts.setdefault(name, []).append(z.float().cpu())
            if teacher is not None:
                t_parts.append(teacher(x).cpu())
            ys.append(y.cpu())
            bar.update()
    logits = {k: torch.cat(v) for k, v in parts.items()}
    return logits, (torch.cat(t_parts) if t_parts else None), torch.cat(ys).long()


def _probe_meters(m: nn.Module, analyses: list[str], device: torch.device,
                  out: dict[str, Any]) -> tuple[AttentionDistanceMeter | None, FeatureRecorder | None]:
    """The attention-distance meter and feature recorder the analyses need; a skip reason in `out` where the model
    has nothing to measure."""
    meter, recorder = None, None
    if 'attention' in analyses:
        mods = attention_modules(m)
        if mods and hasattr(m, 'patch_embed'):
            meter = AttentionDistanceMeter(len(mods), mods[0][1].num_heads, int(m.num_prefix_tokens),
                                           tuple(m.patch_embed.grid_size), tuple(m.patch_embed.patch_size), device)
        else:
            out['attention'] = {'skipped': f'{type(m).__name__} has no timm Attention blocks over image patches'}
    if 'rank' in analyses:
        try:
            recorder = FeatureRecorder(m)
        except ValueError as e:
            out['rank'] = {'skipped': str(e)}
    return meter, recorder


def analyse_checkpoint(path: Path, label: str, cfg: AnalysisConfig, analyses: list[str], split: LTDataset,
                       probe: LTDataset, train_counts: list[int], device: torch.device,
                       teacher_cache: dict | None = None) -> dict[str, Any]:
    """Every requested analysis of one checkpoint.

    Args:
        path: the model file.
        label: its name in figures and the report.
        cfg: the analysis config (eval transform, batch size, rank / calibration settings).
        analyses: names from `config.ANALYSES`.
        split: the evaluation split; probe: its fixed image set for attention and rank.
        train_counts: (C,) training images per class.
        device: where the model runs.
        teacher_cache: teachers loaded so far, shared between students (path -> (model, meta)).

    Returns:
        {'info': {...}, <analysis>: result or {'skipped': reason}}.
    """
    model, meta = create_model_from_checkpoint(path, device)
    num_classes = int(meta.get('num_classes') or 0)
    if num_classes != split.num_classes:
        raise CheckpointError(f'{path} predicts {num_classes} classes but the data ({cfg.data.name}) have '
                              f'{split.num_classes}; analyse checkpoints trained on the same data (check data.*)')
    warnings = []
    if meta.get('train_counts') is not None and list(meta['train_counts']) != list(train_counts):
        warnings.append(f'{label}: trained on other class counts than the data rebuilt here (data.* differs from '
                        f'its training config)')
    img_size = _img_size(model, meta)
    aug: AugConfig = cfg.aug
    if meta.get('mean') and meta.get('std'):
        aug = dataclasses.replace(aug, mean=tuple(meta['mean']), std=tuple(meta['std']))
    student_norm = resolve_norm(aug.mean, aug.std, split.in_chans)
    teacher, teacher_info = (None, {'used': False, 'reason': 'expertise not requested'})
    if 'expertise' in analyses:
        teacher, teacher_info = _load_teacher(cfg, meta, model, split, student_norm, device,
                                              {} if teacher_cache is None else teacher_cache)
    cosine = has_cosine_head(model)
    logit_scale = float(meta.get('logit_scale') or COSINE_LOGIT_SCALE) if cosine else 1.0

    def batches(ds: LTDataset):
        return create_eval_batches(ds, aug, img_size=img_size, batch_size=cfg.batch_size, device=device,
                                   crop_pct=aug.eval_crop_pct)

    out: dict[str, Any] = {'info': {
        'label': label, 'path': str(path), 'kind': meta.get('kind'), 'arch': meta.get('arch'),
        'img_size': img_size, 'distilled': is_distilled(model), 'cosine_head': cosine, 'logit_scale': logit_scale,
        'teacher': teacher_info, 'rebalance': (meta.get('rebalance') or {}).get('method'), 'warnings': warnings,
        'training_wandb_id': _training_wandb_id(path),
    }}
    m = unwrap_model(model)
    meter, recorder = _probe_meters(m, analyses, device, out)
    full = len(probe) == len(split)
    need_logits = any(a in analyses for a in ('expertise', 'calibration'))
    logits = t_logits = targets = None
    if meter is not None or recorder is not None:
        with _hooks(m, meter, recorder):
            p_logits, p_teacher, p_targets = _run_pass(
                model, batches(probe), teacher=teacher if full else None, desc=f'{label}: probe', progress=cfg.progress)
        if full:
            logits, t_logits, targets = p_logits, p_teacher, p_targets
        if meter is not None:
            out['attention'] = meter.result()
        if recorder is not None:
            out['rank'] = recorder.result(cfg.rank_rtol, cfg.rank_variance, cfg.rank_center)
    if need_logits and logits is None:
        logits, t_logits, targets = _run_pass(model, batches(split), teacher=teacher, desc=f'{label}: {split.split}',
                                              progress=cfg.progress)
    if 'expertise' in analyses:
        out['expertise'] = expertise_report(logits, targets, split.splits.groups, num_classes, t_logits)
    if 'calibration' in analyses:
        out['calibration'] = calibration_report(logits, targets, cfg.n_bins, logit_scale)
    if 'geometry' in analyses:
        norms = classifier_norms(model, train_counts)
        out['geometry'] = norms if norms else {'skipped': 'no nn.Linear or cosine classifier head'}
    return out


@contextlib.contextmanager
def _hooks(model: nn.Module, meter: AttentionDistanceMeter | None, recorder: FeatureRecorder | None):
    """Attention and feature hooks together (either may be None)."""
    with contextlib.ExitStack() as stack:
        if meter is not None:
            stack.enter_context(attention_hooks(model, meter.update))
        if recorder is not None:
            stack.enter_context(recorder.hooks())
        yield


def _training_wandb_id(path: Path) -> str | None:
    """The W&B run id of the training run a checkpoint belongs to (its run folder's resumable state), if any."""
    pointer = path.parent / 'checkpoints' / 'latest'
    try:
        state = json.loads((pointer.parent / pointer.read_text().strip() / 'state.json').read_text())
    except (OSError, ValueError):
        return None
    return state.get('wandb_id') if isinstance(state, dict) else None


def _jsonable(v: Any) -> Any:
    """NaN / inf -> None (JSON has neither), tuples -> lists, recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _present(results: Mapping[str, dict], key: str) -> dict[str, dict]:
    return {label: r[key] for label, r in results.items() if key in r and 'skipped' not in r[key]}


def _figures(results: Mapping[str, dict], train_counts: list[int], groups: Mapping, out_dir: Path
             ) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    colors = {label: f'C{i % 10}' for i, label in enumerate(results)}   # one colour per checkpoint in every figure
    att = _present(results, 'attention')
    if att:
        figs['attention_distance'] = plots.plot_attention_distance(att, out_dir / 'attention_distance.png', colors)
    rank = _present(results, 'rank')
    if rank:
        figs['feature_rank'] = plots.plot_feature_rank(rank, out_dir / 'feature_rank.png', colors)
        figs['feature_spectrum'] = plots.plot_feature_spectrum(rank, out_dir / 'feature_spectrum.png')
    exp = _present(results, 'expertise')
    if exp:
        figs['expertise'] = plots.plot_expertise(exp, train_counts, groups, out_dir / 'expertise.png')
    geo = _present(results, 'geometry')
    if geo:
        figs['classifier_norms'] = plots.plot_classifier_norms(geo, train_counts, out_dir / 'classifier_norms.png',
                                                               colors)
    cal = _present(results, 'calibration')
    if cal:
        figs['reliability'] = plots.plot_reliability(cal, out_dir / 'reliability.png')
    return figs


def flat_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's headline numbers as flat W&B keys (per checkpoint label)."""
    out: dict[str, float] = {}
    for label, r in report['results'].items():
        exp = r.get('expertise') or {}
        for pred, a in (exp.get('accuracy') or {}).items():
            for k in ('top1', 'head', 'mid', 'tail'):
                out[f'{label}/accuracy/{pred}/{k}'] = a[k]
        for pair, a in (exp.get('agreement') or {}).items():
            for k in ('overall', 'head', 'mid', 'tail'):
                out[f'{label}/agreement/{pair}/{k}'] = a[k]
        for pred, c in (r.get('calibration') or {}).items():
            if isinstance(c, dict) and 'ece' in c:
                out[f'{label}/ece/{pred}'] = c['ece']
        att = r.get('attention') or {}
        for b, heads in enumerate(att.get('distance') or []):
            out[f'{label}/attention_distance/block{b + 1}/mean'] = float(np.mean(heads))
            for h, d in enumerate(heads):
                out[f'{label}/attention_distance/block{b + 1}/head{h}'] = d
        rank = r.get('rank') or {}
        for token, rows in (rank.get('tokens') or {}).items():
            for site, row in zip(rank['sites'], rows):
                key = site.replace(' ', '')
                out[f'{label}/rank/{token}/{key}'] = row['rank']
                out[f'{label}/variance_rank/{token}/{key}'] = row['variance_rank']
        for role, g in (r.get('geometry') or {}).items():
            if isinstance(g, dict) and 'spearman_norm_vs_count' in g:
                out[f'{label}/norm_count_spearman/{role}'] = g['spearman_norm_vs_count']
    return {k: v for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _log_wandb(cfg: AnalysisConfig, out_dir: Path, report: dict, figures: Mapping[str, Path]) -> str | None:
    if cfg.wandb.mode == 'disabled':
        return None
    sources = {label: {k: r['info'][k] for k in ('path', 'kind', 'training_wandb_id')}
               for label, r in report['results'].items()}
    logger = RunLogger(cfg.wandb, out_dir, {**to_dict(cfg), 'sources': sources}, job_type='analysis')
    try:
        scalars = flat_scalars(report)
        logger.log(scalars, step=0)
        logger.log_summary(scalars)
        for name, path in figures.items():
            logger.log_image(f'analysis/{name}', path, step=0)
        return logger.wandb_dir
    finally:
        logger.finish()


def run_analysis(cfg: AnalysisConfig) -> dict[str, Any]:
    """Analyse every checkpoint of `cfg` and write the figures, `analysis.json` and W&B.

    Returns:
        The report (also `<output_dir>/analysis.json`): data and splits, the fixed image set, per checkpoint label
        its info and one entry per analysis, the figure files, device and wall time.
    """
    t0 = time.perf_counter()
    analyses = resolve_analyses(cfg.analyses)
    paths = [resolve_checkpoint(c) for c in cfg.checkpoints]
    if cfg.teacher and cfg.teacher != 'none' and not Path(cfg.teacher).is_file():
        raise CheckpointError(f'teacher checkpoint not found: {cfg.teacher}')
    metas = []
    for p in paths:
        meta = read_model_meta(p)
        if meta is None:
            raise CheckpointError(f'{p} has no deit-lt metadata; analyse model files written by the deit-lt tools')
        if meta.get('kind') == 'ncm':
            raise CheckpointError(f'{p} holds nearest-class-mean centroids, not a network; analyse the checkpoint it '
                                  f'was fitted on instead')
        metas.append(meta)
    labels = list(cfg.labels) if cfg.labels else default_labels(paths)
    if len(set(labels)) != len(labels):
        raise AnalysisError(f'labels must differ: {labels}')
    device = torch.device('cuda' if torch.cuda.is_available() and not cfg.cpu else 'cpu')
    datasets = create_datasets(cfg.data)
    if cfg.split not in datasets:
        raise AnalysisError(f'the data have no {cfg.split!r} split (have {", ".join(datasets)}); set split=test or '
                            f'data.val_per_class=N')
    split = datasets[cfg.split]
    for p, meta in zip(paths, metas):
        if int(meta.get('num_classes') or 0) != split.num_classes:
            raise CheckpointError(f'{p} predicts {meta.get("num_classes")} classes but the data ({cfg.data.name}) have '
                                  f'{split.num_classes}; analyse checkpoints trained on the same data (check data.*)')
    train_counts = datasets['train'].train_counts.tolist()
    groups = split.splits.groups
    idx = probe_indices(len(split), cfg.num_images, cfg.seed)
    probe = subset_dataset(split, idx)
    out_dir = output_dir_of(cfg, paths[0])
    out_dir.mkdir(parents=True, exist_ok=True)

    results, teachers = {}, {}
    for path, label in zip(paths, labels):
        _logger.info('analysing %s (%s)', label, path)
        results[label] = analyse_checkpoint(path, label, cfg, analyses, split, probe, train_counts, device, teachers)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    figures = _figures(results, train_counts, groups, out_dir)
    report = {
        'version': 1, 'analyses': analyses, 'labels': labels,
        'data': {'name': cfg.data.name, 'split': cfg.split, 'num_samples': len(split),
                 'class_names': split.class_names, 'train_counts': train_counts, 'splits': split.splits.as_dict()},
        'probe': {'num_images': len(probe), 'seed': cfg.seed, 'indices_are_whole_split': len(probe) == len(split)},
        'settings': {'rank_rtol': cfg.rank_rtol, 'rank_variance': cfg.rank_variance, 'rank_center': cfg.rank_center,
                     'n_bins': cfg.n_bins, 'batch_size': cfg.batch_size},
        'results': results, 'figures': {k: str(v) for k, v in figures.items()},
        'device': str(device), 'output_dir': str(out_dir), 'wandb': None,
    }
    report['analysis_time_s'] = round(time.perf_counter() - t0, 2)   # data, models, passes, figures; not W&B
    report = _jsonable(report)
    atomic_write_text(out_dir / 'analysis.json', json.dumps(report, indent=1))   # before W&B, which may fail
    report['wandb'] = _log_wandb(cfg, out_dir, report, figures)
    if report['wandb']:
        atomic_write_text(out_dir / 'analysis.json', json.dumps(report, indent=1))
    return report
