"""Run Decoupling's classifier re-balancing on a deit-lt checkpoint: the library behind tools/rebalance.py.

Order of work (every check that can fail runs before the first forward pass):
1. methods and config values (unknown method, empty tau grid, bad epochs / batch sizes, W&B online without
   credentials);
2. the model and its heads (tau-norm and LWS need nn.Linear heads; cRT and NCM only need features);
3. the data, rebuilt from the checkpoint's own data config plus overrides (class count must match the model;
   tau-norm needs a val split);
4. features of train / val / test, extracted once (eval mode, no_grad, eval transform) and cached on disk under
   `<output_dir>/features/`, keyed by the checkpoint file and the split, so later runs and methods reuse them;
5. each method fitted on the cached features and evaluated (val and test, per predictor, head/mid/tail);
6. outputs: `report.json`, `weight_norms.png`, `tau_sweep.{json,png}`, one model file per linear method
   (`<method>.safetensors`, kind 'rebalanced', rebuildable by `create_model_from_checkpoint`), `ncm_<feature>
   .safetensors`, the resolved `config.yaml`; W&B when enabled.

The report also says where the checkpoint comes from (`source`: its run's name and whether that run finished,
read from the run's report.json beside the model file, else from the file's metadata), the wall time, git commit,
machine and library versions, so `tools/collect_results.py` can file it like a training run.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import CheckpointError, atomic_write_text, save_model_file
from ..config import save_config, to_dict
from ..data.lt_datasets import create_datasets
from ..data.pipeline import create_eval_batches
from ..data.samplers import SAMPLER_NAMES
from ..models.factory import (create_model_from_checkpoint, create_model_from_meta, load_state_dict_checked,
                              unwrap_model)
from ..runtime import run_provenance
from ..tracking import check_wandb
from . import crt, lws, ncm, tau_norm
from .base import LinearResult, RebalanceResult, joint_logits, linear_head, select_heads
from ..errors import ConfigError
from .config import RebalanceConfig, default_output_dir, resolve_methods
from .features import FeatureSet, HeadSpec, cache_key, load_or_extract, model_heads
from .report import evaluate_predictors, log_to_wandb, plot_tau_sweep, plot_weight_norms
from .training import steps_per_epoch

__all__ = ['METHODS', 'run_rebalance', 'save_rebalanced_model', 'output_dir_of', 'source_run']

_logger = logging.getLogger(__name__)

# Every method: fit(train, heads, cfg_section, *, val, groups, device, seed) -> RebalanceResult
METHODS: dict[str, Callable[..., RebalanceResult]] = {
    'crt': crt.fit, 'tau_norm': tau_norm.fit, 'lws': lws.fit, 'ncm': ncm.fit,
}


def output_dir_of(cfg: RebalanceConfig) -> Path:
    return Path(cfg.runtime.output_dir) if cfg.runtime.output_dir else default_output_dir(cfg.checkpoint)


def _check_config(cfg: RebalanceConfig, methods: list[str]) -> None:
    if not cfg.checkpoint:
        raise ConfigError('no checkpoint given: pass --checkpoint path/to/model.safetensors')
    if 'tau_norm' in methods and not cfg.tau_norm.grid:
        raise ConfigError('tau_norm.grid is empty; give values, e.g. tau_norm.grid=[0.0,0.5,1.0]')
    for name in ('crt', 'lws'):
        if name not in methods:
            continue
        sec = getattr(cfg, name)
        for field in ('epochs', 'batch_size', 'lr_base_batch', 'samples_per_class'):
            if getattr(sec, field) < 1:
                raise ConfigError(f'{name}.{field} must be >= 1, got {getattr(sec, field)}')
        if sec.sampler not in SAMPLER_NAMES:
            raise ConfigError(f'{name}.sampler {sec.sampler!r} unknown')
        if sec.lr <= 0:
            raise ConfigError(f'{name}.lr must be > 0, got {sec.lr}')


def _check_heads(heads: list[HeadSpec], methods: list[str], cfg: RebalanceConfig) -> None:
    """Head requirements of each method, checked on the model before any feature is computed."""
    if 'crt' in methods:
        kept = [h for h in heads if h not in select_heads(heads, cfg.crt.heads, 'crt.heads')]
        for h in kept:
            if not h.is_linear:
                raise ConfigError(f'crt keeps head {h.name!r} unchanged, but it is not nn.Linear; '
                                     f're-train it too (crt.heads=null)')
    for name in ('tau_norm', 'lws'):
        if name in methods:
            for h in select_heads(heads, getattr(cfg, name).heads, f'{name}.heads'):
                if not h.is_linear:
                    raise ConfigError(
                        f'{name} rescales the stage-1 linear classifier, but head {h.module_name!r} is a '
                        f'{type(h.module).__name__}, not nn.Linear (a cosine/LDAM head?). Use crt or ncm, which '
                        f'only need the features.')
    if 'tau_norm' in methods and cfg.tau_norm.select == 'avg':
        selected = {h.name for h in select_heads(heads, cfg.tau_norm.heads, 'tau_norm.heads')}
        if selected != {'cls', 'dist'}:
            raise ConfigError('tau_norm.select=avg needs a distilled student with both heads selected; '
                                 'use tau_norm.select=per_head')
    if 'ncm' in methods and cfg.ncm.features:
        choices = ['cls', 'dist', 'concat'] if {h.name for h in heads} == {'cls', 'dist'} else ['feat']
        bad = [f for f in cfg.ncm.features if f not in choices]
        if bad:
            raise ConfigError(f'ncm.features: {bad[0]!r} is not a feature of this model; choose from '
                                 f'{", ".join(choices)}')


def _check_data(datasets: dict, meta: dict, heads: list[HeadSpec], methods: list[str], cfg: RebalanceConfig
                ) -> list[str]:
    """Class count, val split and batch sizes against the data; returns warnings for the report."""
    train = datasets['train']
    c_model = int(meta.get('num_classes') or heads[0].num_classes)
    if train.num_classes != c_model:
        raise ConfigError(f'the dataset {cfg.data.name!r} has {train.num_classes} classes but the checkpoint '
                             f'predicts {c_model}; re-balance on the data the model was trained on (check data.*)')
    if 'tau_norm' in methods and 'val' not in datasets:
        raise ConfigError('tau_norm chooses tau on a validation split and this dataset has none: set '
                             'data.val_per_class=N (a balanced hold-out of training-distribution images the '
                             'long-tailed subset did not use) or give data.val_list')
    for name in ('crt', 'lws'):
        if name in methods:
            steps_per_epoch(len(train), getattr(cfg, name).batch_size, name)
    warnings = []
    trained = meta.get('train_counts')
    if trained is not None and list(trained) != train.class_counts.tolist():
        warnings.append(f'the training split here ({len(train)} images) differs from the one the checkpoint was '
                        f'trained on ({sum(trained)} images): data.* differs from its training config (e.g. '
                        f'val_per_class took images from the training split), so val images may have been seen '
                        f'in training')
    for w in warnings:
        _logger.warning(w)
    return warnings


def _autocast(mixed_precision: str, device: torch.device) -> tuple[Callable | None, str]:
    mp = mixed_precision
    if mp == 'auto':
        mp = 'bf16' if device.type == 'cuda' else 'no'
    if mp == 'no':
        return None, 'fp32'
    dtype = torch.bfloat16 if mp == 'bf16' else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), mp


def _img_size(model: torch.nn.Module, meta: dict) -> int:
    size = meta.get('img_size')
    if size:
        return int(size if isinstance(size, int) else size[-1])
    return int(unwrap_model(model).pretrained_cfg['input_size'][-1])


def _weight_norms(heads: dict[str, Any]) -> dict[str, list[float]]:
    return {name: w.norm(dim=1).tolist() for name, w in heads.items()}


def save_rebalanced_model(path: str | Path, model: torch.nn.Module, meta: dict, heads: list[HeadSpec],
                          result: LinearResult, extra_meta: dict) -> Path:
    """Write the model with its heads replaced by `result`'s linear heads as a deit-lt model file.

    The file keeps the source's arch and model_kwargs (a cosine head replaced by cRT's linear one switches
    `use_norm` off), and is rebuilt and strictly loaded before it is written, so `create_model_from_checkpoint`
    is known to accept it. A dropped bias (tau-norm) is stored as zeros.

    Raises:
        ConfigError: the architecture cannot hold the new heads.
    """
    state = {k: v.detach().cpu().clone() for k, v in unwrap_model(model).state_dict().items()}
    new_meta = dict(copy.deepcopy(meta), kind='rebalanced', **copy.deepcopy(extra_meta))
    specs = {h.name: h for h in heads}
    for name, head in result.heads.items():
        spec = specs[name]
        prefix = head.module_name + '.'
        if not spec.is_linear:
            kwargs = dict(new_meta.get('model_kwargs') or {})
            if kwargs.get('head_type') in ('normed', 'cosnorm'):    # the APA CIFAR ResNets' head switch
                kwargs.update(head_type='linear', use_norm=False)
            elif kwargs.get('use_norm'):
                kwargs['use_norm'] = False   # the cosine-head teachers' switch to a plain linear head
            else:
                raise ConfigError(f'head {spec.module_name!r} is a {type(spec.module).__name__}; the '
                                  f'architecture has no linear-head variant to save the new head in')
            new_meta['model_kwargs'] = kwargs
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state[prefix + 'weight'] = head.weight.clone()
        state[prefix + 'bias'] = (head.bias if head.bias is not None else torch.zeros(head.weight.shape[0])).clone()
    try:
        rebuilt = create_model_from_meta(new_meta)
        own = rebuilt.state_dict()
        for head in result.heads.values():
            key = head.module_name + '.bias'
            if key not in own:   # a bias-free head can only take a zero (dropped) bias
                if head.bias is not None and bool(head.bias.ne(0).any()):
                    raise ConfigError(f'head {head.module_name!r} has no bias to hold the re-balanced one')
                state.pop(key, None)
        load_state_dict_checked(rebuilt, state, f're-balanced {result.method} weights')
    except CheckpointError as e:
        raise ConfigError(f'cannot save {result.method} as a {meta.get("arch")} model file: {e}') from None
    return save_model_file(path, state, new_meta)


def source_run(checkpoint: str | Path, meta: dict) -> dict[str, Any]:
    """The run a model file comes from: its name, which file (best / last, epoch) and whether the run finished.

    The run's own report.json beside the file decides (a best.safetensors of a run stopped early is from an
    unfinished run too); without one (a copied or released file) the file's metadata says what it can: `finished`
    is recorded in last.safetensors only, else None (unknown).
    """
    config = meta.get('config') if isinstance(meta.get('config'), dict) else {}
    out: dict[str, Any] = {'name': config.get('name'), 'file': meta.get('checkpoint'), 'epoch': meta.get('epoch'),
                           'finished': meta.get('finished'), 'progress': None, 'stopped_by': None, 'report': None}
    path = Path(checkpoint).parent / 'report.json'
    try:
        run = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        run = None
    # only a report of the same run: an output folder may hold a report of another run next to a copied file
    if isinstance(run, dict) and 'finished' in run and out['name'] in (None, run.get('name')):
        out.update(name=run.get('name') or out['name'], finished=run['finished'], progress=run.get('progress'),
                   stopped_by=run.get('stopped_by'), report=str(path))
    return out


def _summary(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {p: {k: r[k] for k in ('top1', 'top5', 'head', 'mid', 'tail')} for p, r in metrics.items()}


def _features(cfg: RebalanceConfig, model: torch.nn.Module, meta: dict, datasets: dict, out_dir: Path,
              device: torch.device) -> tuple[dict[str, FeatureSet], dict[str, dict], dict]:
    """Every split's features, from the cache when its key matches; returns (features, file record, data key)."""
    autocast, precision = _autocast(cfg.runtime.mixed_precision, device)
    img_size = _img_size(model, meta)
    aug = cfg.aug
    data_key = {k: v for k, v in to_dict(cfg.data).items() if k not in ('cache_dir', 'in_memory_max_mb')}
    feats, files = {}, {}
    for split, ds in datasets.items():
        key = cache_key(cfg.checkpoint, split, data=data_key, img_size=img_size, crop_pct=aug.eval_crop_pct,
                        interpolation=aug.interpolation, mean=list(aug.mean), std=list(aug.std), precision=precision)

        def make_batches(ds=ds):
            return create_eval_batches(ds, aug, img_size=img_size, batch_size=cfg.runtime.eval_batch_size,
                                       device=device, crop_pct=aug.eval_crop_pct)

        feats[split], path, cached = load_or_extract(
            model, make_batches, torch.from_numpy(ds.targets), key=key,
            cache_dir=out_dir / 'features' if cfg.features.cache else None, autocast=autocast,
            show_progress=cfg.runtime.progress)
        files[split] = {'path': str(path) if path else None, 'from_cache': cached}
    return feats, files, data_key


