"""Checkpoints: model files that carry their own description, and atomic, resumable training states.

Model file (`*.safetensors`): the weights plus a JSON metadata record under the key `deit_lt` (kind: 'student',
'teacher', 'rebalanced' or 'ncm'; architecture and its keyword arguments, class count, input size and
normalisation, training class counts, class map, config). The
student, teacher and rebalancing tools all read and write this one format, so a file names everything needed to
rebuild the model. safetensors never executes code on load.

Training state (a folder under `<output_dir>/checkpoints/`): `model.safetensors`, `optimizer.pt` (tensors and
plain Python values only; loaded with `weights_only=True`) and `state.json` (epoch, step, best metric, ...).
Every write goes to a temporary name first and is renamed into place, and `latest` is updated only after the
folder is complete, so a run killed at any moment leaves the previous checkpoint intact. A write that fails (a full
disk, a quota, a file-size limit) removes its temporary files and raises `CheckpointError` with one line that says
what was kept and what to do; temporary files a killed run left behind are removed before the next write.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import CheckpointError

__all__ = ['CheckpointError', 'clean_state_dict', 'save_model_file', 'load_model_file', 'read_model_meta',
           'save_training_state', 'load_training_state', 'latest_checkpoint', 'atomic_write_text']

META_KEY = 'deit_lt'
FORMAT_VERSION = 1


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` from DDP/DataParallel, `_orig_mod.` from torch.compile) and copy tensors
    to contiguous CPU memory (safetensors refuses shared or strided storage)."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ('_orig_mod.', 'module.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        k = k.replace('._orig_mod.', '.')
        out[k] = v.detach().to('cpu').contiguous().clone()
    return out


# What a failed write raises: the OS (ENOSPC, EDQUOT, EFBIG), safetensors (its own error type wrapping the OS error)
# and torch.save (RuntimeError from its zip writer).
_WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _brief(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut to `limit` characters (torch's unpickling errors run to paragraphs)."""
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + '...'


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f'{shutil.disk_usage(p).free / 2 ** 30:.1f} GiB free there'
            except OSError:
                break
    return 'free space unknown'


# errno -> what it means for the user; safetensors and torch report the OS error only as text, matched below.
_CAUSES = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is used up',
           errno.EFBIG: 'a file-size limit was hit', errno.EROFS: 'the file system is read-only',
           errno.EACCES: 'the folder is not writable', errno.EPERM: 'the folder is not writable'}
_CAUSE_TEXT = {'no space left': errno.ENOSPC, 'quota': errno.EDQUOT, 'file too large': errno.EFBIG,
               'read-only': errno.EROFS, 'permission denied': errno.EACCES}


def _cause(error: BaseException) -> str:
    code = getattr(error, 'errno', None)
    if code not in _CAUSES:
        text = str(error).lower()
        code = next((c for t, c in _CAUSE_TEXT.items() if t in text), None)
    return _CAUSES.get(code, 'the write failed (a full disk, a quota or a file-size limit are the usual causes)')


def _write_failed(what: Path, error: BaseException, kept: str) -> CheckpointError:
    """The one-line error of a failed write: what failed, why, what is still valid, what to do."""
    return CheckpointError(f'writing {what} failed: {_cause(error)} ({type(error).__name__}: {_brief(error)}; '
                           f'{_free_space(what.parent)}). {kept}; free space (or fix the limit or permissions) and '
                           f'rerun with runtime.resume=auto')


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale(folder: Path, prefix: str) -> None:
    """Remove temporary files or folders `<prefix>*.tmp` / `*.old` that a killed writer left in `folder`. One run
    writes a folder at a time (its main process), so any of them found before a write is stale; removing them first
    also frees their space before the new write needs it."""
    if folder.is_dir():
        for p in folder.glob(f'{prefix}*'):
            if p.name.endswith(('.tmp', '.old')):
                _remove(p)


@contextlib.contextmanager
def _temporary(path: Path, kept: str) -> Iterator[Path]:
    """A temporary name beside `path` for the body to write; removed and turned into a CheckpointError if the write
    fails. The caller renames it into place."""
    _remove_stale(path.parent, f'.{path.name}.')
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        yield tmp
    except _WRITE_ERRORS as e:
        _remove(tmp)
        raise _write_failed(path, e, kept) from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `path` through a temporary file and a rename: readers see the old or the new text, never a part."""
    path = Path(path)
    with _temporary(path, f'{path.name} keeps its previous content') as tmp:
        tmp.write_text(text)
        os.replace(tmp, path)


def save_model_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write weights + metadata to `path` (.safetensors) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = clean_state_dict(state_dict)   # outside the write: a device error here is not a write failure
    with _temporary(path, f'{path.name} keeps its previous version, if it had one') as tmp:
        _write_model(tmp, tensors, meta)
        os.replace(tmp, path)
    return path


def _write_model(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    record = dict(meta, format_version=FORMAT_VERSION)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(record)})
    os.chmod(path, 0o644)   # safetensors creates files 0600; model files are meant to be shared


def read_model_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The deit_lt metadata of a .safetensors file, or None for a safetensors file written by someone else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): '
                              f'{_brief(e)}') from None
    if META_KEY not in meta:
        return None
    try:
        record = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path}: its deit_lt metadata is not valid JSON ({_brief(e)})') from None
    if not isinstance(record, dict):
        raise CheckpointError(f'{path}: its deit_lt metadata is not a mapping')
    return record


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a .safetensors model file: (state_dict, deit_lt metadata or None)."""
    meta = read_model_meta(path)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path}: cannot read the weights (truncated or corrupt?): {_brief(e)}') from None
    return sd, meta


