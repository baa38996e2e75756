"""Print the class counts, imbalance factor and head/mid/tail split of a long-tailed training set.

    python tools/dataset_stats.py --dataset digits_lt --imb-factor 10 --json
    python tools/dataset_stats.py --config configs/digits_lt/deit_lt.yaml --plot hist.png
    python tools/dataset_stats.py --dataset cifar10_lt --root /data/cifar10_jpeg.npz --imb-factor 100
    python tools/dataset_stats.py --config configs/cifar10_lt/deit_lt_ldam_if100.yaml --root /data/cifar10_jpeg.npz \\
        --save-indices kept.npy
    python tools/dataset_stats.py --dataset imagenet_lt --root /data/imagenet data.list_dir=/data/lists --plot hist.png

With `--config`, the data section of a training config is used; `--root`, `--dataset`, `--imb-factor` and dotted
`data.*` overrides (e.g. data.val_per_class=20) replace its values. The shipped CIFAR configs say `root: data` (a
`data/` folder in the working directory), so give `--root` (or `data.root=`) where your copy is; digits_lt needs
no root. `--save-indices` writes the indices of the kept training images into the original training set
(increasing order); `--json` prints the same facts as JSON (keys include `counts`, by class index, and
`num_samples`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from deit_lt.cli import run_tool  # noqa: E402
from deit_lt.config import (DataConfig, TrainConfig, apply_overrides, from_dict,  # noqa: E402
                            load_yaml_with_bases)
from deit_lt.data import create_datasets  # noqa: E402
from deit_lt.errors import ConfigError, DatasetError  # noqa: E402


def build_data_config(args) -> DataConfig:
    """The data section: the config file's, then --dataset / --root / --imb-factor, then `data.*` overrides.

    Raises:
        DatasetError: data.root is set but does not exist (the message names where the value came from and the
            options that set it).
    """
    raw = {}
    if args.config:
        raw = load_yaml_with_bases(args.config).get('data', {})
    from_config = raw.get('root')
    flags = {'name': args.dataset, 'root': args.root, 'imb_factor': args.imb_factor}
    raw.update({k: v for k, v in flags.items() if v is not None})
    overrides = [o if o.startswith('data.') else f'data.{o}' for o in args.overrides]
    raw = apply_overrides({'data': raw}, overrides, schema=TrainConfig)['data']
    cfg = from_dict(DataConfig, raw, prefix='data.')
    if cfg.root and not Path(cfg.root).expanduser().exists():
        origin = f' (from {args.config})' if cfg.root == from_config and args.root is None else ''
        raise DatasetError(f'data.root {cfg.root!r}{origin} does not exist (working directory {Path.cwd()}); give '
                           f'--root PATH or data.root=PATH pointing at the {cfg.name} data')
    return cfg


def stats(cfg: DataConfig) -> tuple[dict, np.ndarray | None]:
    data = create_datasets(cfg)
    tr = data['train']
    counts = tr.class_counts
    group_of = {c: g for g, idx in tr.splits.groups.items() for c in idx}
    info = {
        'dataset': cfg.name, 'imb_factor_config': cfg.imb_factor, 'num_classes': tr.num_classes,
        'num_samples': int(len(tr)), 'counts': counts.tolist(),
        'imbalance_factor': float(counts.max() / max(counts[counts > 0].min(), 1)),
        'class_names': tr.class_names, 'split': tr.splits.as_dict(),
        'split_counts': {g: {'classes': len(idx), 'images': int(counts[idx].sum()) if idx else 0}
                         for g, idx in tr.splits.groups.items()},
        'group_of_class': [group_of.get(c) for c in range(tr.num_classes)],
        'test_samples': int(len(data['test'])), 'val_samples': int(len(data['val'])) if 'val' in data else 0,
    }
    return info, tr.source_indices


def print_table(info: dict, limit: int = 50) -> None:
    print(f'{info["dataset"]}: {info["num_samples"]} training images, {info["num_classes"]} classes, '
          f'imbalance factor {info["imbalance_factor"]:.2f}; test {info["test_samples"]}'
          + (f', val {info["val_samples"]}' if info['val_samples'] else ''))
    print(f'head/mid/tail ({info["split"]["mode"]}): {info["split"]["description"]}')
    for g, v in info['split_counts'].items():
        print(f'  {g:<5} {v["classes"]:>6} classes {v["images"]:>9} images')
    print(f'{"class":>6}  {"name":<20}{"count":>8}  group')
    n = info['num_classes']
    show = range(n) if n <= limit else list(range(limit // 2)) + list(range(n - limit // 2, n))
    prev = -1
    for c in show:
        if c != prev + 1:
            print(f'{"...":>6}')
        print(f'{c:>6}  {str(info["class_names"][c])[:19]:<20}{info["counts"][c]:>8}  {info["group_of_class"][c]}')
        prev = c


def plot_histogram(info: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {'head': 'tab:blue', 'mid': 'tab:orange', 'tail': 'tab:red', None: 'grey'}
    ax.bar(range(info['num_classes']), info['counts'], color=[colors[g] for g in info['group_of_class']], width=1.0)
    ax.set_yscale('log')
    ax.set_xlabel('class index')
    ax.set_ylabel('training images')
    ax.set_title(f'{info["dataset"]}: {info["num_samples"]} images, IF {info["imbalance_factor"]:.0f}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', help='a training config; its data section is used')
    p.add_argument('--dataset', help='dataset name (cifar10_lt, cifar100_lt, imagenet_lt, inat2018, places_lt, '
                                     'image_list, image_folder, digits_lt)')
    p.add_argument('--root', help='data root (folder or CIFAR JPEG pack)')
    p.add_argument('--imb-factor', type=float, help='imbalance factor n_max/n_min (CIFAR-LT, digits_lt)')
    p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    p.add_argument('--save-indices', type=Path, help='write kept training indices (increasing) to this .npy')
    p.add_argument('--plot', type=Path, help='write a class histogram PNG')
    p.add_argument('overrides', nargs='*', help='data.* overrides, e.g. data.val_per_class=20')
    args = p.parse_args(argv)
    cfg = build_data_config(args)
    info, indices = stats(cfg)
    if args.save_indices:
        if indices is None:
            raise ConfigError(f'--save-indices: {cfg.name} is read from list files; its training set is the list '
                              f'itself')
        np.save(args.save_indices, np.sort(indices))
    if args.plot:
        plot_histogram(info, args.plot)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print_table(info)
        if args.save_indices:
            print(f'kept indices -> {args.save_indices}')
        if args.plot:
            print(f'histogram -> {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