def _run_method(method: str, cfg: RebalanceConfig, model: torch.nn.Module, meta: dict, heads: list[HeadSpec],
                feats: dict[str, FeatureSet], groups: dict, train_counts: list[int], out_dir: Path,
                device: torch.device) -> tuple[dict[str, Any], RebalanceResult, dict[str, Path]]:
    """Fit one method, evaluate it on val/test, write its files; returns (report entry, result, images)."""
    eval_splits = [s for s in ('val', 'test') if s in feats]
    result = METHODS[method](feats['train'], heads, getattr(cfg, method), val=feats.get('val'), groups=groups,
                             device=device, seed=cfg.runtime.seed)
    entry: dict[str, Any] = {s: evaluate_predictors(result.logits(feats[s].to(device)), feats[s].targets, groups)
                             for s in eval_splits}
    entry['info'] = result.info
    entry['config'] = to_dict(getattr(cfg, method))
    images = {}
    if method == 'tau_norm':
        info = result.info
        stage1 = {h.name: linear_head(h, 'tau_norm') for h in heads if h.name in info['tau']}
        test_sweep = tau_norm.sweep(stage1, feats['test'].to(device), info['grid'], info['bias'], groups)
        record = {'grid': info['grid'], 'bias': info['bias'], 'tau': info['tau'], 'select': info['select'],
                  'val': info['val_sweep'], 'test': test_sweep}
        atomic_write_text(out_dir / 'tau_sweep.json', json.dumps(record, indent=1))
        images['tau_sweep'] = plot_tau_sweep(out_dir / 'tau_sweep.png', info['val_sweep'], test_sweep, info['tau'],
                                             info['grid'])
        entry['sweep_file'] = str(out_dir / 'tau_sweep.json')
    if not cfg.save_models:
        return entry, result, images
    if isinstance(result, LinearResult):
        extra = {'metrics': {s: _summary(entry[s]) for s in eval_splits},
                 'rebalance': {'method': method, 'source_checkpoint': str(cfg.checkpoint),
                               'source_kind': meta.get('kind'), 'info': _compact_info(result.info),
                               'config': to_dict(cfg)}}
        try:
            entry['model_file'] = str(save_rebalanced_model(out_dir / f'{method}.safetensors', model, meta, heads,
                                                            result, extra))
        except ConfigError as e:
            _logger.warning('%s not saved: %s', method, e)
            entry['model_file'], entry['not_saved'] = None, str(e)
    elif isinstance(result, ncm.NCMResult):
        entry['files'] = {}
        for feature, clf in result.classifiers.items():
            ncm_meta = {'source_checkpoint': str(cfg.checkpoint), 'source_arch': meta.get('arch'),
                        'class_names': meta.get('class_names'), 'train_counts': list(train_counts),
                        'metrics': {s: _summary({feature: entry[s][feature]}) for s in eval_splits}}
            entry['files'][feature] = str(ncm.save_ncm(out_dir / f'ncm_{feature}.safetensors', clf, feature,
                                                       ncm_meta))
    return entry, result, images


