"""Evaluation: CLS, DIST and their average for students; the logits of single-head models (teachers, ViT).

DeiT-LT reports three predictors of a distilled student: the CLS head, the DIST head and AVG = (z_cls + z_dist) / 2
(raw logits averaged), each with top-1/top-5 and head/mid/tail accuracy (mean per-class accuracy in each group).
Under several processes every rank evaluates its shard; only top-k ids and confidences are gathered.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from .data.pipeline import EvalBatches
from .metrics import report_from_topk
from .models.factory import is_distilled, model_outputs

__all__ = ['collect_predictions', 'evaluate', 'summary_row']


@torch.no_grad()
def collect_predictions(model: nn.Module, batches: EvalBatches, *, k: int = 5,
                        autocast: Callable[[], ContextManager] | None = None,
                        gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict, torch.Tensor]:
    """Run `model` over `batches` in eval mode.

    Returns ({predictor: (top-k ids (N, k), max-softmax confidence (N,))}, targets (N,)) on the CPU, in dataset
    order. Predictors: 'cls', 'dist', 'avg' for distilled students, 'logits' otherwise.
    """
    was_training = model.training
    model.eval()
    distilled = is_distilled(model)
    names = ('cls', 'dist', 'avg') if distilled else ('logits',)
    parts: dict[str, list] = {n: [] for n in names}
    targets = []
    ctx = autocast or contextlib.nullcontext
    try:
        for x, y in batches:
            with ctx():
                if distilled:
                    z_cls, z_dist = model_outputs(model, x)
                    outs = {'cls': z_cls, 'dist': z_dist, 'avg': (z_cls + z_dist) / 2}
                else:
                    outs = {'logits': model(x)}
            for n, z in outs.items():
                z = z.float()
                parts[n].append((z.topk(min(k, z.shape[1]), dim=1).indices, z.softmax(1).amax(1)))
            targets.append(y)
    finally:
        model.train(was_training)
    gather = gather or (lambda t: t)
    n_total = batches.num_total
    preds = {}
    for n in names:
        top = gather(torch.cat([p[0] for p in parts[n]]))[:n_total].cpu()
        conf = gather(torch.cat([p[1] for p in parts[n]]))[:n_total].cpu()
        preds[n] = (top, conf)
    return preds, gather(torch.cat(targets))[:n_total].cpu()


def evaluate(model: nn.Module, batches: EvalBatches, groups: Mapping[str, Sequence[int]], num_classes: int, *,
             autocast: Callable[[], ContextManager] | None = None,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Full report per predictor (see `metrics.report_from_topk`), plus CLS/DIST agreement for students."""
    preds, targets = collect_predictions(model, batches, autocast=autocast, gather=gather)
    report = {n: report_from_topk(top, conf, targets, num_classes, groups) for n, (top, conf) in preds.items()}
    if 'cls' in preds:
        report['agreement'] = 100.0 * (preds['cls'][0][:, 0] == preds['dist'][0][:, 0]).double().mean().item()
    report['num_samples'] = int(len(targets))
    return report


def summary_row(report: dict, predictor: str) -> dict[str, float]:
    """The headline numbers of one predictor: top1, top5, head, mid, tail."""
    r = report[predictor]
    return {k: r[k] for k in ('top1', 'top5', 'head', 'mid', 'tail')}
