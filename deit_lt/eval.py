"""Evaluation of any model the project builds, with one report format for every tool.

Predictors (`deit_lt.models.factory.model_predictors`): a distilled student gives CLS, DIST and AVG =
(z_cls + z_dist) / 2 (raw logits averaged, as DeiT-LT reports); a multi-expert CNN gives the ensemble ('logits')
and each expert ('expert0', ...); any other model its logits. Each predictor gets top-1/top-5, head/mid/tail
(mean per-class accuracy inside each group), per-class accuracy, ECE and the confusion matrix. Under several
processes every rank evaluates its shard and only top-k ids and confidences are gathered.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping, Sequence

import torch
from torch import nn

from .data.pipeline import EvalBatches
from .metrics import report_from_topk
from .models.factory import model_predictors, unwrap_model
from .progress import Progress

__all__ = ['collect_predictions', 'evaluate', 'compact_report', 'format_report', 'HEADLINE_METRICS']

HEADLINE_METRICS = ('top1', 'top5', 'head', 'mid', 'tail')


@torch.no_grad()
def collect_predictions(model: nn.Module, batches: EvalBatches, *, k: int = 5,
                        autocast: Callable[[], ContextManager] | None = None,
                        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        progress: Progress | None = None,
                        logit_adjust: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, torch.Tensor]:
    """Run `model` over `batches` in eval mode.

    `logit_adjust` ({name: (C,) offsets}) adds the predictor '<predictor>_<name>' = logits + offsets for every
    predictor but single experts (post-hoc logit adjustment).

    Returns ({predictor: (top-k ids (N, k), max-softmax confidence (N,))}, targets (N,)) on the CPU, in dataset
    order.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {}
    targets, used = [], []
    router = getattr(unwrap_model(model), 'router', None)
    ctx = autocast or contextlib.nullcontext
    try:
        for x, y in batches:
            with ctx():
                outs = model_predictors(model, x)
                if router is not None:   # a multi-expert model with an expert router (RIDE): its routed prediction
                    outs['routed'], experts = unwrap_model(model).forward_routed(x)
                    used.append(experts.float())
            base = {name: z for name, z in outs.items() if not name.startswith('expert')}
            for suffix, offset in (logit_adjust or {}).items():
                outs |= {f'{name}_{suffix}': z.float() + offset.to(z.device) for name, z in base.items()}
            for name, z in outs.items():
                z = z.float()
                parts.setdefault(name, []).append((z.topk(min(k, z.shape[1]), dim=1).indices, z.softmax(1).amax(1)))
            targets.append(y)
            if progress is not None:
                progress.update()
    finally:
        model.train(was_training)
    gather = gather or (lambda t: t)
    n_total = batches.num_total
    preds = {}
    for name, items in parts.items():
        top = gather(torch.cat([p[0] for p in items]))[:n_total].cpu()
        conf = gather(torch.cat([p[1] for p in items]))[:n_total].cpu()
        preds[name] = (top, conf)
    if used:   # experts each sample went through under routed inference
        preds['_experts_used'] = gather(torch.cat(used))[:n_total].cpu()
    return preds, gather(torch.cat(targets))[:n_total].cpu()


def evaluate(model: nn.Module, batches: EvalBatches, groups: Mapping[str, Sequence[int]], num_classes: int, *,
             autocast: Callable[[], ContextManager] | None = None,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str = 'eval',
             show_progress: bool = False, logit_adjust: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Full report per predictor (`metrics.report_from_topk`), the CLS/DIST agreement of students (% of images on
    which the two heads predict the same class) and the number of images."""
    with Progress(len(batches), desc, unit='batch', enabled=show_progress) as progress:
        preds, targets = collect_predictions(model, batches, autocast=autocast, gather=gather, progress=progress,
                                             logit_adjust=logit_adjust)
    used = preds.pop('_experts_used', None)
    report = {n: report_from_topk(top, conf, targets, num_classes, groups) for n, (top, conf) in preds.items()}
    if used is not None:
        report['experts_used'] = used.mean().item()
    if 'cls' in preds and 'dist' in preds:
        report['agreement'] = 100.0 * (preds['cls'][0][:, 0] == preds['dist'][0][:, 0]).double().mean().item()
    report['num_samples'] = int(len(targets))
    return report


def compact_report(report: dict) -> dict:
    """A report without confusion matrices (for logs, checkpoint metadata and report.json)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != 'confusion'} if isinstance(v, dict) else v)
            for k, v in report.items()}


def _cell(v) -> str:
    return f'{v:8.2f}' if isinstance(v, (int, float)) and v == v else f'{"-":>8}'


def format_report(report: dict, title: str = '') -> str:
    """Console table of one split's report: a row per predictor with top-1 / top-5 / head / mid / tail; groups
    without classes print as '-'."""
    lines = [title] if title else []
    lines.append(f'  {"predictor":<10}' + ''.join(f'{m:>8}' for m in HEADLINE_METRICS))
    for name, r in report.items():
        if isinstance(r, dict):
            lines.append(f'  {name.upper():<10}' + ''.join(_cell(r.get(m)) for m in HEADLINE_METRICS))
    if 'agreement' in report:
        lines.append(f'  CLS-DIST agreement {report["agreement"]:.1f}%')
    return '\n'.join(lines)
