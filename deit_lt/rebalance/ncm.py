"""NCM, nearest class mean (Kang et al., ICLR 2020, Sec. 4; official `models/KNNClassifier.py`, `--knn`).

Training features come from the eval transform. The reported variant ('cl2n' + 'l2') centres every feature by the
mean training feature mu and L2-normalises it, f^ = (f - mu) / ||f - mu||; the centroid c_j is the mean of f^ over
class j (not re-normalised) and the logit is the negative squared distance, z_j = -||f^ - c_j||^2. Other variants:
'un' (raw features), 'l2n' (normalised, not centred); 'cos' scores by the cosine of f^ and c_j (the official
'cos' uses the unnormalised dot product <f^, c_j> / d instead).

NCM is not a linear head on the raw features (the normalisation sits in between), so it is saved as its own small
file: the centroids and mu plus metadata naming the source checkpoint and the feature it reads.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, load_model_file, save_model_file
from .base import RebalanceResult
from ..errors import ConfigError
from .config import NCMConfig
from .features import FeatureSet, HeadSpec

__all__ = ['NCMClassifier', 'NCMResult', 'fit', 'save_ncm', 'load_ncm']


class NCMClassifier(nn.Module):
    """(N, d) features -> (N, C) nearest-class-mean logits.

    Args:
        mean: (d,) mean training feature (used by 'cl2n').
        centroids: (C, d) class means of the transformed training features.
        feat_type: 'un', 'l2n' or 'cl2n'.
        dist: 'l2' (negative squared Euclidean distance) or 'cos' (cosine similarity).
    """

    def __init__(self, mean: torch.Tensor, centroids: torch.Tensor, feat_type: str = 'cl2n', dist: str = 'l2'):
        super().__init__()
        if feat_type not in ('un', 'l2n', 'cl2n') or dist not in ('l2', 'cos'):
            raise ConfigError(f'NCM variant {feat_type!r}/{dist!r} unknown: feat_type un|l2n|cl2n, dist l2|cos')
        self.register_buffer('mean', mean.float())
        self.register_buffer('centroids', centroids.float())
        self.feat_type = feat_type
        self.dist = dist

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.feat_type == 'cl2n':
            x = x - self.mean
        if self.feat_type in ('l2n', 'cl2n'):
            x = F.normalize(x, dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x.float())
        c = self.centroids
        if self.dist == 'cos':
            return F.normalize(x, dim=1) @ F.normalize(c, dim=1).T
        # -||x - c||^2 expanded: one matrix product instead of an (N, C, d) difference tensor
        return -(x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1))

    @classmethod
    def from_features(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, feat_type: str = 'cl2n',
                      dist: str = 'l2') -> 'NCMClassifier':
        """Class means of (N, d) training features `x` with labels (N,) `y`; every class needs a sample."""
        counts = torch.bincount(y, minlength=num_classes)
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten()[:10].tolist()
            raise ConfigError(f'NCM: classes without training samples: {missing}')
        x = x.float()
        model = cls(x.mean(0), torch.zeros(num_classes, x.shape[1], device=x.device), feat_type, dist)
        f = model.transform(x)
        sums = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, y, f)
        model.centroids.copy_(sums / counts[:, None].to(f.dtype))
        return model


class NCMResult(RebalanceResult):
    """NCM classifiers by feature name ('cls', 'dist', 'concat' or 'feat'); predictors are the feature names."""

    def __init__(self, classifiers: dict[str, NCMClassifier], info: dict[str, Any]):
        self.method = 'ncm'
        self.classifiers = {k: c.cpu() for k, c in classifiers.items()}
        self.info = info

    def logits(self, feats: FeatureSet) -> dict[str, torch.Tensor]:
        out = {}
        for name, clf in self.classifiers.items():
            x = feats.feature(name)
            with torch.no_grad():
                out[name] = clf.to(x.device)(x)
        return out


def fit(train: FeatureSet, heads: list[HeadSpec], cfg: NCMConfig, *, val: FeatureSet | None = None,
        groups: dict[str, list[int]] | None = None, device: torch.device | str = 'cpu', seed: int = 0
        ) -> NCMResult:
    """Class means of the training features, for each feature in `cfg.features` (all available by default).

    Args:
        train: training features (eval transform) and labels.
        heads: the model's heads (only their class count is used).
        cfg: the `ncm` config section.
        val, groups, seed: unused (same signature as the other methods).
        device: where to compute.

    Returns:
        NCMResult with one classifier per feature.
    """
    names = cfg.features or train.feature_choices()
    bad = [n for n in names if n not in train.feature_choices()]
    if bad:
        raise ConfigError(f'ncm.features: {bad[0]!r} is not a feature of this model; choose from '
                             f'{", ".join(train.feature_choices())}')
    num_classes = heads[0].num_classes
    y = train.targets.to(device)
    classifiers = {n: NCMClassifier.from_features(train.feature(n).to(device), y, num_classes, cfg.feat_type,
                                                  cfg.dist) for n in names}
    info = {'features': list(names), 'feat_type': cfg.feat_type, 'dist': cfg.dist}
    return NCMResult(classifiers, info)


def save_ncm(path: str | os.PathLike, clf: NCMClassifier, feature: str, meta: dict[str, Any]) -> Path:
    """Write centroids + mean with metadata (kind 'ncm', feature, variant, plus `meta`) as a safetensors file."""
    record = dict(meta, kind='ncm', feature=feature, feat_type=clf.feat_type, dist=clf.dist,
                  num_classes=int(clf.centroids.shape[0]), feature_dim=int(clf.centroids.shape[1]))
    return save_model_file(path, {'mean': clf.mean, 'centroids': clf.centroids}, record)


def load_ncm(path: str | os.PathLike) -> tuple[NCMClassifier, dict[str, Any]]:
    """Read an NCM file written by `save_ncm`: (classifier, metadata)."""
    sd, meta = load_model_file(path)
    if not meta or meta.get('kind') != 'ncm':
        raise CheckpointError(f'{path} is not an NCM file (kind={None if not meta else meta.get("kind")!r})')
    if set(sd) != {'mean', 'centroids'}:
        raise CheckpointError(f'{path}: expected tensors mean and centroids, found {sorted(sd)}')
    return NCMClassifier(sd['mean'], sd['centroids'], meta['feat_type'], meta['dist']), meta
