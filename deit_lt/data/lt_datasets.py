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

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from ..checkpoint import atomic_write_text
from ..config import DataConfig
from ..errors import ConfigError, DatasetError
from ..progress import Progress

__all__ = [
    'ClassSplits', 'LTDataset', 'DatasetError', 'create_datasets', 'lt_class_counts', 'canonical_lt_indices',
    'class_splits_from_counts', 'class_splits_from_bounds', 'DATASET_NAMES', 'parse_list_file', 'read_list_file',
    'to_rgb', 'open_rgb', 'SkippedImages', 'find_missing', 'SKIPPED_IMAGES_FILE',
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

# Missing or unreadable files named in one error message; the complete list goes to a file beside the cache.
MAX_LISTED = 20
# Written into the run folder by runs with data.bad_images=skip (rank r > 0: skipped_images.rank<r>.json).
SKIPPED_IMAGES_FILE = 'skipped_images.json'
# Skipped images announced one by one on stderr; after that only the JSON file lists them.
MAX_WARNED = 20


# --------------------------------------------------------------------------------------------------------------
# Reading image files
# --------------------------------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    """An exception as `Type: message` on one line (error messages are one line; PIL's may hold several)."""
    if isinstance(e, Image.UnidentifiedImageError):   # its text repeats the path inside a file object's repr
        return 'UnidentifiedImageError: not an image format PIL can read'
    return f'{type(e).__name__}: {" ".join(str(e).split())}'.rstrip(': ')


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, the one conversion every reading path applies.

    It is PIL's `convert('RGB')`, as torchvision's ImageFolder loader (and so the published ImageNet-LT / iNat
    pipelines) reads files: greyscale is copied into the three channels, CMYK goes through PIL's formula (Adobe's
    inverted CMYK JPEGs are already un-inverted by the decoder), palette images take their palette colours and the
    alpha channel of RGBA / LA / PA is dropped (the stored colours are kept, nothing is composited). Two cases
    differ from a bare `convert`: 16- and 32-bit integer greyscale ('I;16*', 'I') are scaled from 16 bits to 8,
    where PIL would clip every value above 255 to white; palette images with a transparent colour go through RGBA
    first, which gives the same pixels without PIL's per-image warning.
    """
    if img.mode == 'RGB':
        return img
    if img.mode.startswith('I'):
        grey = np.asarray(img).astype(np.float64) / 257.0   # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), 'L').convert('RGB')
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    return img.convert('RGB')


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file completely (a truncated file fails here, not later) and convert it with `to_rgb`."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img)


def _decode_error(path: str) -> str | None:
    """None if `path` decodes, else why not (one line)."""
    try:
        open_rgb(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...) for bad files
        return _one_line(e)
    return None


def find_missing(paths: Sequence[str], threads: int = 8, chunk: int = 4096) -> list[int]:
    """Indices of `paths` that are not regular files, by one `stat` per path.

    The stats run in `threads` threads: a local disk answers from its cache either way, but on network file systems
    (NFS, Lustre) each stat waits for a round trip, which the threads overlap (stat releases the GIL).
    """
    isfile = os.path.isfile

    def scan(start: int) -> list[int]:
        return [i for i in range(start, min(start + chunk, len(paths))) if not isfile(paths[i])]
    starts = range(0, len(paths), chunk)
    if threads <= 1 or len(starts) <= 1:
        return [i for s in starts for i in scan(s)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [i for found in pool.map(scan, starts) for i in found]


class SkippedImages:
    """The images a run could not decode and the images it used in their place (`data.bad_images=skip`).

    The splits of one `create_datasets` call share one record. It is written to `<run folder>/skipped_images.json`
    once `attach` names the folder and again whenever a new image is skipped (rare: a rewrite of a small file), so
    the file is complete however the run ends. Each process records what its own data loading met (its loader
    workers report skips back with every batch); rank r > 0 writes `skipped_images.rank<r>.json`.
    """

    def __init__(self, policy: str = 'error'):
        self.policy = policy
        self.records: dict[tuple[str, str], dict] = {}    # (split, path) -> record
        self.path: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    def add(self, split: str, path: str, where: str, reason: str, used: str) -> None:
        """Record that `path` (at `where`, its list file and line) was replaced by `used` (no-op if known)."""
        if (split, path) in self.records:
            return
        self.records[(split, path)] = {'split': split, 'path': path, 'where': where, 'reason': reason,
                                       'used_instead': used}
        n = len(self.records)
        if n <= MAX_WARNED:
            target = f'; all are listed in {self.path}' if self.path else ''
            print(f'warning: skipped unreadable image {where} ({reason}); used {used} of the same class instead '
                  f'(data.bad_images=skip{target})', file=sys.stderr, flush=True)
        if n == MAX_WARNED:
            print(f'warning: {n} images skipped so far; further ones are only listed in '
                  f'{self.path or SKIPPED_IMAGES_FILE}', file=sys.stderr, flush=True)
        self._write()

    def attach(self, run_dir: str | os.PathLike, rank: int = 0) -> None:
        """Name the run folder and write the file (an empty list too, so a skip-policy run always documents its
        count). Does nothing under the 'error' policy, which never skips."""
        if self.policy != 'skip':
            return
        name = SKIPPED_IMAGES_FILE if rank == 0 else SKIPPED_IMAGES_FILE.replace('.json', f'.rank{rank}.json')
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            records = sorted(self.records.values(), key=lambda r: (r['split'], r['where']))
            atomic_write_text(self.path, json.dumps({'policy': self.policy, 'count': len(records),
                                                     'images': records}, indent=1))


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
                reason = self.known_bad[path] = _one_line(e)
        if self.bad_images != 'skip':
            raise DatasetError(f'{self.where(i)}: cannot read this image ({reason}); replace or remove it, or set '
                               f'data.bad_images=skip (data.verify=decode finds all such files before training)')
        for j in self._same_class_after(i):
            if self.paths[j] in self.known_bad:
                continue
            try:
                return open_rgb(self.paths[j]), j
            except Exception as e:  # noqa: BLE001 - as above
                self.known_bad[self.paths[j]] = _one_line(e)
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


# --------------------------------------------------------------------------------------------------------------
# CIFAR readers
# --------------------------------------------------------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Reads the official CIFAR python pickles without running arbitrary code: only NumPy array reconstruction
    and byte decoding are allowed."""
    _ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', 'scalar'),
        ('numpy._core.multiarray', 'scalar'), ('_codecs', 'encode'),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing to load {module}.{name} from a CIFAR pickle')


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f'CIFAR file missing: {path}. Point data.root at the folder holding the official '
                           f'python release (cifar-10-batches-py / cifar-100-python).')
    try:
        with open(path, 'rb') as f:
            d = _CifarUnpickler(f, encoding='latin1').load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as e:
        raise DatasetError(f'{path} is not a readable CIFAR python file ({_one_line(e)})') from None
    if not isinstance(d, dict):
        raise DatasetError(f'{path} is not a CIFAR python file (it holds a {type(d).__name__}, not a dict)')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_from_pickles(folder: Path, num_classes: int) -> dict:
    def to_hwc(data):
        return np.ascontiguousarray(np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    if num_classes == 10:
        parts = [_read_cifar_pickle(folder / f'data_batch_{i}') for i in range(1, 6)]
        test = _read_cifar_pickle(folder / 'test_batch')
        meta = _read_cifar_pickle(folder / 'batches.meta') if (folder / 'batches.meta').is_file() else {}
        names = meta.get('label_names') or [str(i) for i in range(10)]
        return dict(
            train_images=to_hwc(np.concatenate([p['data'] for p in parts])),
            train_labels=np.concatenate([np.asarray(p['labels']) for p in parts]),
            test_images=to_hwc(test['data']), test_labels=np.asarray(test['labels']), class_names=list(names))
    train = _read_cifar_pickle(folder / 'train')
    test = _read_cifar_pickle(folder / 'test')
    meta = _read_cifar_pickle(folder / 'meta') if (folder / 'meta').is_file() else {}
    names = meta.get('fine_label_names') or [str(i) for i in range(100)]
    return dict(train_images=to_hwc(train['data']), train_labels=np.asarray(train['fine_labels']),
                test_images=to_hwc(test['data']), test_labels=np.asarray(test['fine_labels']),
                class_names=list(names))


def _cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get('DEIT_LT_CACHE', Path.home() / '.cache' / 'deit_lt'))


