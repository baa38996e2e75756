"""Figures of the analysis tool, drawn from the numbers of its JSON report (matplotlib, Agg backend: no display).

Every function takes the per-checkpoint results keyed by checkpoint label (in the order given on the command
line), writes one PNG atomically and returns its path.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ['plot_attention_distance', 'plot_feature_rank', 'plot_feature_spectrum', 'plot_expertise',
           'plot_classifier_norms', 'plot_reliability']

_SPLITS = ('overall', 'head', 'mid', 'tail')
_PRED_LABELS = {'cls': 'CLS', 'dist': 'DIST', 'avg': 'AVG', 'logits': 'logits', 'teacher': 'teacher'}


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f'.{path.stem}.{os.getpid()}.tmp{path.suffix}')
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _color(colors: Mapping[str, str] | None, label: str, i: int) -> str:
    """The checkpoint's colour: from `colors` (the same in every figure), else the i-th of the cycle."""
    return (colors or {}).get(label, f'C{i}')


def _nan(v: Any) -> float:
    return float('nan') if v is None else float(v)


def plot_attention_distance(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                            colors: Mapping[str, str] | None = None) -> Path:
    """Mean attention distance per block, one point per head, checkpoints side by side within each block; right:
    the share of patch-query attention that goes to the CLS / DIST tokens.

    Args:
        results: label -> `AttentionDistanceMeter.result()`.
        path: PNG to write.
        colors: label -> matplotlib colour.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    k = len(results)
    width = 0.8 / max(k, 1)
    max_blocks, top, uniform = 0, 0.0, set()
    for i, (label, r) in enumerate(results.items()):
        dist = np.asarray(r['distance'])          # (L, H)
        prefix = np.asarray(r['prefix_attention'])
        blocks = np.arange(1, len(dist) + 1)
        max_blocks = max(max_blocks, len(dist))
        x = blocks + (i - (k - 1) / 2) * width
        color = _color(colors, label, i)
        for ax, vals in ((axes[0], dist), (axes[1], prefix)):
            ax.scatter(np.repeat(x, vals.shape[1]), vals.reshape(-1), s=14, color=color, alpha=0.8,
                       label=f'{label} ({vals.shape[1]} heads)' if ax is axes[0] else label)
            ax.hlines(vals.mean(1), x - width * 0.4, x + width * 0.4, color=color, lw=1.5)
        top = max(top, r['max_distance'])
        if round(r['uniform_distance'], 6) not in uniform:   # one line per input geometry
            uniform.add(round(r['uniform_distance'], 6))
            axes[0].axhline(r['uniform_distance'], color='grey', ls=':', lw=1)
    first = next(iter(results.values()))
    size = 'x'.join(str(s) for s in first['image_size'])
    axes[0].set_title(f'mean attention distance (patch queries, {first["num_images"]} images)\n'
                      f'dotted: uniform attention; bar: mean over heads; input {size} px')
    axes[0].set_ylabel('distance (pixels)')
    axes[0].set_ylim(0, top * 1.02)   # 0 .. the largest distance between two patch centres
    axes[1].set_title('attention of patch queries to the CLS / DIST tokens')
    axes[1].set_ylabel('share of attention')
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel('block')
        ax.set_xticks(range(1, max_blocks + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _series(results: Mapping[str, Mapping[str, Any]]):
    for i, (label, r) in enumerate(results.items()):
        for j, (token, rows) in enumerate(r['tokens'].items()):
            yield i, j, label, token, r, rows


def plot_feature_rank(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                      colors: Mapping[str, str] | None = None) -> Path:
    """Numerical rank (left) and 99%-variance rank (right) of every token's features at every block / stage.

    Args:
        results: label -> `FeatureRecorder.result()`.
        path: PNG to write.
        colors: label -> matplotlib colour.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = ('-', '--', ':', '-.')
    for i, j, label, token, r, rows in _series(results):
        x = np.arange(1, len(rows) + 1)
        caps = [min(row['num_samples'] - (1 if r['center'] else 0), row['dim']) for row in rows]   # attainable
        cap = str(caps[0]) if min(caps) == max(caps) else f'{min(caps)}..{max(caps)}'
        name = f'{label} {token.upper() if token in ("cls", "dist") else token}'
        color = _color(colors, label, i)
        axes[0].plot(x, [row['rank'] for row in rows], marker='o', ms=4, color=color, ls=styles[j % 4],
                     label=f'{name} (max {cap})')
        axes[1].plot(x, [row['variance_rank'] for row in rows], marker='o', ms=4, color=color, ls=styles[j % 4],
                     label=name)
    first = next(iter(results.values()))
    n = first['tokens'][next(iter(first['tokens']))][0]['num_samples']
    axes[0].set_title(f'numerical rank: singular values > {first["rtol"]:g} x largest\n'
                      f'({n} images, features {"centred" if first["center"] else "not centred"})')
    axes[1].set_title(f'variance rank: components holding {100 * first["variance_fraction"]:g}% of the variance')
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel('block (transformers) / stage (CNNs)')
        ax.set_ylabel('rank')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_feature_spectrum(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Normalised singular-value spectra s_i / s_1: one panel per checkpoint and token, one line per block (darker =
    deeper), the numerical-rank tolerance as a dotted line.

    Args:
        results: label -> `FeatureRecorder.result()`.
        path: PNG to write.
    """
    plt = _pyplot()
    series = list(_series(results))
    cols = min(4, len(series))
    rows_n = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    cmap = plt.get_cmap('viridis_r')
    for ax, (_, _, label, token, r, rows) in zip(axes.flat, series):
        for s, (site, row) in enumerate(zip(r['sites'], rows)):
            spec = np.asarray(row['spectrum'])
            spec = np.where(spec > 0, spec, np.nan)
            ax.semilogy(np.arange(1, len(spec) + 1), spec, color=cmap(0.15 + 0.85 * s / max(1, len(rows) - 1)),
                        lw=1.2, label=site)
        ax.axhline(r['rtol'], color='k', ls=':', lw=0.8)
        ax.set_title(f'{label}: {token.upper() if token in ("cls", "dist") else token}', fontsize=10)
        ax.set_xlabel('component')
        ax.set_ylabel('s_i / s_1')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(series):]:
        ax.axis('off')
    return _save(fig, path)


def _grouped_bars(ax, groups: Sequence[str], values: Mapping[str, Sequence[float]]) -> None:
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(values))
    for i, (name, vals) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, [_nan(v) for v in vals], width, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis='y')


def plot_expertise(results: Mapping[str, Mapping[str, Any]], train_counts: Sequence[int],
                   groups: Mapping[str, Sequence[int]], path: str | os.PathLike) -> Path:
    """One column per checkpoint: split accuracy per predictor, per-class accuracy (training count on the right
    axis), and the agreement rates per split.

    Args:
        results: label -> `expertise_report(...)`.
        train_counts: (C,) training images per class.
        groups: split name -> class ids (boundaries drawn in the per-class panel).
        path: PNG to write.
    """
    plt = _pyplot()
    k = len(results)
    fig, axes = plt.subplots(3, k, figsize=(5.2 * k, 10), squeeze=False)
    c = len(train_counts)
    for col, (label, r) in enumerate(results.items()):
        acc = r['accuracy']
        _grouped_bars(axes[0, col], _SPLITS, {_PRED_LABELS.get(p, p): [a['top1']] + [a[s] for s in _SPLITS[1:]]
                                             for p, a in acc.items()})
        axes[0, col].set_title(f'{label}: accuracy (split = mean per-class)', fontsize=10)
        axes[0, col].set_ylabel('accuracy (%)')
        axes[0, col].legend(fontsize=7)
        ax = axes[1, col]
        for p, a in acc.items():
            ax.plot(np.arange(c), [_nan(v) for v in a['per_class']], marker='o', ms=3, lw=1,
                    label=_PRED_LABELS.get(p, p))
        for name in ('mid', 'tail'):
            if groups.get(name):
                ax.axvline(min(groups[name]) - 0.5, color='grey', ls='--', lw=0.8)
        ax.set_ylim(0, 102)
        ax.set_xlabel('class (label order)')
        ax.set_ylabel('accuracy (%)')
        ax.set_title('per-class accuracy; dashed: head | mid | tail', fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='lower left')
        twin = ax.twinx()
        twin.plot(np.arange(c), train_counts, color='black', lw=0.8, marker='.', alpha=0.5)
        twin.set_yscale('log')
        twin.set_ylabel('training images', fontsize=8)
        ax = axes[2, col]
        agree = r['agreement']
        if agree:
            _grouped_bars(ax, _SPLITS, {' vs '.join(_PRED_LABELS.get(p, p) for p in pair.split('_')):
                                        [a[s] for s in _SPLITS] for pair, a in agree.items()})
            ax.set_ylabel('agreement (% of samples)')
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, 'one head and no teacher:\nno agreement to measure', ha='center', va='center',
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title('top-1 agreement of two predictors', fontsize=10)
    return _save(fig, path)


def plot_classifier_norms(results: Mapping[str, Mapping[str, Any]], train_counts: Sequence[int],
                          path: str | os.PathLike, colors: Mapping[str, str] | None = None) -> Path:
    """Per-class weight norm against training count, one panel per head (CLS, DIST, CNN), one line per checkpoint
    (a model and its re-balanced version overlay), Spearman correlation in the legend.

    Args:
        results: label -> `classifier_norms(...)`.
        train_counts: (C,) training images per class.
        path: PNG to write.
        colors: label -> matplotlib colour.
    """
    plt = _pyplot()
    roles = list(dict.fromkeys(role for r in results.values() for role in r))
    fig, axes = plt.subplots(1, max(1, len(roles)), figsize=(5.2 * max(1, len(roles)), 4), squeeze=False)
    counts = np.asarray(train_counts, dtype=float)
    order = np.argsort(-counts, kind='stable')
    for ax, role in zip(axes[0], roles):
        for i, (label, r) in enumerate(results.items()):
            if role not in r:
                continue
            h = r[role]
            rho = h['spearman_norm_vs_count']
            name = f'{label} (cosine)' if h['type'] == 'cosine' else label
            ax.plot(counts[order], np.asarray(h['norms'])[order], marker='o', ms=4, lw=1,
                    color=_color(colors, label, i), label=f'{name}, rho={rho:+.2f}')
        ax.set_xscale('log')
        ax.set_xlabel('training images of the class (log)')
        ax.set_ylabel('||w_j||')
        ax.set_title(f'{role.upper() if role in ("cls", "dist", "cnn") else role} head: weight norm per class',
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not roles:
        axes[0, 0].text(0.5, 0.5, 'no linear heads', ha='center', va='center', transform=axes[0, 0].transAxes)
    return _save(fig, path)


def plot_reliability(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Reliability diagrams: one row per checkpoint, one panel per predictor; bars = accuracy per confidence bin
    (shade = share of samples), the diagonal = perfect calibration, ECE in the title.

    Args:
        results: label -> `calibration_report(...)`.
        path: PNG to write.
    """
    plt = _pyplot()
    cols = max(len(r) for r in results.values())
    fig, axes = plt.subplots(len(results), cols, figsize=(3.4 * cols, 3.2 * len(results)), squeeze=False)
    for row, (label, r) in enumerate(results.items()):
        for col, (pred, c) in enumerate(r.items()):
            ax = axes[row, col]
            edges = np.asarray(c['edges'])
            centres = (edges[:-1] + edges[1:]) / 2
            counts = np.asarray(c['count'], dtype=float)
            share = counts / max(1.0, counts.sum())
            acc = np.asarray([_nan(v) for v in c['accuracy']])
            colors = [(0.12, 0.47, 0.71, 0.25 + 0.75 * s / max(share.max(), 1e-12)) for s in share]
            ax.bar(centres, np.nan_to_num(acc), width=edges[1] - edges[0], color=colors, edgecolor='k', lw=0.3)
            ax.plot([0, 1], [0, 1], color='grey', ls='--', lw=0.8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f'{label}: {_PRED_LABELS.get(pred, pred)}, ECE {c["ece"]:.1f}%', fontsize=9)
            ax.set_xlabel('confidence')
            ax.set_ylabel('accuracy')
        for ax in axes[row, len(r):]:
            ax.axis('off')
    return _save(fig, path)
