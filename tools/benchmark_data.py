"""How long building a large list dataset takes, with the existence check of every listed file, and its peak memory.

    python tools/benchmark_data.py                       # ImageNet-LT- and iNat-2018-sized lists in a temporary folder
    python tools/benchmark_data.py --keep /scratch/bench --sizes inat2018 --repeats 3

It writes list files of the sizes of the real ones (ImageNet-LT: 115,846 train / 20,000 val / 50,000 test entries,
1000 classes; iNaturalist 2018: 437,513 train / 24,426 val entries, 8142 classes; class sizes long-tailed from the
largest to the smallest real class) and one real directory entry per listed path: a hard link to one tiny PNG (a
small file per path where links are not possible), so the check stats as many distinct paths as on the real data.
Each build runs in a fresh process (`create_datasets` with data.verify=exists, then with data.verify=none for the
cost of the check alone); the figures are wall seconds and the peak resident memory of that process
(`resource.getrusage`), plus its resident memory after the imports, so the dataset's own share is visible.
The files were just written, so their metadata is in the page cache: on a network file system the first check
of a day can take longer (the stats run in threads to overlap the round trips: `deit_lt.data.images.find_missing`).
Not a timed test: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import numpy as np  # noqa: E402

# Entries per list and the largest / smallest training class of the real datasets (Liu et al., OLTR, CVPR 2019;
# iNaturalist 2018 competition lists as used by classifier-balancing and DeiT-LT).
SIZES = {
    'imagenet_lt': dict(classes=1000, train=115846, val=20000, test=50000, n_max=1280, n_min=5),
    'inat2018': dict(classes=8142, train=437513, val=None, test=24426, n_max=1000, n_min=2),
}
LIST_NAMES = {
    'imagenet_lt': dict(train='ImageNet_LT_train.txt', val='ImageNet_LT_val.txt', test='ImageNet_LT_test.txt'),
    'inat2018': dict(train='iNaturalist18_train.txt', test='iNaturalist18_val.txt'),
}


def long_tailed_counts(classes: int, total: int, n_max: int, n_min: int) -> np.ndarray:
    """Per-class sizes falling from n_max to n_min that sum to `total`: n_min + (n_max - n_min) * u^k over
    u = 1 .. 0, with k found by bisection and the rounding remainder spread over the largest classes."""
    u = np.linspace(1.0, 0.0, classes)

    def counts(k: float) -> np.ndarray:
        return np.floor(n_min + (n_max - n_min) * u ** k).astype(np.int64)
    lo, hi = 0.01, 1000.0
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if counts(mid).sum() > total else (lo, mid)
    out = counts(hi)
    rest = int(total - out.sum())    # hi gives at most `total`: one more image for the classes after the largest
    assert 0 <= rest < classes - 1
    out[1:1 + rest] += 1
    return out


def _link_or_write(source: Path, target: Path, data: bytes) -> None:
    try:
        os.link(source, target)
    except OSError:                  # file systems without hard links (or across devices): a small file per path
        target.write_bytes(data)


def generate(root: Path, name: str) -> dict:
    """Write the lists and one directory entry per listed path under root/name; returns what was made."""
    from PIL import Image
    spec = SIZES[name]
    base = root / name
    base.mkdir(parents=True, exist_ok=True)
    tiny = base / 'tiny.png'
    Image.new('RGB', (4, 4), (120, 60, 30)).save(tiny)
    data = tiny.read_bytes()
    t0 = time.perf_counter()
    made = {}
    for split, list_name in LIST_NAMES[name].items():
        n = spec[split]
        if split == 'train':
            counts = long_tailed_counts(spec['classes'], n, spec['n_max'], spec['n_min'])
        else:                        # evaluation lists: balanced over the classes
            counts = np.full(spec['classes'], n // spec['classes'])
            counts[:n - counts.sum()] += 1
        lines = []
        for c, k in enumerate(counts):
            folder = base / split / f'c{c:05d}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(int(k)):
                rel = f'{split}/c{c:05d}/{split}_{c:05d}_{i:05d}.png'
                _link_or_write(tiny, base / rel, data)
                lines.append(f'{rel} {c}\n')
        (base / list_name).write_text(''.join(lines))
        made[split] = len(lines)
    made['generate_s'] = round(time.perf_counter() - t0, 1)
    return made


def build(root: Path, name: str, verify: str) -> dict:
    """In this (fresh) process: build the dataset and report time and memory."""
    from deit_lt.config import DataConfig
    from deit_lt.data import create_datasets
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    names = LIST_NAMES[name]
    cfg = DataConfig(name=name, root=str(root / name), train_list=names['train'], val_list=names.get('val'),
                     test_list=names['test'], verify=verify)
    t0 = time.perf_counter()
    sets = create_datasets(cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {'dataset': name, 'verify': verify, 'entries': {k: len(v) for k, v in sets.items()},
            'seconds': round(seconds, 2), 'peak_rss_mib': round(peak / 1024, 1),
            'rss_after_imports_mib': round(rss_imports / 1024, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='imagenet_lt,inat2018', help='comma list of: ' + ', '.join(SIZES))
    p.add_argument('--keep', type=Path, default=None, help='generate into (or reuse) this folder and keep it')
    p.add_argument('--repeats', type=int, default=1, help='builds per dataset and setting (the best is reported)')
    p.add_argument('--build', nargs=3, metavar=('ROOT', 'NAME', 'VERIFY'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:                   # the child process of one measurement
        print(json.dumps(build(Path(args.build[0]), args.build[1], args.build[2])))
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix='deit_lt_bench_data_'))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    print(f'machine: {platform.node()}, {platform.processor() or platform.machine()}, '
          f'{len(os.sched_getaffinity(0))} usable cores; data in {root}', flush=True)
    try:
        for name in [s.strip() for s in args.sizes.split(',') if s.strip()]:
            if not (root / name / LIST_NAMES[name]['train']).is_file():
                made = generate(root, name)
                print(f'{name}: generated {made}', flush=True)
            for verify in ('exists', 'none'):
                runs = []
                for _ in range(args.repeats):
                    r = subprocess.run([sys.executable, __file__, '--build', str(root), name, verify],
                                       capture_output=True, text=True, env=env, check=True)
                    runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
                best = min(runs, key=lambda r: r['seconds'])
                total = sum(best['entries'].values())
                print(f'{name} ({total} entries: {best["entries"]}), data.verify={verify}: {best["seconds"]:.2f} s '
                      f'(best of {len(runs)}: {[r["seconds"] for r in runs]}), peak RSS {best["peak_rss_mib"]:.0f} '
                      f'MiB ({best["rss_after_imports_mib"]:.0f} MiB after imports)', flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