# --------------------------------------------------------------------------------------------------------------
# Resumable training state
# --------------------------------------------------------------------------------------------------------------

def save_training_state(output_dir: str | os.PathLike, tag: str, *, model_state: dict[str, torch.Tensor],
                        meta: dict[str, Any], optimizer_state: dict | None, state: dict[str, Any],
                        keep: int = 1) -> Path:
    """Write `<output_dir>/checkpoints/<tag>/` atomically, point `latest` at it, and prune older ones.

    Only call from the main process. `state` must be JSON-serialisable.
    """
    root = Path(output_dir) / 'checkpoints'
    root.mkdir(parents=True, exist_ok=True)
    _recover(root)
    _remove_stale(root, '.')
    tensors = clean_state_dict(model_state)
    final = root / tag
    previous = (root / 'latest').read_text().strip() if (root / 'latest').is_file() else None
    kept = (f'checkpoints/latest still names the previous checkpoint {previous}, which is intact' if previous
            else 'there was no earlier checkpoint')
    with _temporary(final, kept) as tmp:
        tmp.mkdir()
        _write_model(tmp / 'model.safetensors', tensors, meta)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / 'optimizer.pt')
        (tmp / 'state.json').write_text(json.dumps(state, indent=1))
        if final.exists():  # re-saving the same tag: move the old one aside first, delete it only after the rename
            old = root / f'.{tag}.{os.getpid()}.old'
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    atomic_write_text(root / 'latest', tag + '\n')
    if keep > 0:
        tags = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')),
                      key=lambda p: p.stat().st_mtime)
        for p in tags[:-keep]:
            if p.name != tag:
                shutil.rmtree(p, ignore_errors=True)
    return final


def _recover(root: Path) -> None:
    """Put back a checkpoint folder that a writer killed between its two renames left only as `.<tag>.<pid>.old`
    (re-saving an existing tag moves the old folder aside before the new one takes its name)."""
    for old in root.glob('.*.old'):
        tag = old.name[1:].rsplit('.', 2)[0]
        if old.is_dir() and not (root / tag).exists():
            with contextlib.suppress(OSError):   # every rank may look at once: one rename wins, the rest find none
                os.replace(old, root / tag)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` points to, or None when the run has no checkpoint yet."""
    pointer = Path(output_dir) / 'checkpoints' / 'latest'
    if not pointer.is_file():
        return None
    _recover(pointer.parent)
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{pointer} cannot be read ({type(e).__name__}: {e}); remove it to start over') from None
    if not name or '/' in name or name.startswith('.'):
        raise CheckpointError(f'{pointer} does not name a checkpoint folder ({name[:60]!r}); remove it to start over')
    path = pointer.parent / name
    if not path.is_dir():
        raise CheckpointError(f'{pointer} names {path.name}, which does not exist; remove {pointer} to start over')
    return path


def load_training_state(ckpt_dir: str | os.PathLike, map_location: str | torch.device = 'cpu') -> dict[str, Any]:
    """Read a training-state folder: {'model': state_dict, 'meta': ..., 'optimizer': ..., 'state': ...}."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / 'model.safetensors').is_file() or not (ckpt_dir / 'state.json').is_file():
        raise CheckpointError(f'{ckpt_dir} is not a training checkpoint (needs model.safetensors and state.json)')
    model, meta = load_model_file(ckpt_dir / 'model.safetensors')
    try:
        state = json.loads((ckpt_dir / 'state.json').read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{ckpt_dir / "state.json"} is corrupt: {_brief(e)}') from None
    if not isinstance(state, dict):
        raise CheckpointError(f'{ckpt_dir / "state.json"} is corrupt: not a mapping')
    optimizer = None
    if (ckpt_dir / 'optimizer.pt').is_file():
        try:
            optimizer = torch.load(ckpt_dir / 'optimizer.pt', map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f'{ckpt_dir / "optimizer.pt"} cannot be read (truncated or corrupt?): '
                                  f'{_brief(e)}') from None
    return {'model': model, 'meta': meta, 'optimizer': optimizer, 'state': state}
