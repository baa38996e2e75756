"""Clustering metrics after Hungarian matching, as P²OT reports them, and a k-means baseline.

Follows rhfeiyang/PPOT@bd6721c4b5f6581ae5cd896eba9cc9250c769997 utils/evaluate_utils.py:68-135:

- clusters are matched one-to-one to classes maximising the number of correctly assigned samples
  (`scipy.optimize.linear_sum_assignment`);
- ACC is the **mean per-class recall** after matching (balanced accuracy, over classes present in the targets), the
  headline number of imbalanced clustering; the overall (sample-weighted) accuracy is reported next to it but is
  inflated by head classes;
- NMI (arithmetic normalisation) and ARI are scikit-learn's, on the raw cluster ids;
- F1 is the macro F1 of the matched predictions over the labels present in targets or matched predictions;
- head / mid / tail accuracy is the mean class recall inside each class group (`frequency_groups` gives PPOT's
  first 30% / middle 40% / last 30% of frequency-sorted classes; any deit_lt `ClassSplits.groups` works).

All percentages. Unlike the official code (square matching only) more clusters than classes are allowed: surplus
clusters stay unmatched, and their samples count as errors.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from deit_lt.metrics import split_accuracy

__all__ = ['hungarian_match', 'remap_clusters', 'cluster_metrics', 'frequency_groups', 'kmeans_clusters']

UNMATCHED = -1  # label given to samples of clusters without a class


def _as_int_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f'expected a 1-d array of ids, got shape {x.shape}')
    if x.size and (x.min() < 0 or not np.issubdtype(x.dtype, np.integer)):
        raise ValueError('ids must be non-negative integers')
    return x.astype(np.int64)


def hungarian_match(preds, targets, num_clusters: int | None = None,
                    num_classes: int | None = None) -> np.ndarray:
    """One-to-one cluster -> class matching maximising the number of correct samples.

    Args:
        preds: (N,) cluster ids in [0, num_clusters).
        targets: (N,) class ids in [0, num_classes).
        num_clusters: default max(preds) + 1 (pass it to account for empty clusters).
        num_classes: default max(targets) + 1.

    Returns:
        (num_clusters,) int64 array: the class of each cluster, `UNMATCHED` (-1) for clusters left over when there
        are more clusters than classes.
    """
    preds, targets = _as_int_array(preds), _as_int_array(targets)
    if preds.shape != targets.shape:
        raise ValueError(f'preds {preds.shape} and targets {targets.shape} differ')
    kc = int(num_clusters) if num_clusters is not None else int(preds.max(initial=-1)) + 1
    kt = int(num_classes) if num_classes is not None else int(targets.max(initial=-1)) + 1
    if preds.size and (preds.max() >= kc or targets.max() >= kt):
        raise ValueError('an id exceeds num_clusters or num_classes')
    # scipy and scikit-learn are imported where used: they take seconds to load and the OT code never needs them
    from scipy.optimize import linear_sum_assignment

    counts = np.zeros((kc, kt), dtype=np.int64)
    np.add.at(counts, (preds, targets), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(kc, UNMATCHED, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def remap_clusters(preds, mapping: np.ndarray) -> np.ndarray:
    """(N,) cluster ids -> matched class ids (`UNMATCHED` for unmatched clusters)."""
    return np.asarray(mapping)[_as_int_array(preds)]


def cluster_metrics(preds, targets, groups: Mapping[str, Sequence[int]] | None = None,
                    num_clusters: int | None = None, num_classes: int | None = None) -> dict:
    """Hungarian-matched clustering metrics, in percent.

    Args:
        preds: (N,) cluster ids (array or tensor).
        targets: (N,) class ids.
        groups: optional class groups, e.g. {'head': [...], 'mid': [...], 'tail': [...]} (`frequency_groups` or
            deit_lt `ClassSplits.groups`); adds one '<name>_acc' entry each.
        num_clusters: number of clusters (default max(preds) + 1).
        num_classes: number of classes (default max(targets) + 1).

    Returns:
        dict with 'acc' (class-mean recall, the paper's ACC), 'overall_acc', 'nmi', 'ari', 'f1' (macro),
        'class_acc' (list, NaN for classes absent from targets), 'mapping' (cluster -> class list), and
        '<group>_acc' per group.
    """
    from sklearn import metrics as skm

    preds, targets = _as_int_array(preds), _as_int_array(targets)
    if preds.size == 0:
        raise ValueError('no samples')
    kt = int(num_classes) if num_classes is not None else int(targets.max()) + 1
    mapping = hungarian_match(preds, targets, num_clusters, kt)
    matched = mapping[preds]
    correct = matched == targets
    support = np.bincount(targets, minlength=kt)
    hits = np.bincount(targets[correct], minlength=kt)
    with np.errstate(divide='ignore', invalid='ignore'):
        class_acc = np.where(support > 0, 100.0 * hits / np.maximum(support, 1), np.nan)
    # Macro F1 over the classes that occur in the targets or among the matched predictions (sklearn's default label
    # set, as the official code); unmatched samples are only false negatives of their true class.
    labels = np.union1d(targets, matched[matched != UNMATCHED])
    f1 = skm.f1_score(targets, matched, labels=labels, average=None, zero_division=0)
    out = {
        'acc': float(np.nanmean(class_acc)),
        'overall_acc': 100.0 * float(correct.mean()),
        'nmi': 100.0 * float(skm.normalized_mutual_info_score(targets, preds)),
        'ari': 100.0 * float(skm.adjusted_rand_score(targets, preds)),
        'f1': 100.0 * float(np.mean(f1)),
        'class_acc': class_acc.tolist(),
        'mapping': mapping.tolist(),
    }
    if groups:
        for name, acc in split_accuracy(torch.as_tensor(class_acc, dtype=torch.float64), groups).items():
            out[f'{name}_acc'] = acc
    return out


def frequency_groups(num_classes: int, head: float = 0.3, tail: float = 0.3) -> dict[str, list[int]]:
    """PPOT's head / mid / tail split of frequency-sorted class indices (class 0 the largest).

    head = the first int(head * C) classes, tail = the last int(tail * C), mid = the rest (so every class is in a
    group; PPOT's `class_acc_analyze` takes int(0.4 C) for mid, which drops a class when C is not a multiple of 10).
    """
    nh, nt = int(head * num_classes), int(tail * num_classes)
    if nh + nt > num_classes:
        raise ValueError('head and tail fractions overlap')
    return {'head': list(range(nh)), 'mid': list(range(nh, num_classes - nt)),
            'tail': list(range(num_classes - nt, num_classes))}


def kmeans_clusters(features, num_clusters: int, seed: int = 0, n_init: int = 10, normalize: bool = False,
                    max_iter: int = 300) -> np.ndarray:
    """k-means baseline: scikit-learn `KMeans` (Lloyd, k-means++ init) on fixed features.

    Args:
        features: (N, d) array or tensor.
        num_clusters: K.
        seed: `random_state`, so the result is reproducible.
        n_init: restarts; the best inertia wins.
        normalize: L2-normalise the features first (spherical-like k-means for cosine features).
        max_iter: Lloyd iterations per restart.

    Returns:
        (N,) int64 cluster ids.
    """
    from sklearn.cluster import KMeans

    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=num_clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
    return km.fit_predict(x).astype(np.int64)
