"""Long-tailed datasets behind one interface.

Every dataset is an index of samples with integer labels, the per-class counts of the *training* split, and
the grouping of classes into head / mid / tail. Images come back as PIL images (`__getitem__`) for the
per-image loader path; in-memory datasets (CIFAR, digits) also expose `images`, an (N, H, W, C) uint8 array,
for the device pipeline that keeps the whole set on the GPU.

Sources:
- CIFAR-10/100-LT from the official python release (`cifar-10-batches-py`, `cifar-100-python`) or a JPEG pack
  (`cifar10_jpeg.npz`: JPEG bytes + offsets + labels per split). The long-tailed subset is the canonical one of
  LDAM-DRW / DeiT-LT: class c keeps floor(n_max * (1/IF)^(c/(C-1))) images, chosen by shuffling each class's
  indices (original order, classes in order) with NumPy's legacy RNG seeded 0 and keeping the first n_c.
- ImageNet-LT, iNaturalist-2018, Places-LT and any image folder from list files (`relative/path label` per line),
  classes optionally renumbered by descending training count (the map is kept so predictions map back).
- digits_lt: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download) with a balanced
  test split and an exponentially long-tailed training split; the embedded default for the quickstart and tests.

Images read from files are checked before training (`data.verify`: every listed file exists, or also decodes), and
an image that cannot be decoded during training either stops the run naming its list file and line or, with
`data.bad_images=skip`, is replaced by the next readable image of the same class (`LTDataset.read`) and listed in
`skipped_images.json` of the run folder. Every file is converted to RGB by one function (`to_rgb`), whichever
path reads it (per-image loading, `preload`, the decode check).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from ..config import DataConfig
from ..errors import ConfigError, DatasetError
from .images import SkippedImages, one_line, open_rgb

__all__ = [
    'ClassSplits', 'LTDataset', 'DatasetError', 'create_datasets', 'lt_class_counts', 'canonical_lt_indices',
    'class_splits_from_counts', 'class_splits_from_bounds', 'DATASET_NAMES',
]

DATASET_NAMES = ('cifar10_lt', 'cifar100_lt', 'imagenet_lt', 'inat2018', 'places_lt', 'image_list', 'image_folder',
                 'digits_lt')

# Head/mid/tail class-index ranges [a, b] that DeiT-LT (and Saddle-LongTail) report with, in sorted label space.
DEIT_LT_SPLIT_BOUNDS = {
    'cifar10_lt': (3, 7),
    'cifar100_lt': (36, 71),
    'imagenet_lt': (390, 835),
    'inat2018': (842, 4543),
    'digits_lt': (3, 7),
}

# Standard list-file names (OLTR / classifier-balancing) and class counts.
_LIST_DEFAULTS = {
    'imagenet_lt': dict(train='ImageNet_LT_train.txt', val='ImageNet_LT_val.txt', test='ImageNet_LT_test.txt',
                        num_classes=1000),
    'inat2018': dict(train='iNaturalist18_train.txt', val=None, test='iNaturalist18_val.txt', num_classes=8142),
    'places_lt': dict(train='Places_LT_train.txt', val='Places_LT_val.txt', test='Places_LT_test.txt',
                      num_classes=365),
    'image_list': dict(train=None, val=None, test=None, num_classes=None),
}



# --------------------------------------------------------------------------------------------------------------
# Head / mid / tail
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ClassSplits:
    """Class groups for split accuracy. `groups` maps 'head'/'mid'/'tail' to class indices."""
    mode: str
    groups: dict[str, list[int]]
    description: str

    def as_dict(self) -> dict:
        return {'mode': self.mode, 'description': self.description, 'groups': self.groups}


def class_splits_from_counts(counts: Sequence[int], many: int = 100, few: int = 20) -> ClassSplits:
    """Many-shot (> many train images), medium (few..many), few-shot (< few): the Decoupling / OLTR convention."""
    counts = np.asarray(counts)
    groups = {
        'head': np.flatnonzero(counts > many).tolist(),
        'mid': np.flatnonzero((counts <= many) & (counts >= few)).tolist(),
        'tail': np.flatnonzero(counts < few).tolist(),
    }
    return ClassSplits('threshold', groups, f'head: >{many} train images, mid: {few}..{many}, tail: <{few}')


def class_splits_from_bounds(num_classes: int, a: int, b: int) -> ClassSplits:
    """Class-index ranges head [0, a), mid [a, b), tail [b, C) in sorted label space (DeiT-LT's reporting)."""
    if not 0 < a < b < num_classes:
        raise DatasetError(f'split bounds [{a}, {b}] must satisfy 0 < a < b < num_classes={num_classes}')
    groups = {'head': list(range(0, a)), 'mid': list(range(a, b)), 'tail': list(range(b, num_classes))}
    return ClassSplits('index', groups, f'head: classes [0,{a}), mid: [{a},{b}), tail: [{b},{num_classes})')


def _make_splits(cfg: DataConfig, counts: np.ndarray, sorted_space: bool) -> ClassSplits:
    mode = cfg.split
    default_bounds = DEIT_LT_SPLIT_BOUNDS.get(cfg.name)
    if mode == 'auto':
        mode = 'index' if (default_bounds is not None or cfg.split_bounds) and sorted_space else 'threshold'
    if mode == 'threshold':
        return class_splits_from_counts(counts, cfg.many_threshold, cfg.few_threshold)
    bounds = cfg.split_bounds or default_bounds
    if bounds is None or len(bounds) != 2:
        raise DatasetError(f'data.split=index needs data.split_bounds=[a,b] for dataset {cfg.name!r}')
    if not sorted_space:
        raise DatasetError('data.split=index needs classes sorted by count: set data.sort_classes=true '
                           'or use data.split=threshold')
    return class_splits_from_bounds(len(counts), int(bounds[0]), int(bounds[1]))


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------

class LTDataset(torch.utils.data.Dataset):
    """A split of a long-tailed dataset.

    Attributes:
        name: dataset name (`DATASET_NAMES`); split: 'train', 'val' or 'test'.
        targets: (N,) int64 labels in the (possibly sorted) label space.
        num_classes, class_names, in_chans.
        class_counts: (C,) per-class counts of this split.
        train_counts: (C,) per-class counts of the training split (the same on every split; for splits and DRW).
        splits: head/mid/tail grouping (from the training counts).
        images: (N, H, W, C) uint8 for in-memory datasets, else None (then `paths` holds image files).
        source_indices: (N,) index of each sample in the original split it was drawn from (CIFAR/digits), or None.
        class_map: (C_orig,) original id -> label used here, when classes were renumbered; else None.
        list_file, lines: the list file the paths come from and the (N,) line of each, for messages; or None.
        bad_images: 'error' (an undecodable file stops the run) or 'skip' (`read` substitutes, see there).
        skipped: the record of skipped images, shared by the splits of one `create_datasets` call.
    """

    def __init__(self, *, name: str, split: str, targets: np.ndarray, num_classes: int, class_names: list[str],
                 images: np.ndarray | None = None, paths: list[str] | None = None,
                 source_indices: np.ndarray | None = None, class_map: np.ndarray | None = None,
                 list_file: str | None = None, lines: np.ndarray | None = None, bad_images: str = 'error',
                 skipped: SkippedImages | None = None):
        self.name = name
        self.split = split
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.images = images
        self.paths = paths
        self.source_indices = source_indices
        self.class_map = class_map
        self.in_chans = images.shape[-1] if images is not None else 3
        self.class_counts = np.bincount(self.targets, minlength=self.num_classes)
        self.train_counts = self.class_counts
        self.splits: ClassSplits | None = None
        self._preloaded: list[np.ndarray] | None = None
        self.list_file = list_file
        # line numbers belong to this exact paths list: a copy with other paths (a subset) falls back to paths only
        self._lines = (paths, np.asarray(lines, np.int32)) if lines is not None else None
        self.bad_images = bad_images
        self.skipped = skipped if skipped is not None else SkippedImages(bad_images)
        self.known_bad: dict[str, str] = {}     # path -> why it cannot be decoded (this process's knowledge)
        self._members: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if images is None and paths is None:
            raise DatasetError('a dataset needs images or paths')

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def image_size(self) -> tuple[int, int] | None:
        return tuple(self.images.shape[1:3]) if self.images is not None else None

    def where(self, i: int) -> str:
        """Sample `i` for messages: `list_file:line: path`, or the path alone (or the index of in-memory data)."""
        if self.paths is None:
            return f'{self.name} {self.split} sample {i}'
        if self._lines is not None and self._lines[0] is self.paths:
            return f'{self.list_file}:{int(self._lines[1][i])}: {self.paths[i]}'
        return self.paths[i]

    def read(self, i: int) -> tuple[Image.Image, int]:
        """The image of sample `i` and the index it was actually read from.

        A file that cannot be decoded raises `DatasetError` naming its list file and line ('error' policy), or
        ('skip') is replaced by the next readable image of the same class in this split's order, wrapping around.
        The replacement depends only on the files, not on the epoch, worker or rank, so batch shapes stay the same
        and a resumed run reads exactly what the uninterrupted one read. A class without any readable image stops
        the run either way.
        """
        if self.images is not None:
            arr = self.images[i]
            return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr), i
        if self._preloaded is not None:
            return Image.fromarray(self._preloaded[i]), i
        path = self.paths[i]
        reason = self.known_bad.get(path)
        if reason is None:
            try:
                return open_rgb(path), i
            except Exception as e:  # noqa: BLE001 - any failure to read or decode a file means a bad file
                reason = self.known_bad[path] = one_line(e)
        if self.bad_images != 'skip':
            raise DatasetError(f'{self.where(i)}: cannot read this image ({reason}); replace or remove it, or set '
                               f'data.bad_images=skip (data.verify=decode finds all such files before training)')
        for j in self._same_class_after(i):
            if self.paths[j] in self.known_bad:
                continue
            try:
                return open_rgb(self.paths[j]), j
            except Exception as e:  # noqa: BLE001 - as above
                self.known_bad[self.paths[j]] = one_line(e)
        c = int(self.targets[i])
        raise DatasetError(f'no image of class {c} ({self.class_names[c]}) in the {self.split} split can be read '
                           f'(e.g. {self.where(i)}: {reason}); data.bad_images=skip needs a readable '
                           f'image of the same class to use instead')

    def _same_class_after(self, i: int) -> np.ndarray:
        """The other samples of i's class, in dataset order, starting after i and wrapping around."""
        if self._members is None or self._members[0] is not self.targets:
            order = np.argsort(self.targets, kind='stable')    # by class, dataset order inside each class
            starts = np.concatenate([[0], np.cumsum(np.bincount(self.targets, minlength=self.num_classes))])
            self._members = (self.targets, order, starts)
        _, order, starts = self._members
        c = int(self.targets[i])
        members = order[starts[c]:starts[c + 1]]
        k = int(np.searchsorted(members, i))
        return np.concatenate([members[k + 1:], members[:k]])

    def load_image(self, i: int) -> Image.Image:
        return self.read(i)[0]

    def __getitem__(self, i: int):
        return self.read(i)[0], int(self.targets[i])

    def note_skip(self, i: int, used: int, reason: str | None = None) -> None:
        """Record (in `skipped`) that sample i was read from sample `used` instead; the main process calls this for
        the skips its loader workers report (with the reason the worker found)."""
        path = self.paths[i]
        reason = reason or self.known_bad.get(path) or 'cannot be decoded'
        self.known_bad.setdefault(path, reason)
        self.skipped.add(self.split, path, self.where(i), reason, self.paths[used])

    def preload(self, short_side: int | None = None) -> None:
        """Decode every image once and keep it in memory (optionally resized), so epochs never re-decode."""
        if self.images is not None or self._preloaded is not None:
            return
        out = []
        for i in range(len(self.paths)):
            img, used = self.read(i)
            if used != i:
                self.note_skip(i, used)
            if short_side:
                w, h = img.size
                s = short_side / min(w, h)
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            out.append(np.asarray(img))
        self._preloaded = out

    def summary(self) -> dict:
        counts = self.class_counts
        nz = counts[counts > 0]
        return {
            'name': self.name, 'split': self.split, 'num_samples': int(len(self)), 'num_classes': self.num_classes,
            'counts': counts.tolist(),
            'imbalance_factor': float(nz.max() / nz.min()) if len(nz) else float('nan'),
        }


