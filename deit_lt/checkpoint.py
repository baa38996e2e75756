"""Checkpoints: model files that carry their own description, and atomic, resumable training states.

Model file (`*.safetensors`): the weights plus a JSON metadata record under the key `deit_lt` (kind: 'student',
'teacher', 'rebalanced' or 'ncm'; architecture and its keyword arguments, class count, input size and
normalisation, training class counts, class map, config). The
student, teacher and rebalancing tools all read and write this one format, so a file names everything needed to
rebuild the model. safetensors never executes code on load.

Training state (a folder under `<output_dir>/checkpoints/`): `model.safetensors`, `optimizer.pt` (tensors and
plain Python values only; loaded with `weights_only=True`) and `state.json` (epoch, step, best metric, ...).
Every write goes to a temporary name first and is renamed into place, and `latest` is updated only after the
folder is complete, so a run killed at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write weights + metadata to `path` (.safetensors) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(meta, format_version=FORMAT_VERSION)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    save_file(clean_state_dict(state_dict), str(tmp), metadata={META_KEY: json.dumps(record)})
    os.chmod(tmp, 0o644)   # safetensors creates files 0600; model files are meant to be shared
    os.replace(tmp, path)
    return path


def read_model_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The deit_lt metadata of a .safetensors file, or None for a safetensors file written by someone else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): {e}') from None
    if META_KEY not in meta:
        return None
    return json.loads(meta[META_KEY])


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a .safetensors model file: (state_dict, deit_lt metadata or None)."""
    meta = read_model_meta(path)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path}: cannot read the weights (truncated or corrupt?): {e}') from None
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
    final = root / tag
    tmp = root / f'.{tag}.{os.getpid()}.tmp'
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_file(tmp / 'model.safetensors', model_state, meta)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / 'optimizer.pt')
    (tmp / 'state.json').write_text(json.dumps(state, indent=1))
    if final.exists():  # re-saving the same tag: move the old one aside first, delete it only after the rename
        old = root / f'.{tag}.{os.getpid()}.old'
        os.replace(final, old)
        os.replace(tmp, final)
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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` points to, or None when the run has no checkpoint yet."""
    pointer = Path(output_dir) / 'checkpoints' / 'latest'
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
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
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{ckpt_dir / "state.json"} is corrupt: {e}') from None
    optimizer = None
    if (ckpt_dir / 'optimizer.pt').is_file():
        try:
            optimizer = torch.load(ckpt_dir / 'optimizer.pt', map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f'{ckpt_dir / "optimizer.pt"} cannot be read (truncated or corrupt?): {e}') from None
    return {'model': model, 'meta': meta, 'optimizer': optimizer, 'state': state}