def run_rebalance(cfg: RebalanceConfig) -> dict[str, Any]:
    """Re-balance the classifier of `cfg.checkpoint` with every method in `cfg.methods`.

    Returns:
        The report (also written to `<output_dir>/report.json`): checkpoint, data and class splits, the joint
        model's and every method's val/test metrics per predictor, what each method chose, output files.
    """
    t0 = time.time()
    methods = resolve_methods(cfg.methods)
    _check_config(cfg, methods)
    check_wandb(cfg.wandb)   # W&B logs at the end: online without credentials fails now, not after the work
    device = torch.device('cuda' if torch.cuda.is_available() and not cfg.runtime.cpu else 'cpu')
    model, meta = create_model_from_checkpoint(cfg.checkpoint, device)
    heads = model_heads(model)
    _check_heads(heads, methods, cfg)
    datasets = create_datasets(cfg.data)
    warnings = _check_data(datasets, meta, heads, methods, cfg)

    out_dir = output_dir_of(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / 'config.yaml')
    feats, feature_files, data_key = _features(cfg, model, meta, datasets, out_dir, device)
    train_ds = datasets['train']
    groups = train_ds.splits.groups
    counts = train_ds.class_counts.tolist()
    report: dict[str, Any] = {
        'checkpoint': str(cfg.checkpoint), 'arch': meta.get('arch'), 'kind': meta.get('kind'),
        'source': source_run(cfg.checkpoint, meta),
        'dataset': {'name': cfg.data.name, 'imb_factor': cfg.data.imb_factor,
                    'sizes': {s: len(d) for s, d in datasets.items()}},
        'splits': train_ds.splits.as_dict(), 'train_counts': counts, 'heads': [h.name for h in heads],
        'features': feature_files, 'warnings': warnings, 'selection_metric': 'val mean per-class accuracy',
        'joint': {s: evaluate_predictors(joint_logits(heads, feats[s]), feats[s].targets, groups)
                  for s in ('val', 'test') if s in feats},
        'methods': {},
    }
    norms = {'joint': {h.name: h.module.weight.detach().float().norm(dim=1).cpu().numpy()
                       for h in heads if h.is_linear}}
    images: dict[str, Path] = {}
    for method in methods:
        _logger.info('fitting %s', method)
        entry, result, method_images = _run_method(method, cfg, model, meta, heads, feats, groups, counts, out_dir,
                                                   device)
        report['methods'][method] = entry
        images.update(method_images)
        if isinstance(result, LinearResult):
            norms[method] = {name: h.weight.norm(dim=1).numpy() for name, h in result.heads.items()}
    identity = {'checkpoint': cache_key(cfg.checkpoint, ''), 'data': data_key}
    _merge_previous(report, norms, out_dir / 'report.json', identity, methods)
    report['identity'] = identity
    if any(norms.values()):
        images['weight_norms'] = plot_weight_norms(out_dir / 'weight_norms.png', counts, norms)
    report['weight_norms'] = {label: {h: [round(float(v), 6) for v in n] for h, n in per.items()}
                              for label, per in norms.items()}
    report['images'] = {k: str(v) for k, v in images.items()}
    report['output_dir'] = str(out_dir)
    report['wall_time_s'] = round(time.time() - t0, 1)
    report.update(run_provenance())
    report['wandb'] = None
    atomic_write_text(out_dir / 'report.json', json.dumps(report, indent=1))   # before W&B, which may fail
    report['wandb'] = log_to_wandb(cfg.wandb, out_dir, to_dict(cfg), report, images)
    if report['wandb']:
        atomic_write_text(out_dir / 'report.json', json.dumps(report, indent=1))
    return report


def _merge_previous(report: dict, norms: dict, path: Path, identity: dict, methods: list[str]) -> None:
    """Keep the results of methods that an earlier run in the same output folder fitted on the same checkpoint and
    data but this run did not (e.g. `--method crt` then `--method lws`); each entry carries its own config."""
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        return
    if previous.get('identity') != json.loads(json.dumps(identity)):
        return
    kept = {m: e for m, e in previous.get('methods', {}).items() if m not in methods}
    merged = {**kept, **report['methods']}
    report['methods'] = {m: merged[m] for m in METHODS if m in merged}   # fixed method order
    for m in kept:
        if m in previous.get('weight_norms', {}):
            norms[m] = {h: np.asarray(v) for h, v in previous['weight_norms'][m].items()}
    if kept:
        _logger.info('report keeps earlier results of %s from %s', ', '.join(kept), path)


def _compact_info(info: dict[str, Any]) -> dict[str, Any]:
    """The fit record without the bulky parts (per-epoch history, sweeps) for a model file's metadata."""
    return {k: v for k, v in info.items() if k not in ('history', 'val_sweep')}
