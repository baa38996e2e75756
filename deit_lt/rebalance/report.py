"""Reporting for the re-balancing tool: split accuracies per predictor, the console table, plots and W&B.

Split accuracies are `deit_lt.metrics.classification_report` (mean per-class accuracy inside head / mid / tail);
which classes form the groups (DeiT-LT class-index ranges or Decoupling's count thresholds) is the dataset's
`splits`, recorded in the report. Plots are written with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import WandbConfig
from ..metrics import classification_report
from ..tracking import RunLogger

__all__ = ['evaluate_predictors', 'format_table', 'plot_weight_norms', 'plot_tau_sweep', 'log_to_wandb']

_COLUMNS = ('top1', 'head', 'mid', 'tail')


def evaluate_predictors(logits: Mapping[str, torch.Tensor], targets: torch.Tensor,
                        groups: Mapping[str, Sequence[int]]) -> dict[str, dict[str, Any]]:
    """Per predictor: top1, top5, head, mid, tail, ece and per-class accuracy (confusion matrices left out: they
    grow as C^2)."""
    out = {}
    for name, z in logits.items():
        r = classification_report(z.float().cpu(), targets.cpu(), groups)
        r.pop('confusion')
        out[name] = r
    return out


def _fmt(v: float | None) -> str:
    return '   n/a' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:6.2f}'


def format_table(report: Mapping[str, Any], split: str = 'test') -> str:
    """The console table: one row per (method, predictor) with top-1 and head/mid/tail accuracy on `split`, the
    jointly trained model first; the last column is the tail change against the same predictor of the joint
    model (NCM rows compare with the joint model's best tail predictor)."""
    joint = report['joint'][split]
    best_joint_tail = max(v['tail'] for v in joint.values())
    rows = [('joint', name, r, None) for name, r in joint.items()]
    for method, res in report['methods'].items():
        for name, r in res[split].items():
            ref = joint[name]['tail'] if name in joint else best_joint_tail
            rows.append((method, name, r, r['tail'] - ref))
    head = f'{"method":<10} {"predictor":<9} ' + ' '.join(f'{c:>6}' for c in _COLUMNS) + f' {"d_tail":>7}'
    lines = [f'{split} split, {report["splits"]["description"]}', head, '-' * len(head)]
    for method, name, r, d in rows:
        delta = '' if d is None else f'{d:+7.2f}'
        lines.append(f'{method:<10} {name:<9} ' + ' '.join(_fmt(r.get(c)) for c in _COLUMNS) + f' {delta:>7}')
    return '\n'.join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_weight_norms(path: str | Path, train_counts: Sequence[int],
                      norms: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """||w_j|| against the training size n_j of class j, one panel per head, one line per classifier.

    Args:
        path: PNG file to write.
        train_counts: (C,) training images per class.
        norms: classifier label ('joint', 'crt', ...) -> head name -> (C,) weight norms.
    """
    plt = _pyplot()
    heads = list(dict.fromkeys(h for per in norms.values() for h in per))   # first-seen order
    counts = np.asarray(train_counts, dtype=float)
    order = np.argsort(-counts, kind='stable')
    fig, axes = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 4), squeeze=False)
    for ax, head in zip(axes[0], heads):
        for label, per in norms.items():
            if head in per:
                ax.plot(counts[order], np.asarray(per[head])[order], marker='o', ms=3, lw=1, label=label)
        ax.set_xscale('log')
        ax.set_xlabel('training images of the class (log)')
        ax.set_ylabel('classifier weight norm ||w_j||')
        ax.set_title(f'head: {head}')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tau_sweep(path: str | Path, val_sweep: Mapping[str, Any], test_sweep: Mapping[str, Any] | None,
                   taus: Mapping[str, float], grid: Sequence[float]) -> Path:
    """Accuracy against tau per head (val: selection curve, test: for reference; solid overall, dashed tail),
    the chosen tau marked, and for distilled students a heat map of the val accuracy of the averaged prediction."""
    plt = _pyplot()
    heads = list(val_sweep['heads'])
    panels = len(heads) + (1 if 'avg' in val_sweep else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for ax, head in zip(axes[0], heads):
        for label, sw, color in (('val', val_sweep, 'C0'), ('test', test_sweep, 'C1')):
            if not sw or head not in sw['heads']:
                continue
            rows = sw['heads'][head]
            t = [r['tau'] for r in rows]
            ax.plot(t, [r['acc'] for r in rows], color=color, label=f'{label} mean per-class acc')
            if 'tail' in rows[0]:
                ax.plot(t, [r['tail'] for r in rows], color=color, ls='--', label=f'{label} tail')
        ax.axvline(taus[head], color='k', lw=0.8, ls=':', label=f'chosen tau={taus[head]:g}')
        ax.set_xlabel('tau')
        ax.set_ylabel('accuracy (%)')
        ax.set_title(f'tau-norm sweep, head: {head}')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if 'avg' in val_sweep:
        ax = axes[0][-1]
        im = ax.imshow(np.asarray(val_sweep['avg']), origin='lower', aspect='auto', cmap='viridis',
                       extent=(grid[0], grid[-1], grid[0], grid[-1]) if len(grid) > 1 else None)
        ax.set_xlabel('tau (dist)')
        ax.set_ylabel('tau (cls)')
        ax.set_title('val accuracy of AVG')
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _flat_metrics(report: Mapping[str, Any], split: str = 'test') -> dict[str, float]:
    out = {}
    for method, per in [('joint', report['joint'][split])] + [(m, r[split]) for m, r in report['methods'].items()]:
        for pred, r in per.items():
            for c in _COLUMNS:
                out[f'{split}/{method}/{pred}/{c}'] = r[c]
    return out


def log_to_wandb(cfg: WandbConfig, output_dir: str | Path, config: Mapping[str, Any], report: Mapping[str, Any],
                 images: Mapping[str, Path]) -> str | None:
    """Log the report's numbers, a table and the plots through the project's `RunLogger` (offline by default);
    returns the W&B run folder, or None when disabled or wandb is missing.

    `mode=disabled` never imports wandb, so it works without the package installed.
    """
    if cfg.mode == 'disabled':
        return None
    logger = RunLogger(cfg, output_dir, dict(config), job_type='rebalance')
    try:
        scalars = _flat_metrics(report)
        logger.log(scalars, step=0)
        logger.log_summary(scalars)
        for key, path in images.items():
            logger.log_image(f'rebalance/{key}', path, step=0)
        if logger.run is not None:
            import wandb   # RunLogger only starts a run when wandb imports
            table = wandb.Table(columns=['method', 'predictor', *_COLUMNS])
            for name, r in report['joint']['test'].items():
                table.add_data('joint', name, *(r[c] for c in _COLUMNS))
            for method, res in report['methods'].items():
                for name, r in res['test'].items():
                    table.add_data(method, name, *(r[c] for c in _COLUMNS))
            logger.run.log({'rebalance/test': table}, step=0)
        return logger.wandb_dir
    finally:
        logger.finish()
