"""Long-tailed datasets: canonical CIFAR-LT subsets, list files, image folders, digits, splits, validation splits
that never shrink the training subset, up-front file checks, the bad-image policy on both loaders, RGB conversion."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import torch

from conftest import CIFAR10_PACK, CIFAR100_LABELS, REPO, needs_cifar10, needs_cifar100_labels
from deit_lt.config import AugConfig, ConfigError, DataConfig
from deit_lt.data import (DatasetError, canonical_lt_indices, class_splits_from_counts, create_datasets,
                          lt_class_counts, parse_list_file)
from deit_lt.data.digits import DIGITS_VAL_RESERVE
from deit_lt.data.images import MAX_LISTED, SKIPPED_IMAGES_FILE, find_missing
from deit_lt.data.lists import read_list_file
from deit_lt.data.pipeline import create_eval_batches, create_train_batches
from deit_lt.data.samplers import create_sampler

C10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
C10_IF50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]


def _reference_lt_indices(labels, counts):
    """The construction exactly as LDAM-DRW / DeiT-LT write it: global legacy RNG, seed 0, shuffle per class."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        kept = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n])
        return np.sort(np.concatenate(kept))
    finally:
        np.random.set_state(state)


def test_lt_counts_formula():
    assert lt_class_counts(5000, 10, 100) == C10_IF100
    assert lt_class_counts(5000, 10, 50) == C10_IF50
    assert lt_class_counts(5000, 10, 1) == [5000] * 10
    c100 = lt_class_counts(500, 100, 100)
    assert sum(c100) == 10847 and (c100[34], c100[35], c100[69], c100[70], c100[-1]) == (102, 98, 20, 19, 5)
    assert sum(lt_class_counts(500, 100, 50)) == 12608
    with pytest.raises(DatasetError, match='>= 1'):
        lt_class_counts(5000, 10, 0.5)


@needs_cifar10
def test_cifar10_lt_if100_real_pack_counts_and_canonical_subset(tmp_path):
    data = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK), imb_factor=100))
    tr, te = data['train'], data['test']
    assert tr.class_counts.tolist() == C10_IF100 and len(tr) == 12406
    assert len(te) == 10000 and te.class_counts.tolist() == [1000] * 10
    labels = np.load(CIFAR10_PACK)['train_labels']
    ref = _reference_lt_indices(labels, C10_IF100)
    assert np.array_equal(tr.source_indices, ref)
    # pin the subset itself, so a change of construction (or of the data's order) is caught
    assert hashlib.sha256(ref.astype(np.int64).tobytes()).hexdigest()[:16] == 'f7669c469c9ddf9a'
    assert tr.source_indices[:5].tolist() == [9, 10, 29, 30, 35]
    assert np.array_equal(tr.targets, labels[tr.source_indices])
    assert tr.images.shape == (12406, 32, 32, 3) and tr.images.dtype == np.uint8
    assert tr.splits.groups == {'head': [0, 1, 2], 'mid': [3, 4, 5, 6], 'tail': [7, 8, 9]}


@needs_cifar10
def test_cifar10_lt_if50_if1_and_decode_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('DEIT_LT_CACHE', str(tmp_path / 'cache'))
    d50 = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK.parent), imb_factor=50))
    assert d50['train'].class_counts.tolist() == C10_IF50 and len(d50['train']) == 13996
    cached = sorted((tmp_path / 'cache').glob('*.npy'))
    assert len(cached) == 2  # train and test decoded once
    d1 = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK), imb_factor=1))
    assert d1['train'].class_counts.tolist() == [5000] * 10
    # the cached decode equals a fresh PIL decode
    pack = np.load(CIFAR10_PACK)
    j, o = pack['train_jpeg'], pack['train_offsets']
    import io
    i = int(d1['train'].source_indices[123])
    fresh = np.asarray(Image.open(io.BytesIO(j[o[i]:o[i + 1]].tobytes())).convert('RGB'))
    assert np.array_equal(d1['train'].images[123], fresh)