def _cifar_from_jpeg_pack(path: Path, cache_dir: Path) -> dict:
    """Decode a JPEG pack once; later runs read the decoded uint8 arrays from the cache (memory-mapped)."""
    st = path.stat()
    key = hashlib.sha1(f'{path.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:16]
    out = {}
    try:
        pack = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f'{path} is not a readable .npz file (truncated or corrupt?): {_one_line(e)}') from None
    with pack:
        missing = {'train_jpeg', 'train_offsets', 'train_labels', 'test_jpeg', 'test_offsets',
                   'test_labels'} - set(pack.files)
        if missing:
            raise DatasetError(f'{path} is not a CIFAR JPEG pack (missing {sorted(missing)})')
        for split in ('train', 'test'):
            labels = np.asarray(pack[f'{split}_labels'], np.int64)
            cached = cache_dir / f'{path.stem}-{key}-{split}.npy'
            if cached.is_file():
                images = np.load(cached, mmap_mode='r')
            else:
                jpeg, off = pack[f'{split}_jpeg'], pack[f'{split}_offsets']
                images = np.stack([_decode_packed(path, split, i, jpeg[off[i]:off[i + 1]])
                                   for i in range(len(labels))])
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(cached.name + f'.{os.getpid()}.tmp.npy')
                np.save(tmp, images)
                os.replace(tmp, cached)
            out[f'{split}_images'] = images
            out[f'{split}_labels'] = labels
        out['class_names'] = [str(s) for s in pack['class_names']] if 'class_names' in pack.files else None
    return out


