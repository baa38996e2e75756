"""ImageNet-LT, iNaturalist-2018, Places-LT and any image folder: list files (`relative/path label` per line) or
`root/<split>/<class>/` folders, classes optionally renumbered by descending training count, every listed file
checked before training (`data.verify`)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write_text
from ..config import DataConfig
from ..errors import DatasetError
from ..progress import Progress

from .images import MAX_LISTED, SkippedImages, decode_error, find_missing, one_line
from .lt_datasets import _LIST_DEFAULTS, LTDataset, cache_dir


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
        raise DatasetError(f'cannot read list file {path}: {one_line(e)}') from None
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
    target = cache_dir(cfg) / f'{kind}-{key[:12]}.txt'
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
        found = ((p, decode_error(p)) for p in unique[start:start + chunk])
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
    list_dir = cache_dir(cfg) / ('lists-' + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12])
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