def _write_cifar_pickles(folder, images_hwc, labels, num_classes, test_images, test_labels):
    folder.mkdir(parents=True)
    def dump(name, data, labs):
        flat = images_to_rows(data)
        key = 'labels' if num_classes == 10 else 'fine_labels'
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': flat, key.encode(): list(map(int, labs))}, f, protocol=2)
    def images_to_rows(x):
        return x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    if num_classes == 10:
        n = len(labels) // 5
        for b in range(5):
            dump(f'data_batch_{b + 1}', images_hwc[b * n:(b + 1) * n], labels[b * n:(b + 1) * n])
        dump('test_batch', test_images, test_labels)
    else:
        dump('train', images_hwc, labels)
        dump('test', test_images, test_labels)


@needs_cifar10
def test_official_python_release_reader_matches_pack(tmp_path):
    pack = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK), imb_factor=1))
    labels = np.load(CIFAR10_PACK)['train_labels']
    full = np.zeros((50000, 32, 32, 3), np.uint8)
    full[pack['train'].source_indices] = pack['train'].images
    _write_cifar_pickles(tmp_path / 'cifar-10-batches-py', full, labels, 10, pack['test'].images[:100],
                         pack['test'].targets[:100])
    d = create_datasets(DataConfig(name='cifar10_lt', root=str(tmp_path), imb_factor=100))
    ref = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK), imb_factor=100))
    assert np.array_equal(d['train'].source_indices, ref['train'].source_indices)
    assert np.array_equal(d['train'].images, ref['train'].images)
    assert len(d['test']) == 100


@needs_cifar100_labels
def test_cifar100_lt_counts_from_official_layout(tmp_path):
    lab = np.load(CIFAR100_LABELS)
    tr, te = lab['train_fine_labels'], lab['test_fine_labels']
    _write_cifar_pickles(tmp_path / 'cifar-100-python', np.zeros((len(tr), 32, 32, 3), np.uint8), tr, 100,
                         np.zeros((len(te), 32, 32, 3), np.uint8), te)
    d = create_datasets(DataConfig(name='cifar100_lt', root=str(tmp_path), imb_factor=100))
    counts = d['train'].class_counts
    assert len(d['train']) == 10847 and counts[0] == 500 and counts[-1] == 5
    assert np.array_equal(d['train'].source_indices, _reference_lt_indices(tr, lt_class_counts(500, 100, 100)))
    assert d['train'].splits.groups['head'] == list(range(36)) and d['train'].splits.groups['tail'][0] == 71
    assert len(d['test']) == 10000
    d50 = create_datasets(DataConfig(name='cifar100_lt', root=str(tmp_path), imb_factor=50, split='threshold'))
    assert len(d50['train']) == 12608
    g = d50['train'].splits.groups
    assert all(d50['train'].class_counts[c] > 100 for c in g['head'])
    assert all(d50['train'].class_counts[c] < 20 for c in g['tail'])


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    with open(folder / 'data_batch_1', 'wb') as f:
        pickle.dump({b'data': Evil(), b'labels': []}, f)
    with pytest.raises(DatasetError, match='refusing to load builtins.print'):
        create_datasets(DataConfig(name='cifar10_lt', root=str(tmp_path)))


def test_digits_lt_real_small_dataset():
    d = create_datasets(DataConfig(name='digits_lt', imb_factor=10, val_per_class=10))
    tr = d['train']
    assert tr.images.shape[1:] == (8, 8, 1) and tr.in_chans == 1
    counts = tr.class_counts
    assert counts.tolist() == lt_class_counts(int(counts[0]), 10, 10)
    assert d['test'].class_counts.tolist() == [40] * 10 and d['val'].class_counts.tolist() == [10] * 10
    # no image is in two splits
    s = [set(d[k].source_indices.tolist()) for k in ('train', 'val', 'test')]
    assert not (s[0] & s[1]) and not (s[0] & s[2]) and not (s[1] & s[2])
    assert tr.images.max() == 255 and tr.images.min() == 0


