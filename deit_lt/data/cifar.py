"""CIFAR-10/100-LT from the official python release or a JPEG pack (`cifar10_jpeg.npz`: JPEG bytes + offsets +
labels per split), with the canonical long-tailed subset (`deit_lt.data.lt_datasets.canonical_lt_indices`)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

from einops import rearrange
import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import DatasetError

from .images import one_line, to_rgb
from .lt_datasets import LTDataset, _leftover_val, cache_dir, canonical_lt_indices, lt_class_counts


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
        raise DatasetError(f'{path} is not a readable CIFAR python file ({one_line(e)})') from None
    if not isinstance(d, dict):
        raise DatasetError(f'{path} is not a CIFAR python file (it holds a {type(d).__name__}, not a dict)')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_from_pickles(folder: Path, num_classes: int) -> dict:
    def to_hwc(data):
        return np.ascontiguousarray(rearrange(np.asarray(data, np.uint8), 'n (c h w) -> n h w c', c=3, h=32, w=32))
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




def _cifar_from_jpeg_pack(path: Path, cache_dir: Path) -> dict:
    """Decode a JPEG pack once; later runs read the decoded uint8 arrays from the cache (memory-mapped)."""
    st = path.stat()
    key = hashlib.sha1(f'{path.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:16]
    out = {}
    try:
        pack = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f'{path} is not a readable .npz file (truncated or corrupt?): {one_line(e)}') from None
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
        raise DatasetError(f'{pack}: {split} image {i} cannot be decoded ({one_line(e)}); the pack is damaged, '
                           f'check it against its checksum') from None
    return np.asarray(to_rgb(img))


def _find_cifar(cfg: DataConfig, num_classes: int) -> dict:
    if not cfg.root:
        raise DatasetError(f'{cfg.name} needs data.root: the folder with the official python release or the '
                           f'JPEG pack (e.g. data.root=/data/cifar10_jpeg.npz)')
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DatasetError(f'data.root does not exist: {root}')
    folder_name = 'cifar-10-batches-py' if num_classes == 10 else 'cifar-100-python'
    pack_name = 'cifar10_jpeg.npz' if num_classes == 10 else 'cifar100_jpeg.npz'
    if root.is_file() and root.suffix == '.npz':
        return _cifar_from_jpeg_pack(root, cache_dir(cfg))
    for cand in (root, root / folder_name):
        marker = 'data_batch_1' if num_classes == 10 else 'train'
        if (cand / marker).is_file():
            return _cifar_from_pickles(cand, num_classes)
    if (root / pack_name).is_file():
        return _cifar_from_jpeg_pack(root / pack_name, cache_dir(cfg))
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