# --------------------------------------------------------------------------------------------------------------
# Canonical long-tailed CIFAR subset
# --------------------------------------------------------------------------------------------------------------

def lt_class_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """floor(n_max * (1/IF)^(c/(C-1))) per class, computed as LDAM-DRW does (imb_factor**exponent)."""
    if imb_factor < 1:
        raise DatasetError(f'imbalance factor must be >= 1 (1 = balanced), got {imb_factor}')
    if num_classes == 1:
        return [n_max]
    ratio = 1.0 / imb_factor
    return [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def canonical_lt_indices(targets: np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices kept by the standard CIFAR-LT construction, in increasing order.

    NumPy's legacy RNG seeded `seed` shuffles each class's indices (original order), classes in order, and the
    first n_c are kept. `RandomState(seed)` draws exactly what `np.random.seed(seed); np.random.shuffle` draws,
    without touching the global generator.
    """
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        if n > len(idx):
            raise DatasetError(f'class {c} has {len(idx)} images, fewer than the {n} the LT profile asks for')
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.sort(np.concatenate(kept))


def _leftover_val(targets: np.ndarray, kept: np.ndarray, per_class: int, seed: int, dataset: str) -> np.ndarray:
    """`per_class` validation images per class (sorted indices), drawn only from images the long-tailed subset left
    out, so the training split stays the canonical one whatever the validation size.

    A class with fewer leftovers gives what it has, with a warning: at any imbalance factor class 0 keeps all of its
    images (CIFAR-10: 5000 of 5000), so it has none. Erroring instead would make the option unusable on CIFAR-LT, and
    taking training images would silently shrink the benchmark's subset; a validation split short of head-class
    images still ranks settings, and the warning says which classes it lacks.
    """
    rng = np.random.RandomState(seed + 1)
    in_train = np.zeros(len(targets), bool)
    in_train[kept] = True
    val, short = [], []
    for c in range(int(targets.max()) + 1):
        left = np.flatnonzero((targets == c) & ~in_train)
        rng.shuffle(left)
        val.append(left[:per_class])
        if len(left) < per_class:
            short.append(f'{c} ({len(left)})')
    if short:
        warnings.warn(f'{dataset}: data.val_per_class={per_class} is carved only from images the long-tailed subset '
                      f'does not use, and classes {", ".join(short)} have fewer (shown in brackets); the validation '
                      f'split has only those for them. The training split is unchanged.', stacklevel=3)
    return np.sort(np.concatenate(val)).astype(np.int64)


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get('DEIT_LT_CACHE', Path.home() / '.cache' / 'deit_lt'))


# --------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------

def create_datasets(cfg: DataConfig) -> dict[str, LTDataset]:
    """Build the 'train', 'test' and (when available) 'val' splits for `cfg`, with class counts and splits set."""
    if cfg.name not in DATASET_NAMES:
        raise DatasetError(f'unknown dataset {cfg.name!r}; choose one of {", ".join(DATASET_NAMES)}')
    if cfg.imb_factor < 1:
        raise DatasetError(f'data.imb_factor must be >= 1 (1 = balanced), got {cfg.imb_factor}')
    if cfg.val_per_class < 0:
        raise DatasetError('data.val_per_class must be >= 0')
    if cfg.val_per_class > 0 and cfg.name not in ('cifar10_lt', 'cifar100_lt', 'digits_lt'):
        # the training list of a list / folder dataset IS the long-tailed subset: carving images out of it would
        # change the benchmark, so the split is asked for explicitly instead
        given = 'a val/ folder beside train/ and test/' if cfg.name == 'image_folder' else \
            'data.val_list (a list file of validation images)'
        raise ConfigError(f'data.val_per_class={cfg.val_per_class} needs images that the long-tailed subset leaves '
                          f'unused (cifar10_lt, cifar100_lt, digits_lt); the {cfg.name} training list is the subset '
                          f'itself. Give a validation split as {given}, or set data.val_per_class=0')
    from .cifar import _build_cifar
    from .digits import _build_digits
    from .lists import _build_from_folder, _build_from_lists
    if cfg.name == 'cifar10_lt':
        out = _build_cifar(cfg, 10)
    elif cfg.name == 'cifar100_lt':
        out = _build_cifar(cfg, 100)
    elif cfg.name == 'digits_lt':
        out = _build_digits(cfg)
    elif cfg.name == 'image_folder':
        out = _build_from_folder(cfg)
    else:
        out = _build_from_lists(cfg)
    train_counts = out['train'].class_counts
    sorted_space = cfg.name in ('cifar10_lt', 'cifar100_lt', 'digits_lt') or out['train'].class_map is not None
    splits = _make_splits(cfg, train_counts, sorted_space)
    for ds in out.values():
        ds.train_counts = train_counts
        ds.splits = splits
    return out