def _make_image_folder(root, counts, size=12, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for c, n in enumerate(counts):
        (root / 'img' / f'c{c}').mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = f'img/c{c}/{i}.png'
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / p)
            lines.append(f'{p} {c}')
    return lines


def test_list_file_dataset_sorted_classes_and_map(tmp_path):
    counts = [3, 9, 1, 5]   # class 1 is the largest
    lines = _make_image_folder(tmp_path, counts)
    (tmp_path / 'train.txt').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'test.txt').write_text('\n'.join(l for l in lines if l.endswith(' 2') or l.endswith(' 0')) + '\n')
    cfg = DataConfig(name='image_list', root=str(tmp_path), train_list='train.txt', test_list='test.txt',
                     split='threshold', many_threshold=4, few_threshold=2)
    d = create_datasets(cfg)
    tr = d['train']
    # ranks by descending count: original 1 -> 0, 3 -> 1, 0 -> 2, 2 -> 3
    assert tr.class_map.tolist() == [2, 0, 3, 1]
    assert tr.class_counts.tolist() == [9, 5, 3, 1]
    assert tr.class_names == ['1', '3', '0', '2']
    assert sorted(d['test'].class_counts.tolist()) == [0, 0, 1, 3]
    assert d['test'].class_counts[2] == 3 and d['test'].class_counts[3] == 1
    img, y = tr[0]
    assert img.size == (12, 12) and isinstance(y, int)
    assert tr.splits.groups == {'head': [0, 1], 'mid': [2], 'tail': [3]}
    unsorted = create_datasets(DataConfig(name='image_list', root=str(tmp_path), train_list='train.txt',
                                          test_list='test.txt', sort_classes=False, split='threshold'))
    assert unsorted['train'].class_map is None and unsorted['train'].class_counts.tolist() == counts
    pre = create_datasets(DataConfig(name='image_list', root=str(tmp_path), train_list='train.txt',
                                     test_list='test.txt', preload=True, preload_size=6, split='threshold'))
    assert pre['train'][0][0].size == (6, 6)


def test_image_folder_dataset(tmp_path):
    for split, counts in (('train', [4, 2]), ('test', [2, 2])):
        for c, n in zip(('cat', 'dog'), counts):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (8, 8), (i * 10, 0, 0)).save(tmp_path / split / c / f'{i}.jpg')
    d = create_datasets(DataConfig(name='image_folder', root=str(tmp_path), split='threshold'))
    assert d['train'].class_counts.tolist() == [4, 2] and d['train'].class_names == ['cat', 'dog']
    assert len(d['test']) == 4


def test_list_file_errors(tmp_path):
    lines = _make_image_folder(tmp_path, [2, 2])
    (tmp_path / 'bad.txt').write_text(lines[0] + '\n' + 'just_a_path.png\n')
    with pytest.raises(DatasetError, match=r'bad\.txt:2: expected'):
        parse_list_file(tmp_path / 'bad.txt')
    (tmp_path / 'nonint.txt').write_text('a.png x\n')
    with pytest.raises(DatasetError, match=r'nonint\.txt:1: label'):
        parse_list_file(tmp_path / 'nonint.txt')
    (tmp_path / 'range.txt').write_text('a.png 0\nb.png 7\n')
    with pytest.raises(DatasetError, match=r'range\.txt:2: label 7 outside the class range 0\.\.4'):
        parse_list_file(tmp_path / 'range.txt', num_classes=5)
    (tmp_path / 'train.txt').write_text('\n'.join(lines) + '\n')
    (tmp_path / 'test.txt').write_text(lines[0] + '\nimg/c0/0.png 5\n')
    with pytest.raises(DatasetError, match=r'test\.txt:2: label 5'):
        create_datasets(DataConfig(name='image_list', root=str(tmp_path), train_list='train.txt',
                                   test_list='test.txt'))
    with pytest.raises(DatasetError, match='list file not found'):
        create_datasets(DataConfig(name='image_list', root=str(tmp_path), train_list='nope.txt',
                                   test_list='test.txt'))
    # ImageNet-LT has 1000 classes: a label of 1000 is out of range
    (tmp_path / 'ImageNet_LT_train.txt').write_text('img/c0/0.png 1000\n')
    with pytest.raises(DatasetError, match='outside the class range 0..999'):
        create_datasets(DataConfig(name='imagenet_lt', root=str(tmp_path)))