def _decode_packed(pack: Path, split: str, i: int, data: np.ndarray) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data.tobytes()))
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged pack
        raise DatasetError(f'{pack}: {split} image {i} cannot be decoded ({_one_line(e)}); the pack is damaged, '
                           f'check it against its checksum') from None
    return np.asarray(to_rgb(img))


def _find_cifar(cfg: DataConfig, num_classes: int) -> dict:
    if not cfg.root:
        raise DatasetError(f'{cfg.name} needs data.root: the folder with the official python release or the '
                           f'JPEG pack (e.g. data.root=../shared/data/cifar10_jpeg.npz)')
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DatasetError(f'data.root does not exist: {root}')
    folder_name = 'cifar-10-batches-py' if num_classes == 10 else 'cifar-100-python'
    pack_name = 'cifar10_jpeg.npz' if num_classes == 10 else 'cifar100_jpeg.npz'
    if root.is_file() and root.suffix == '.npz':
        return _cifar_from_jpeg_pack(root, _cache_dir(cfg))
    for cand in (root, root / folder_name):
        marker = 'data_batch_1' if num_classes == 10 else 'train'
        if (cand / marker).is_file():
            return _cifar_from_pickles(cand, num_classes)
    if (root / pack_name).is_file():
        return _cifar_from_jpeg_pack(root / pack_name, _cache_dir(cfg))
    raise DatasetError(f'no CIFAR-{num_classes} data under {root}: expected {folder_name}/ (official python '
                       f'release) or {pack_name}')


def _build_cifar(cfg: DataConfig, num_classes: int) -> dict[str, LTDataset]:
    raw = _find_cifar(cfg, num_classes)
    y_train = np.asarray(raw['train_labels'], np.int64)
    if y_train.min() < 0 or y_train.max() >= num_classes:
        raise DatasetError(f'{cfg.name}: labels outside 0..{num_classes - 1} in the training data')
    n_max = int(np.bincount(y_train, minlength=num_classes).max())
    counts = lt_class_counts(n_max, num_classes, cfg.imb_factor)
    kept = canonical_lt_indices(y_train, counts, seed=0)
    names = raw['class_names'] or [str(i) for i in range(num_classes)]
    out = {}
    val_idx = None
    if cfg.val_per_class > 0:
        val_idx = _leftover_val(y_train, kept, cfg.val_per_class, seed=0, dataset=cfg.name)
    out['train'] = LTDataset(name=cfg.name, split='train', targets=y_train[kept], num_classes=num_classes,
                             class_names=names, images=_take(raw['train_images'], kept), source_indices=kept)
    if val_idx is not None:
        out['val'] = LTDataset(name=cfg.name, split='val', targets=y_train[val_idx], num_classes=num_classes,
                               class_names=names, images=_take(raw['train_images'], val_idx), source_indices=val_idx)
    y_test = np.asarray(raw['test_labels'], np.int64)
    out['test'] = LTDataset(name=cfg.name, split='test', targets=y_test, num_classes=num_classes, class_names=names,
                            images=np.asarray(raw['test_images']), source_indices=np.arange(len(y_test)))
    return out


def _take(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[idx])


