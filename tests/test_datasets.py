"""Long-tailed datasets: canonical CIFAR-LT subsets, list files, image folders, digits, splits, bad input."""
from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
import json

import numpy as np
import pytest
from PIL import Image

from conftest import CIFAR10_PACK, CIFAR100_LABELS, REPO, needs_cifar10, needs_cifar100_labels
from deit_lt.config import DataConfig
from deit_lt.data import (DatasetError, canonical_lt_indices, class_splits_from_counts, create_datasets,
                          lt_class_counts, parse_list_file)

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
    with pytest.raises(pickle.UnpicklingError, match='refusing'):
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