def test_bad_dataset_options(tmp_path):
    with pytest.raises(DatasetError, match='unknown dataset'):
        create_datasets(DataConfig(name='cifar10'))
    with pytest.raises(DatasetError, match='imb_factor must be >= 1'):
        create_datasets(DataConfig(name='digits_lt', imb_factor=0.5))
    with pytest.raises(DatasetError, match='does not exist'):
        create_datasets(DataConfig(name='cifar10_lt', root=str(tmp_path / 'missing')))
    with pytest.raises(DatasetError, match='needs data.root'):
        create_datasets(DataConfig(name='cifar10_lt'))
    with pytest.raises(DatasetError, match='no CIFAR-10 data'):
        create_datasets(DataConfig(name='cifar10_lt', root=str(tmp_path)))


def test_threshold_splits_by_hand():
    s = class_splits_from_counts([500, 101, 100, 20, 19, 1])
    assert s.groups == {'head': [0, 1], 'mid': [2, 3], 'tail': [4, 5]}


def test_canonical_indices_do_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    canonical_lt_indices(np.repeat(np.arange(3), 10), [10, 5, 2])
    assert np.array_equal(np.random.get_state()[1], before)


def test_dataset_stats_tool_json_and_indices(tmp_path):
    out = tmp_path / 'kept.npy'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'dataset_stats.py'), '--dataset', 'digits_lt',
                        '--imb-factor', '10', '--json', '--save-indices', str(out), '--plot', str(tmp_path / 'h.png')],
                       capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    d = create_datasets(DataConfig(name='digits_lt', imb_factor=10))
    assert info['counts'] == d['train'].class_counts.tolist() and info['num_samples'] == len(d['train'])
    kept = np.load(out)
    assert np.all(np.diff(kept) > 0) and np.array_equal(kept, np.sort(d['train'].source_indices))
    assert (tmp_path / 'h.png').stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(REPO / 'tools' / 'dataset_stats.py'), '--dataset', 'digits_lt',
                          'data.imb_factr=3'], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config key 'data.imb_factr'" in bad.stderr and 'imb_factor' in bad.stderr


# --------------------------------------------------------------------------------------------------------------
# Validation splits never shrink the long-tailed training subset
# --------------------------------------------------------------------------------------------------------------

def test_digits_val_split_leaves_the_training_split_alone():
    base = create_datasets(DataConfig(name='digits_lt', imb_factor=10))['train']
    assert base.class_counts.tolist() == [114, 88, 68, 52, 40, 31, 24, 19, 14, 11]
    for k in (5, DIGITS_VAL_RESERVE):
        d = create_datasets(DataConfig(name='digits_lt', imb_factor=10, val_per_class=k))
        assert np.array_equal(d['train'].source_indices, base.source_indices)
        assert d['val'].class_counts.tolist() == [k] * 10
        assert not set(d['val'].source_indices) & set(base.source_indices)
    # more than the reserve: the leftovers of the training pools; digit 0 (the largest class) has only 4 of them
    with pytest.warns(UserWarning, match=r'digits 0 \(24\).*training split is unchanged'):
        d = create_datasets(DataConfig(name='digits_lt', imb_factor=10, val_per_class=30))
    assert np.array_equal(d['train'].source_indices, base.source_indices)
    assert d['val'].class_counts.tolist() == [24] + [30] * 9
    assert not set(d['val'].source_indices) & (set(base.source_indices) | set(d['test'].source_indices))


