"""Frozen-backbone features for classifier re-balancing: which heads a model has, what they read, and a disk cache.

Decoupling's second stage never changes the representation, so the backbone runs once per split (eval mode, no
gradients, eval transform) and every method works on the cached features. For a distilled DeiT student the two
heads read different tokens of the final-norm output: `head` the CLS token (`forward_features(x)[:, 0]`),
`head_dist` the DIST token (`[:, 1]`); timm's own `forward_head(pre_logits=True)` would average them, which is no
head's input, so the tokens are taken directly. Single-head models (plain ViTs, timm-style CNN teachers) give
`forward_head(forward_features(x), pre_logits=True)`, the exact input of `get_classifier()`.

ViTs have no BatchNorm, so running the frozen backbone in eval mode loses nothing; for CNN teachers this departs
from the official cRT/LWS code, which leaves the frozen backbone in train mode and so re-estimates BatchNorm
statistics on class-balanced batches (facebookresearch/classifier-balancing `run_networks.py` puts every
network in train mode, frozen or not).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import ConfigError
from ..models.factory import is_distilled, unwrap_model
from ..progress import Progress

__all__ = ['HeadSpec', 'FeatureSet', 'model_heads', 'extract_features', 'cache_key',
           'load_or_extract']

_logger = logging.getLogger(__name__)
_CACHE_VERSION = 1


@dataclasses.dataclass
class HeadSpec:
    """One classifier head of a model.

    Attributes:
        name: predictor name: 'cls' / 'dist' for distilled students, 'logits' for single-head models (the names
            `deit_lt.eval` reports under).
        feature: the `FeatureSet` entry the head reads ('cls', 'dist' or 'feat').
        module_name: the head's qualified name in the model (its state-dict prefix), e.g. 'head_dist' or 'fc'.
        module: the head itself (any module mapping (N, d) features to (N, C) logits).
        num_classes: C.
    """
    name: str
    feature: str
    module_name: str
    module: nn.Module
    num_classes: int

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    def logits(self, feats: 'FeatureSet') -> torch.Tensor:
        """(N, C) logits of the unchanged head on cached features."""
        mod = self.module
        x = feats.features[self.feature]
        p = next(mod.parameters(), None)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            return mod(x).float()


@dataclasses.dataclass
class FeatureSet:
    """Cached features of one split.

    Attributes:
        features: name -> (N, d) float32 ('cls' and 'dist' for distilled students, 'feat' otherwise).
        targets: (N,) int64 labels.
    """
    features: dict[str, torch.Tensor]
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def names(self) -> list[str]:
        return list(self.features)

    def feature(self, name: str) -> torch.Tensor:
        """A stored feature, or 'concat' = [cls, dist] along the feature axis (N, 2d)."""
        if name == 'concat' and 'concat' not in self.features:
            if not {'cls', 'dist'} <= set(self.features):
                raise ConfigError("the 'concat' feature needs a distilled student (CLS and DIST tokens)")
            return torch.cat([self.features['cls'], self.features['dist']], dim=1)
        if name not in self.features:
            raise ConfigError(f'no feature {name!r}; this model has {", ".join(self.feature_choices())}')
        return self.features[name]

    def feature_choices(self) -> list[str]:
        return self.names + (['concat'] if {'cls', 'dist'} <= set(self.features) else [])

    def to(self, device: torch.device | str) -> 'FeatureSet':
        return FeatureSet({k: v.to(device) for k, v in self.features.items()}, self.targets.to(device))

    def subset(self, idx: torch.Tensor) -> 'FeatureSet':
        return FeatureSet({k: v[idx] for k, v in self.features.items()}, self.targets[idx])


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ConfigError('the classifier returned by get_classifier() is not a submodule of the model')


def model_heads(model: nn.Module) -> list[HeadSpec]:
    """The classifier heads of a distilled student (CLS, DIST) or of a single-head timm-style model.

    Raises:
        ConfigError: the model has neither a DIST head nor timm's `forward_features` / `forward_head` /
            `get_classifier` interface, or its classifier is missing (num_classes=0).
    """
    m = unwrap_model(model)
    if is_distilled(m):
        c = int(m.num_classes)
        return [HeadSpec('cls', 'cls', 'head', m.head, c), HeadSpec('dist', 'dist', 'head_dist', m.head_dist, c)]
    missing = [a for a in ('forward_features', 'forward_head', 'get_classifier') if not hasattr(m, a)]
    if missing:
        raise ConfigError(f'{type(m).__name__} lacks {", ".join(missing)}: re-balancing needs a timm-style model '
                             f'(forward_features, forward_head(x, pre_logits=True), get_classifier())')
    clf = m.get_classifier()
    if isinstance(clf, (tuple, list)):
        raise ConfigError(f'{type(m).__name__}.get_classifier() returns {len(clf)} heads; only the distilled '
                             f'student layout (head, head_dist) is known')
    if isinstance(clf, nn.Identity):
        raise ConfigError(f'{type(m).__name__} has no classifier (num_classes=0?)')
    num_classes = getattr(m, 'num_classes', None) or getattr(clf, 'out_features', None)
    if not num_classes:
        raise ConfigError(f'{type(m).__name__} does not say how many classes it predicts (no num_classes)')
    return [HeadSpec('logits', 'feat', _qualified_name(m, clf), clf, int(num_classes))]


def _forward_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if is_distilled(model):
        tokens = model.forward_features(x)
        return {'cls': tokens[:, 0], 'dist': tokens[:, 1]}
    return {'feat': model.forward_head(model.forward_features(x), pre_logits=True)}


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                     autocast: Callable[[], ContextManager] | None = None, num_samples: int | None = None,
                     desc: str = 'features', show_progress: bool = False) -> FeatureSet:
    """Run the frozen backbone over `batches` in eval mode and keep the head inputs on the CPU.

    Args:
        model: a distilled student or a timm-style single-head model.
        batches: (x (B, C, H, W) normalised, y (B,)) in dataset order.
        autocast: optional context factory for mixed precision; features are stored as float32 either way.
        num_samples: keep only the first N samples (sharded eval batches pad their last shard).
        desc: what the progress display calls this pass, e.g. 'features train'.
        show_progress: a progress bar on a terminal, a plain line at most every 10 s otherwise
            (`deit_lt.progress.Progress`); needs `len(batches)`.

    Returns:
        FeatureSet with (N, d) float32 features and (N,) int64 targets.
    """
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext
    parts: dict[str, list[torch.Tensor]] = {}
    targets = []
    total = len(batches) if show_progress and hasattr(batches, '__len__') else 0
    try:
        with Progress(total, desc, unit='batch', enabled=total > 0) as progress:
            for x, y in batches:
                with ctx():
                    out = _forward_features(model, x)
                for k, v in out.items():
                    parts.setdefault(k, []).append(v.float().cpu())   # the copy syncs the device once per batch
                targets.append(y.cpu())
                progress.update()
    finally:
        model.train(was_training)
    if not targets:
        raise ConfigError('no batches to extract features from (empty split?)')
    feats = {k: torch.cat(v)[:num_samples] for k, v in parts.items()}
    return FeatureSet(feats, torch.cat(targets).long()[:num_samples])


def cache_key(checkpoint: str | os.PathLike, split: str, **extra: Any) -> dict[str, Any]:
    """What identifies a split's features: the checkpoint file (path, size, modification time), the split and
    whatever else shapes the inputs (data config, eval transform, precision)."""
    p = Path(checkpoint).resolve()
    st = p.stat()
    return {'version': _CACHE_VERSION, 'checkpoint': str(p), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns,
            'split': split, **extra}


def _key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_cache(path: Path, key: Mapping[str, Any], targets: torch.Tensor) -> FeatureSet | None:
    try:
        with safe_open(str(path), framework='pt') as f:
            stored = json.loads((f.metadata() or {}).get('key', 'null'))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        _logger.warning('feature cache %s unreadable (%s); extracting again', path, e)
        return None
    if stored != json.loads(json.dumps(key, default=str)):
        return None
    cached_targets = tensors.pop('targets', None)
    if cached_targets is None or not torch.equal(cached_targets, targets):
        _logger.warning('feature cache %s does not match the split labels; extracting again', path)
        return None
    return FeatureSet(tensors, cached_targets)


def load_or_extract(model: nn.Module, make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                    targets: torch.Tensor, *, key: Mapping[str, Any], cache_dir: str | os.PathLike | None,
                    autocast: Callable[[], ContextManager] | None = None, show_progress: bool = False
                    ) -> tuple[FeatureSet, Path | None, bool]:
    """The split's features from `cache_dir` when a file with the same key exists, else extracted (and stored).

    Args:
        model: the frozen model.
        make_batches: builds the split's eval batches (only called when extraction is needed).
        targets: (N,) the split's labels, checked against the cache (a stale file is never used).
        key: `cache_key(...)`; its digest names the file `<split>-<digest>.safetensors`.
        cache_dir: folder of the cache, or None to always extract.
        autocast: mixed-precision context factory for the extraction.
        show_progress: show the extraction's progress (`extract_features`).

    Returns:
        (features, cache file or None, whether it came from the cache).
    """
    targets = torch.as_tensor(targets).long()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f'{key["split"]}-{_key_digest(key)}.safetensors'
        if path.is_file():
            feats = _read_cache(path, key, targets)
            if feats is not None:
                _logger.info('features of %s: loaded from %s', key['split'], path)
                return feats, path, True
    _logger.info('features of %s: extracting (%d images)', key['split'], len(targets))
    feats = extract_features(model, make_batches(), autocast=autocast, num_samples=len(targets),
                             desc=f'features {key["split"]}', show_progress=show_progress)
    if not torch.equal(feats.targets, targets):
        raise ConfigError(f'the {key["split"]} batches are not in dataset order (labels differ); '
                             f'features would be misaligned')
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
        tensors = {k: v.contiguous() for k, v in feats.features.items()}
        tensors['targets'] = feats.targets.contiguous()
        save_file(tensors, str(tmp), metadata={'key': json.dumps(key, default=str)})
        os.replace(tmp, path)
        _logger.info('features of %s: extracted, cached in %s', key['split'], path)
    return feats, path, False