# --------------------------------------------------------------------------------------------------------------
# digits_lt
# --------------------------------------------------------------------------------------------------------------

# Images per digit set aside for validation before the long-tailed subset is drawn: the training split is then the
# same whatever data.val_per_class is (up to this many, validation is balanced; above, it takes leftovers).
DIGITS_VAL_RESERVE = 20


def _build_digits(cfg: DataConfig) -> dict[str, LTDataset]:
    """Each digit's images, shuffled (legacy RNG, seed 0), are cut into test (`test_per_class`), a validation reserve
    (`DIGITS_VAL_RESERVE`) and the training pool; the long-tailed subset takes the first n_c of each pool, with n_max
    the smallest pool. Validation takes the reserve first, then pool images the subset left out (too few for the
    largest class: a warning, as for CIFAR)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    targets = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test, reserve, pools = [], [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        n_hold = cfg.test_per_class + DIGITS_VAL_RESERVE
        if n_hold >= len(idx):
            raise DatasetError(f'digits_lt: data.test_per_class must be < {len(idx) - DIGITS_VAL_RESERVE} (digit {c} '
                               f'has {len(idx)} images, {DIGITS_VAL_RESERVE} of them kept for validation)')
        test.append(idx[:cfg.test_per_class])
        reserve.append(idx[cfg.test_per_class:n_hold])
        pools.append(idx[n_hold:])
    n_max = min(len(p) for p in pools)
    counts = lt_class_counts(n_max, 10, cfg.imb_factor)
    kept = np.sort(np.concatenate([p[:n] for p, n in zip(pools, counts)]))
    names = [str(i) for i in range(10)]
    out = {'train': LTDataset(name='digits_lt', split='train', targets=targets[kept], num_classes=10,
                              class_names=names, images=images[kept], source_indices=kept)}
    if cfg.val_per_class > 0:
        val, short = [], []
        for c in range(10):
            spare = np.concatenate([reserve[c], pools[c][counts[c]:]])
            val.append(spare[:cfg.val_per_class])
            if len(spare) < cfg.val_per_class:
                short.append(f'{c} ({len(spare)})')
        if short:
            warnings.warn(f'digits_lt: data.val_per_class={cfg.val_per_class} is more than digits {", ".join(short)} '
                          f'have outside the training split (shown in brackets); the validation split has only '
                          f'those for them. The training split is unchanged.', stacklevel=3)
        v = np.sort(np.concatenate(val))
        out['val'] = LTDataset(name='digits_lt', split='val', targets=targets[v], num_classes=10, class_names=names,
                               images=images[v], source_indices=v)
    t = np.sort(np.concatenate(test))
    out['test'] = LTDataset(name='digits_lt', split='test', targets=targets[t], num_classes=10, class_names=names,
                            images=images[t], source_indices=t)
    return out


# --------------------------------------------------------------------------------------------------------------
# List files and image folders
# --------------------------------------------------------------------------------------------------------------

def read_list_file(path: str | os.PathLike, num_classes: int | None = None
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read `relative/path label` lines: (paths, (N,) int64 labels, (N,) int32 line numbers). Blank lines and lines
    starting with '#' are skipped. A malformed line or a label outside 0..C-1 is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'list file not found: {path}')
    paths, labels, lines = [], [], []
    try:
        with open(path, encoding='utf-8') as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith('#'):
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) != 2:
                    raise DatasetError(f'{path}:{lineno}: expected "relative/path label", got {line[:200]!r}')
                try:
                    label = int(parts[1])
                except ValueError:
                    raise DatasetError(f'{path}:{lineno}: label {parts[1][:50]!r} is not an integer') from None
                if label < 0 or (num_classes is not None and label >= num_classes):
                    rng = f'0..{num_classes - 1}' if num_classes is not None else '>= 0'
                    raise DatasetError(f'{path}:{lineno}: label {label} outside the class range {rng}')
                paths.append(parts[0])
                labels.append(label)
                lines.append(lineno)
    except UnicodeDecodeError as e:
        raise DatasetError(f'{path} is not a text list file (not UTF-8 at byte {e.start}); expected '
                           f'"relative/path label" lines') from None
    except OSError as e:
        raise DatasetError(f'cannot read list file {path}: {_one_line(e)}') from None
    if not paths:
        raise DatasetError(f'list file {path} has no samples')
    return paths, np.asarray(labels, np.int64), np.asarray(lines, np.int32)


def parse_list_file(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """`read_list_file` without the line numbers: (paths, labels)."""
    paths, labels, _ = read_list_file(path, num_classes)
    return paths, labels


def _usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1'))))


def _is_main_process() -> bool:
    # datasets are built before (or without) an Accelerator; the launcher's RANK says which process shows progress
    return os.environ.get('RANK', '0') == '0'


def _full_list(cfg: DataConfig, kind: str, entries: list[str]) -> str:
    """Write every entry to a file in the cache folder; returns ' (all N in FILE)' for the message, or ''."""
    key = hashlib.sha1(f'{cfg.name}:{cfg.root}:{cfg.list_dir}:{cfg.train_list}:{cfg.test_list}'.encode()).hexdigest()
    target = _cache_dir(cfg) / f'{kind}-{key[:12]}.txt'
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, ''.join(e + '\n' for e in entries))
    except Exception:  # noqa: BLE001 - the list is a convenience; the error message stands without it
        return ''
    return f' (all {len(entries)} in {target})'


def _listing(entries: list[str], cfg: DataConfig, kind: str) -> str:
    shown = '; '.join(entries[:MAX_LISTED])
    if len(entries) > MAX_LISTED:
        shown += f'; ... {len(entries) - MAX_LISTED} more{_full_list(cfg, kind, entries)}'
    return shown


def _check_exist(sets: dict[str, LTDataset], cfg: DataConfig, root: Path) -> None:
    """Every listed file exists, or one error naming each missing one by list file and line."""
    missing, total = [], 0
    for ds in sets.values():
        missing += [ds.where(i) for i in find_missing(ds.paths)]
        total += len(ds)
    if missing:
        raise DatasetError(f'{len(missing)} of {total} listed images do not exist (data.root={root}; list paths are '
                           f'relative to it): {_listing(missing, cfg, "missing")}')


def _check_decode(sets: dict[str, LTDataset], cfg: DataConfig) -> None:
    """Decode every image once, in threads (PIL's decoders release the GIL), with a progress bar. Under 'error' an
    undecodable file stops here, listed by list file and line; under 'skip' it is recorded with the image used in
    its place (the same one training will use)."""
    unique = list(dict.fromkeys(p for ds in sets.values() for p in ds.paths))
    chunk = 64
    bad: dict[str, str] = {}

    def scan(start: int) -> list[tuple[str, str]]:
        found = ((p, _decode_error(p)) for p in unique[start:start + chunk])
        return [(p, why) for p, why in found if why is not None]
    with Progress(len(unique), 'verify: decode images', unit='image', enabled=_is_main_process()) as progress, \
            concurrent.futures.ThreadPoolExecutor(min(32, _usable_cores())) as pool:
        starts = range(0, len(unique), chunk)
        for start, found in zip(starts, pool.map(scan, starts)):
            bad.update(found)
            progress.update(min(chunk, len(unique) - start))
    if not bad:
        return
    entries = [f'{ds.where(i)} ({bad[p]})' for ds in sets.values() for i, p in enumerate(ds.paths) if p in bad]
    if cfg.bad_images != 'skip':
        total = sum(len(ds) for ds in sets.values())
        raise DatasetError(f'{len(entries)} of {total} listed images cannot be decoded: '
                           f'{_listing(entries, cfg, "undecodable")}; replace or remove them, or set '
                           f'data.bad_images=skip')
    for ds in sets.values():
        ds.known_bad.update(bad)
        for i, p in enumerate(ds.paths):
            if p in bad:
                ds.note_skip(i, ds.read(i)[1], bad[p])


def _build_from_lists(cfg: DataConfig, named_by_list: bool = True) -> dict[str, LTDataset]:
    """List-file datasets. `named_by_list`: messages name samples by list file and line (False for lists this
    module generated from a folder, where the path alone is what the user knows)."""
    defaults = _LIST_DEFAULTS[cfg.name]
    if not cfg.root:
        raise DatasetError(f'{cfg.name} needs data.root (the image root the list files are relative to)')
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f'data.root is not a folder: {root}')
    list_dir = Path(cfg.list_dir).expanduser() if cfg.list_dir else root
    names = {'train': cfg.train_list or defaults['train'], 'val': cfg.val_list or defaults['val'],
             'test': cfg.test_list or defaults['test']}
    if not names['train'] or not names['test']:
        raise DatasetError(f'{cfg.name} needs data.train_list and data.test_list')
    num_classes = defaults['num_classes']
    tr_paths, tr_labels, tr_lines = read_list_file(list_dir / names['train'], num_classes)
    if num_classes is None:
        num_classes = int(tr_labels.max()) + 1
    raw_counts = np.bincount(tr_labels, minlength=num_classes)
    if (raw_counts == 0).any():
        missing = np.flatnonzero(raw_counts == 0)[:10].tolist()
        raise DatasetError(f'{names["train"]}: classes without training images: {missing}; '
                           f'labels must be 0..C-1 with every class present')
    class_map = None
    if cfg.sort_classes:
        order = np.argsort(-raw_counts, kind='stable')   # rank r holds original class order[r]
        class_map = np.empty(num_classes, np.int64)
        class_map[order] = np.arange(num_classes)
    class_names = [str(c) for c in (np.argsort(class_map) if class_map is not None else range(num_classes))]
    skipped = SkippedImages(cfg.bad_images)
    root_text = str(root)
    out = {}
    for split in ('train', 'val', 'test'):
        if not names[split]:
            continue
        if split == 'val' and cfg.val_list is None and not (list_dir / names['val']).is_file():
            continue  # standard val list absent: fine
        list_path = list_dir / names[split]
        paths, labels, lines = (tr_paths, tr_labels, tr_lines) if split == 'train' else \
            read_list_file(list_path, num_classes)
        if class_map is not None:
            labels = class_map[labels]
        # os.path.join, not pathlib: a third of the build time of a 400k-entry list otherwise
        abs_paths = [os.path.join(root_text, p) for p in paths]
        out[split] = LTDataset(name=cfg.name, split=split, targets=labels, num_classes=num_classes,
                               class_names=class_names, paths=abs_paths, class_map=class_map,
                               list_file=str(list_path) if named_by_list else None,
                               lines=lines if named_by_list else None, bad_images=cfg.bad_images, skipped=skipped)
    if cfg.verify == 'none':
        first = out['train'].paths[0]
        if not Path(first).is_file():
            raise DatasetError(f'image not found: {out["train"].where(0)} (data.root={root}; list paths are relative '
                               f'to it)')
    else:
        _check_exist(out, cfg, root)
    if cfg.verify == 'decode':
        _check_decode(out, cfg)
    if cfg.preload:
        for ds in out.values():
            ds.preload(cfg.preload_size)
    return out


_IMG_EXT = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


def _build_from_folder(cfg: DataConfig) -> dict[str, LTDataset]:
    """`root/train/<class>/*.jpg` and `root/test/<class>/...` (or val/): class names sorted alphabetically."""
    if not cfg.root:
        raise DatasetError('image_folder needs data.root with train/<class>/ and test/<class>/ (or val/) folders')
    root = Path(cfg.root).expanduser()
    if not (root / 'train').is_dir():
        raise DatasetError(f'image_folder: {root / "train"} is not a folder')
    classes = sorted(p.name for p in (root / 'train').iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f'image_folder: no class folders under {root / "train"}')
    lines = {}
    for split in ('train', 'val', 'test'):
        if not (root / split).is_dir():
            continue
        lines[split] = [(str(f.relative_to(root)), classes.index(c.name))
                        for c in sorted((root / split).iterdir()) if c.is_dir() and c.name in classes
                        for f in sorted(c.rglob('*')) if f.suffix.lower() in _IMG_EXT]
    if 'test' not in lines and 'val' in lines:
        lines['test'] = lines.pop('val')
    if 'test' not in lines:
        raise DatasetError(f'image_folder: need {root / "test"} or {root / "val"}')
    list_dir = _cache_dir(cfg) / ('lists-' + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12])
    list_dir.mkdir(parents=True, exist_ok=True)
    for split, items in lines.items():
        (list_dir / f'{split}.txt').write_text(''.join(f'{p} {y}\n' for p, y in items))
    sub = dataclasses.replace(cfg, name='image_list', list_dir=str(list_dir), train_list='train.txt',
                              val_list='val.txt' if 'val' in lines else None, test_list='test.txt')
    out = _build_from_lists(sub, named_by_list=False)
    for ds in out.values():
        ds.name = 'image_folder'
        ds.class_names = [classes[int(i)] for i in (np.argsort(ds.class_map) if ds.class_map is not None
                                                     else range(len(classes)))]
    return out


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