@needs_cifar10
def test_cifar_val_split_only_from_leftovers():
    ref = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK), imb_factor=100))['train']
    with pytest.warns(UserWarning, match=r'classes 0 \(0\)'):
        d = create_datasets(DataConfig(name='cifar10_lt', root=str(CIFAR10_PACK), imb_factor=100, val_per_class=50))
    # class 0 keeps all 5000 images at any imbalance factor: none left for validation, and the subset is untouched
    assert np.array_equal(d['train'].source_indices, ref.source_indices)
    assert d['train'].class_counts.tolist() == C10_IF100
    assert d['val'].class_counts.tolist() == [0] + [50] * 9
    assert not set(d['val'].source_indices.tolist()) & set(ref.source_indices.tolist())
    labels = np.load(CIFAR10_PACK)['train_labels']
    assert np.array_equal(d['val'].targets, labels[d['val'].source_indices])


def test_val_per_class_refused_for_list_and_folder_datasets(tmp_path):
    lines = _make_image_folder(tmp_path, [3, 2])
    (tmp_path / 'train.txt').write_text('\n'.join(lines) + '\n')
    with pytest.raises(ConfigError, match='training list is the subset itself.*data.val_list'):
        create_datasets(DataConfig(name='image_list', root=str(tmp_path), train_list='train.txt',
                                   test_list='train.txt', val_per_class=1))
    with pytest.raises(ConfigError, match='a val/ folder'):
        create_datasets(DataConfig(name='image_folder', root=str(tmp_path), val_per_class=1))


# --------------------------------------------------------------------------------------------------------------
# Up-front checks of list datasets
# --------------------------------------------------------------------------------------------------------------

def _list_dataset(root, counts, **cfg):
    """An image_list dataset of tiny PNGs with train.txt = every image, test.txt = the first of each class."""
    lines = _make_image_folder(root, counts, size=6)
    (root / 'train.txt').write_text('# comment line\n' + '\n'.join(lines) + '\n')
    firsts = [next(l for l in lines if l.endswith(f' {c}')) for c in range(len(counts))]
    (root / 'test.txt').write_text('\n'.join(firsts) + '\n')
    return DataConfig(name='image_list', root=str(root), train_list='train.txt', test_list='test.txt',
                      split='threshold', sort_classes=False, **cfg), lines


def test_missing_files_are_all_named_by_list_file_and_line(tmp_path):
    cfg, lines = _list_dataset(tmp_path, [4, 3])
    (tmp_path / 'img' / 'c0' / '2.png').unlink()           # train.txt line 4 (line 1 is a comment)
    (tmp_path / 'img' / 'c1' / '0.png').unlink()           # train.txt line 6 and test.txt line 2
    with pytest.raises(DatasetError) as e:
        create_datasets(cfg)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('3 of 9 listed images do not exist')
    assert 'train.txt:4: ' in msg and 'train.txt:6: ' in msg and 'test.txt:2: ' in msg and 'c1/0.png' in msg
    # verify=none trusts the lists (only the first file is looked at)
    assert len(create_datasets(dataclasses.replace(cfg, verify='none'))['train']) == 7


def test_many_missing_files_are_capped_in_the_message_and_listed_in_full(tmp_path):
    cfg, _ = _list_dataset(tmp_path, [2])
    extra = [f'gone/{i}.png 0' for i in range(MAX_LISTED + 5)]
    (tmp_path / 'train.txt').write_text((tmp_path / 'train.txt').read_text() + '\n'.join(extra) + '\n')
    with pytest.raises(DatasetError, match=rf'{MAX_LISTED + 5} of {MAX_LISTED + 8} listed.*\.\.\. 5 more \(all '
                                           rf'{MAX_LISTED + 5} in ') as e:
        create_datasets(cfg)
    full = str(e.value).rsplit(' in ', 1)[1].rstrip(')')
    assert len(open(full).read().splitlines()) == MAX_LISTED + 5


