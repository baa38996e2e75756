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
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from ..config import DataConfig
from ..errors import DatasetError

__all__ = [
    'ClassSplits', 'LTDataset', 'DatasetError', 'create_datasets', 'lt_class_counts', 'canonical_lt_indices',
    'class_splits_from_counts', 'class_splits_from_bounds', 'DATASET_NAMES', 'parse_list_file',
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
    """

    def __init__(self, *, name: str, split: str, targets: np.ndarray, num_classes: int, class_names: list[str],
                 images: np.ndarray | None = None, paths: list[str] | None = None,
                 source_indices: np.ndarray | None = None, class_map: np.ndarray | None = None):
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

    def load_image(self, i: int) -> Image.Image:
        if self.images is not None:
            arr = self.images[i]
            return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        if self._preloaded is not None:
            return Image.fromarray(self._preloaded[i])
        with open(self.paths[i], 'rb') as f:
            return Image.open(f).convert('RGB')

    def __getitem__(self, i: int):
        return self.load_image(i), int(self.targets[i])

    def preload(self, short_side: int | None = None) -> None:
        """Decode every image once and keep it in memory (optionally resized), so epochs never re-decode."""
        if self.images is not None or self._preloaded is not None:
            return
        out = []
        for p in self.paths:
            with open(p, 'rb') as f:
                img = Image.open(f).convert('RGB')
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


def _balanced_val(targets: np.ndarray, kept: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick `per_class` validation images per class from images the LT subset left out; a class without enough
    leftovers gives the rest from its training images. Returns (train_indices, val_indices), both sorted."""
    rng = np.random.RandomState(seed + 1)
    in_train = np.zeros(len(targets), bool)
    in_train[kept] = True
    val = []
    for c in range(int(targets.max()) + 1):
        left = np.flatnonzero((targets == c) & ~in_train)
        rng.shuffle(left)
        take = list(left[:per_class])
        if len(take) < per_class:
            own = np.flatnonzero((targets == c) & in_train)
            rng.shuffle(own)
            need = per_class - len(take)
            if need >= len(own):
                raise DatasetError(f'class {c} has too few images for data.val_per_class={per_class}')
            take += list(own[:need])
            in_train[own[:need]] = False
        val += take
    return np.flatnonzero(in_train), np.sort(np.asarray(val, dtype=np.int64))


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
    with open(path, 'rb') as f:
        d = _CifarUnpickler(f, encoding='latin1').load()
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
    with np.load(path) as pack:
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
                images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert('RGB'))
                                   for i in range(len(labels))])
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(cached.name + f'.{os.getpid()}.tmp.npy')
                np.save(tmp, images)
                os.replace(tmp, cached)
            out[f'{split}_images'] = images
            out[f'{split}_labels'] = labels
        out['class_names'] = [str(s) for s in pack['class_names']] if 'class_names' in pack.files else None
    return out


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
        kept, val_idx = _balanced_val(y_train, kept, cfg.val_per_class, seed=0)
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

def _build_digits(cfg: DataConfig) -> dict[str, LTDataset]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    targets = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test, val, pools = [], [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        n_hold = cfg.test_per_class + cfg.val_per_class
        if n_hold >= len(idx):
            raise DatasetError(f'digits_lt: test_per_class + val_per_class must be < {len(idx)}')
        test.append(idx[:cfg.test_per_class])
        val.append(idx[cfg.test_per_class:n_hold])
        pools.append(idx[n_hold:])
    n_max = min(len(p) for p in pools)
    counts = lt_class_counts(n_max, 10, cfg.imb_factor)
    kept = np.sort(np.concatenate([p[:n] for p, n in zip(pools, counts)]))
    names = [str(i) for i in range(10)]
    out = {'train': LTDataset(name='digits_lt', split='train', targets=targets[kept], num_classes=10,
                              class_names=names, images=images[kept], source_indices=kept)}
    if cfg.val_per_class > 0:
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

def parse_list_file(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Read `relative/path label` lines. A malformed line or a label outside 0..C-1 is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'list file not found: {path}')
    paths, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DatasetError(f'{path}:{lineno}: expected "relative/path label", got {line!r}')
            try:
                label = int(parts[1])
            except ValueError:
                raise DatasetError(f'{path}:{lineno}: label {parts[1]!r} is not an integer') from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                rng = f'0..{num_classes - 1}' if num_classes is not None else '>= 0'
                raise DatasetError(f'{path}:{lineno}: label {label} outside the class range {rng}')
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise DatasetError(f'list file {path} has no samples')
    return paths, np.asarray(labels, np.int64)


def _build_from_lists(cfg: DataConfig) -> dict[str, LTDataset]:
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
    tr_paths, tr_labels = parse_list_file(list_dir / names['train'], num_classes)
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
    out = {}
    for split in ('train', 'val', 'test'):
        if not names[split]:
            continue
        if split == 'val' and cfg.val_list is None and not (list_dir / names['val']).is_file():
            continue  # standard val list absent: fine
        paths, labels = (tr_paths, tr_labels) if split == 'train' else parse_list_file(list_dir / names[split],
                                                                                       num_classes)
        if class_map is not None:
            labels = class_map[labels]
        abs_paths = [str(root / p) for p in paths]
        out[split] = LTDataset(name=cfg.name, split=split, targets=labels, num_classes=num_classes,
                               class_names=[str(c) for c in (np.argsort(class_map) if class_map is not None
                                                             else range(num_classes))],
                               paths=abs_paths, class_map=class_map)
    first = out['train'].paths[0]
    if not Path(first).is_file():
        raise DatasetError(f'image not found: {first} (data.root={root}; list paths are relative to it)')
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
    out = _build_from_lists(sub)
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
