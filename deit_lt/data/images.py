"""Reading image files for the list and folder datasets: one RGB conversion for every path that reads them, a
fast existence check of many files, and the record of images skipped during training (`data.bad_images=skip`)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..checkpoint import atomic_write_text

# Missing or unreadable files named in one error message; the complete list goes to a file beside the cache.
MAX_LISTED = 20
# Written into the run folder by runs with data.bad_images=skip (rank r > 0: skipped_images.rank<r>.json).
SKIPPED_IMAGES_FILE = 'skipped_images.json'
# Skipped images announced one by one on stderr; after that only the JSON file lists them.
MAX_WARNED = 20

__all__ = ['MAX_LISTED', 'SKIPPED_IMAGES_FILE', 'one_line', 'to_rgb', 'open_rgb', 'decode_error', 'find_missing',
           'SkippedImages']


def one_line(e: BaseException) -> str:
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


def decode_error(path: str) -> str | None:
    """None if `path` decodes, else why not (one line)."""
    try:
        open_rgb(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...) for bad files
        return one_line(e)
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