def test_find_missing_threads_agree(tmp_path):
    paths = [str(tmp_path / f'{i}') for i in range(50)]
    for i in range(0, 50, 3):
        open(paths[i], 'w').close()
    (tmp_path / 'dir').mkdir()
    paths.append(str(tmp_path / 'dir'))                   # a folder is not an image file
    expect = [i for i in range(51) if i % 3 or i == 50]
    assert find_missing(paths, threads=1) == expect == find_missing(paths, threads=4, chunk=7)


def _corrupt(root, rel, kind):
    path = root / rel
    if kind == 'garbage':
        path.write_bytes(b'this is not an image')
    else:   # a JPEG cut in half: the header reads, the decode fails
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(path.with_suffix('.jpg'), quality=90)
        data = path.with_suffix('.jpg').read_bytes()
        path.write_bytes(data[:len(data) // 2])


def test_decode_check_names_bad_files_or_records_the_skip(tmp_path):
    cfg, _ = _list_dataset(tmp_path, [4, 3], verify='decode')
    _corrupt(tmp_path, 'img/c0/1.png', 'garbage')            # train.txt:3
    _corrupt(tmp_path, 'img/c1/2.png', 'truncated')          # train.txt:8
    assert len(create_datasets(dataclasses.replace(cfg, verify='exists'))['train']) == 7   # exists: fine
    with pytest.raises(DatasetError) as e:
        create_datasets(cfg)
    msg = str(e.value)
    assert msg.startswith('2 of 9 listed images cannot be decoded') and '\n' not in msg
    assert 'train.txt:3: ' in msg and 'train.txt:8: ' in msg and 'data.bad_images=skip' in msg
    d = create_datasets(dataclasses.replace(cfg, bad_images='skip'))
    tr = d['train']
    assert len(tr.skipped) == 2 and len(tr) == 7   # nothing removed: replaced
    tr.skipped.attach(tmp_path / 'run')
    rec = json.loads((tmp_path / 'run' / SKIPPED_IMAGES_FILE).read_text())
    assert rec['count'] == 2 and [r['where'].split(': ')[0][-11:] for r in rec['images']] == ['train.txt:3',
                                                                                                 'train.txt:8']
    assert rec['images'][0]['used_instead'].endswith('img/c0/2.png')       # the next image of class 0
    assert rec['images'][1]['used_instead'].endswith('img/c1/0.png')       # wraps around inside class 1
    img, used = tr.read(1)
    assert used == 2 and np.array_equal(np.asarray(img), np.asarray(tr.read(2)[0]))


def _loader(ds, workers, **aug):
    cfg = AugConfig(crop='none', hflip=0.5, rand_augment=None, re_prob=0.0, repeated_aug=1, num_workers=workers,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **aug)
    return create_train_batches(ds, cfg, img_size=6, batch_size=4, device='cpu', seed=3, placement='loader',
                                sampler=create_sampler('instance', ds.targets, seed=3), drop_last=False)


@pytest.mark.parametrize('workers', [0, 1])
def test_bad_image_met_in_training_stops_with_list_file_and_line(tmp_path, workers):
    cfg, _ = _list_dataset(tmp_path, [4, 3])
    _corrupt(tmp_path, 'img/c1/1.png', 'garbage')            # train.txt:7
    ds = create_datasets(cfg)['train']
    with pytest.raises(DatasetError) as e:
        for _ in _loader(ds, workers).iter_epoch(0):
            pass
    msg = str(e.value)
    assert '\n' not in msg and 'Traceback' not in msg
    assert msg.startswith(f'{tmp_path}/train.txt:7: {tmp_path}/img/c1/1.png: cannot read this image')


def test_skip_policy_keeps_batches_deterministic_and_writes_its_list(tmp_path):
    cfg, _ = _list_dataset(tmp_path, [5, 4], bad_images='skip')
    clean = _loader(create_datasets(cfg)['train'], 0)
    _corrupt(tmp_path, 'img/c0/3.png', 'truncated')          # train.txt:5
    runs = {}
    for workers in (0, 1):
        ds = create_datasets(cfg)['train']
        batches = _loader(ds, workers)
        batches.attach_run_dir(tmp_path / f'run{workers}')
        runs[workers] = [b for e in (0, 1) for b in batches.iter_epoch(e)]
        rec = json.loads((tmp_path / f'run{workers}' / SKIPPED_IMAGES_FILE).read_text())
        assert rec['count'] == 1 and rec['images'][0]['where'].startswith(f'{tmp_path}/train.txt:5: ')
        assert rec['images'][0]['used_instead'].endswith('img/c0/4.png') and rec['images'][0]['reason']
        # resuming at step 1 of epoch 1 regenerates exactly what the uninterrupted run read
        resumed = list(batches.iter_epoch(1, start_step=1))
        assert all(torch.equal(a.x, b.x) for a, b in zip(resumed, runs[workers][len(batches) + 1:]))
    reference = [b for e in (0, 1) for b in clean.iter_epoch(e)]
    for a, b, r in zip(runs[0], runs[1], reference):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.x.shape == r.x.shape
    ds = create_datasets(cfg)['train']
    assert ds.read(3)[1] == 4          # sample 3 (class 0) is read from sample 4, the next image of its class


def test_skip_policy_in_evaluation(tmp_path):
    cfg, lines = _list_dataset(tmp_path, [3, 3], bad_images='skip')
    (tmp_path / 'test.txt').write_text('\n'.join(lines[1:]) + '\n')
    _corrupt(tmp_path, 'img/c1/0.png', 'garbage')            # test.txt:3
    d = create_datasets(cfg)
    d['test'].skipped.attach(tmp_path / 'run')
    ev = create_eval_batches(d['test'], AugConfig(num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3), img_size=6,
                             batch_size=8, device='cpu', crop_pct=1.0, placement='loader')
    (x, y), = list(ev)
    assert x.shape == (5, 3, 6, 6) and y.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(x[2], x[3])    # test sample 2 (c1/0.png) was read from the next one of class 1
    rec = json.loads((tmp_path / 'run' / SKIPPED_IMAGES_FILE).read_text())
    assert [r['split'] for r in rec['images']] == ['test'] and rec['images'][0]['where'].split(': ')[0].endswith(
        'test.txt:3') and rec['images'][0]['used_instead'].endswith('c1/1.png')
    # one readable image per class is needed: with none left, the run stops with a clear message
    (tmp_path / 'test.txt').write_text(lines[3] + '\n' + lines[0] + '\n')
    d = create_datasets(cfg)
    ev = create_eval_batches(d['test'], AugConfig(num_workers=0), img_size=6, batch_size=8, device='cpu',
                             crop_pct=1.0, placement='loader')
    with pytest.raises(DatasetError, match=r'no image of class 1 \(1\) in the test split can be read'):
        list(ev)


# --------------------------------------------------------------------------------------------------------------
# Every file becomes RGB the same way on every reading path
# --------------------------------------------------------------------------------------------------------------

def test_image_modes_convert_to_rgb_alike_when_read_lazily_or_preloaded(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    grey16 = (grey.astype(np.uint16) * 257)
    alpha = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    pal = Image.fromarray(grey).convert('P')
    pal_t = pal.copy()
    pal_t.info['transparency'] = int(np.asarray(pal)[0, 0])
    images = {
        'rgb.png': (Image.fromarray(rgb), rgb),
        'l.png': (Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)),
        'la.png': (Image.fromarray(np.dstack([grey, alpha]), 'LA'), np.repeat(grey[..., None], 3, 2)),
        'rgba.png': (Image.fromarray(np.dstack([rgb, alpha]), 'RGBA'), rgb),   # alpha dropped, colours kept
        'p.png': (pal, np.asarray(pal.convert('RGB'))),
        'pt.png': (pal_t, np.asarray(pal.convert('RGB'))),                      # transparency changes nothing
        'cmyk.tif': (Image.fromarray(rgb).convert('CMYK'), np.asarray(Image.fromarray(rgb).convert('CMYK')
                                                                      .convert('RGB'))),
        'g16.png': (Image.fromarray(grey16), np.repeat(grey[..., None], 3, 2)),  # scaled, not clipped to white
        'bw.png': (Image.fromarray(grey > 127), np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, 2)),
    }
    for name, (img, _) in images.items():
        img.save(tmp_path / name)
    (tmp_path / 'train.txt').write_text(''.join(f'{n} 0\n' for n in images))
    cfg = DataConfig(name='image_list', root=str(tmp_path), train_list='train.txt', test_list='train.txt',
                     split='threshold', verify='decode')
    lazy = create_datasets(cfg)['train']
    pre = create_datasets(dataclasses.replace(cfg, preload=True))['train']
    for i, (name, (_, expect)) in enumerate(images.items()):
        a, b = lazy[i][0], pre[i][0]
        assert a.mode == b.mode == 'RGB', name
        assert np.array_equal(np.asarray(a), expect) and np.array_equal(np.asarray(b), expect), name


def test_read_list_file_reports_lines_and_bad_encoding(tmp_path):
    (tmp_path / 'a.txt').write_text('# header\n\nx.png 1\n  y z.png 0  \n')
    paths, labels, lines = read_list_file(tmp_path / 'a.txt')
    assert paths == ['x.png', 'y z.png'] and labels.tolist() == [1, 0] and lines.tolist() == [3, 4]
    (tmp_path / 'b.txt').write_bytes(b'x.png 0\n\xff\xfe 1\n')
    with pytest.raises(DatasetError, match='not a text list file'):
        read_list_file(tmp_path / 'b.txt')


def test_corrupt_cifar_pack_is_a_dataset_error(tmp_path):
    (tmp_path / 'cifar10_jpeg.npz').write_bytes(b'PK\x03\x04 truncated zip')
    with pytest.raises(DatasetError, match='not a readable .npz file'):
        create_datasets(DataConfig(name='cifar10_lt', root=str(tmp_path / 'cifar10_jpeg.npz')))


def test_skip_policy_run_writes_its_list_into_the_run_folder(tmp_path, monkeypatch):
    import importlib.util

    from deit_lt.cli import run_tool
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    cfg, _ = _list_dataset(tmp_path, [5, 4])
    _corrupt(tmp_path, 'img/c1/2.png', 'garbage')            # train.txt:9
    spec = importlib.util.spec_from_file_location('_skip_train_tool', REPO / 'tools' / 'train.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'run'
    code = run_tool(tool.main, [
        'data.name=image_list', f'data.root={tmp_path}', 'data.train_list=train.txt', 'data.test_list=train.txt',
        'data.split=threshold', 'data.bad_images=skip', 'model.name=deit_micro_distilled_patch2_8',
        'model.img_size=8', 'distill.type=none', 'distill.drw_epoch=null', 'optim.epochs=1', 'optim.batch_size=3',
        'optim.accum_steps=1', 'optim.sched=multistep', 'aug.mixup=0', 'aug.cutmix=0', 'aug.repeated_aug=1',
        'aug.num_workers=0', 'aug.rand_augment=null', 'runtime.progress=false', 'runtime.compile=off',
        'wandb.mode=disabled', f'runtime.output_dir={out}'])
    assert code == 0
    rec = json.loads((out / SKIPPED_IMAGES_FILE).read_text())
    assert rec['count'] >= 1 and {r['where'].split(': ')[0][-11:] for r in rec['images']} == {'train.txt:9'}
