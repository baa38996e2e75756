"""digits_lt: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download) with a balanced test
split and an exponentially long-tailed training split; the embedded default for the quickstart and the tests."""
from __future__ import annotations

import warnings

import numpy as np

from ..config import DataConfig
from ..errors import DatasetError

from .lt_datasets import LTDataset, lt_class_counts


# Images per digit set aside for validation before the long-tailed subset is drawn: the training split is then the
# same whatever data.val_per_class is (up to this many, validation is balanced; above, it takes leftovers).
DIGITS_VAL_RESERVE = 20


def _build_digits(cfg: DataConfig) -> dict[str, LTDataset]:
    """Each digit's images, shuffled (legacy RNG, seed 0), are cut into test (`test_per_class`), a validation reserve
    (`DIGITS_VAL_RESERVE`) and the training pool; the long-tailed subset takes the first n_c of each pool, with n_max
    the smallest pool. Validation takes the reserve first, then pool images the subset left out (too few for the
    largest class: a warning, as for CIFAR)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    targets = d.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test, reserve, pools = [], [], []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        n_hold = cfg.test_per_class + DIGITS_VAL_RESERVE
        if n_hold >= len(idx):
            raise DatasetError(f'digits_lt: data.test_per_class must be < {len(idx) - DIGITS_VAL_RESERVE} (digit {c} '
                               f'has {len(idx)} images, {DIGITS_VAL_RESERVE} of them kept for validation)')
        test.append(idx[:cfg.test_per_class])
        reserve.append(idx[cfg.test_per_class:n_hold])
        pools.append(idx[n_hold:])
    n_max = min(len(p) for p in pools)
    counts = lt_class_counts(n_max, 10, cfg.imb_factor)
    kept = np.sort(np.concatenate([p[:n] for p, n in zip(pools, counts)]))
    names = [str(i) for i in range(10)]
    out = {'train': LTDataset(name='digits_lt', split='train', targets=targets[kept], num_classes=10,
                              class_names=names, images=images[kept], source_indices=kept)}
    if cfg.val_per_class > 0:
        val, short = [], []
        for c in range(10):
            spare = np.concatenate([reserve[c], pools[c][counts[c]:]])
            val.append(spare[:cfg.val_per_class])
            if len(spare) < cfg.val_per_class:
                short.append(f'{c} ({len(spare)})')
        if short:
            warnings.warn(f'digits_lt: data.val_per_class={cfg.val_per_class} is more than digits {", ".join(short)} '
                          f'have outside the training split (shown in brackets); the validation split has only '
                          f'those for them. The training split is unchanged.', stacklevel=3)
        v = np.sort(np.concatenate(val))
        out['val'] = LTDataset(name='digits_lt', split='val', targets=targets[v], num_classes=10, class_names=names,
                               images=images[v], source_indices=v)
    t = np.sort(np.concatenate(test))
    out['test'] = LTDataset(name='digits_lt', split='test', targets=targets[t], num_classes=10, class_names=names,
                            images=images[t], source_indices=t)
    return out
