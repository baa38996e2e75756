"""Which head is the expert of which classes: accuracy of CLS, DIST and AVG per split and per class, how often the
heads agree, and how often DIST follows the teacher.

DeiT-LT (Rangwani et al., CVPR 2024) argues that out-of-distribution distillation makes the CLS and DIST heads
diverse experts: CLS for the head classes, DIST (trained on the teacher's labels with DRW) for the tail. The
numbers behind that picture:

- accuracy per predictor ('cls', 'dist', 'avg' = (z_cls + z_dist) / 2 for distilled students, 'logits' for
  single-head models, 'teacher' when a teacher is given): overall top-1 over samples, per class, and per split as
  the mean of the per-class accuracies inside head / mid / tail (`deit_lt.metrics`, the DeiT-LT convention);
- agreement of two predictors: the percentage of samples on which their top-1 classes coincide, over all samples
  and over the samples whose true class is in each split (per class too). Agreement counts samples, not classes;
  on a class-balanced test set the two weightings give the same split numbers.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..metrics import per_class_accuracy, split_accuracy

__all__ = ['agreement', 'predictor_accuracy', 'expertise_report']


def agreement(preds_a: torch.Tensor, preds_b: torch.Tensor, targets: torch.Tensor, groups: Mapping[str, Sequence[int]],
              num_classes: int) -> dict:
    """Percentage of samples where two predictors pick the same class.

    Args:
        preds_a: (N,) class ids of the first predictor.
        preds_b: (N,) class ids of the second.
        targets: (N,) true classes (they only decide which split and class a sample counts for).
        groups: split name -> class ids.
        num_classes: C.

    Returns:
        {'overall': %, <split>: % over the samples of that split's classes (NaN if none), 'per_class': (C,) list
        (None for a class without samples)}.
    """
    same = (preds_a == preds_b).double()
    targets = targets.long()
    out = {'overall': 100.0 * same.mean().item() if len(same) else float('nan')}
    for name, idx in groups.items():
        m = torch.isin(targets, torch.as_tensor(list(idx), dtype=torch.long))
        out[name] = 100.0 * same[m].mean().item() if bool(m.any()) else float('nan')
    hits = torch.bincount(targets, weights=same, minlength=num_classes)
    support = torch.bincount(targets, minlength=num_classes).double()
    out['per_class'] = [None if n == 0 else 100.0 * h / n for h, n in zip(hits.tolist(), support.tolist())]
    return out


def predictor_accuracy(preds: torch.Tensor, targets: torch.Tensor, groups: Mapping[str, Sequence[int]],
                       num_classes: int) -> dict:
    """{'top1': % of samples, <split>: mean per-class % in the split, 'per_class': (C,) list (None if no samples)}."""
    class_acc = per_class_accuracy(preds, targets, num_classes)
    out = {'top1': 100.0 * (preds == targets).double().mean().item()}
    out.update(split_accuracy(class_acc, groups))
    out['per_class'] = [None if torch.isnan(a) else a.item() for a in class_acc]
    return out


def expertise_report(logits: Mapping[str, torch.Tensor], targets: torch.Tensor, groups: Mapping[str, Sequence[int]],
                     num_classes: int, teacher_logits: torch.Tensor | None = None) -> dict:
    """Accuracy of every predictor and the agreements that tell the experts apart.

    Args:
        logits: predictor name -> (N, C) logits ('cls', 'dist', 'avg' or 'logits').
        targets: (N,) true classes.
        groups: split name -> class ids.
        num_classes: C.
        teacher_logits: (N, C) logits of the teacher on the same images (in the student's label space), or None.

    Returns:
        {'accuracy': {predictor: predictor_accuracy}, 'agreement': {'cls_dist', 'dist_teacher', 'cls_teacher',
        'avg_teacher', 'logits_teacher' (those that apply): agreement}}.
    """
    targets = targets.long().cpu()
    preds = {name: z.argmax(1).cpu() for name, z in logits.items()}
    if teacher_logits is not None:
        preds['teacher'] = teacher_logits.argmax(1).cpu()
    report = {'accuracy': {name: predictor_accuracy(p, targets, groups, num_classes) for name, p in preds.items()},
              'agreement': {}}
    pairs = [('cls', 'dist')] + [(name, 'teacher') for name in ('dist', 'cls', 'avg', 'logits')]
    for a, b in pairs:
        if a in preds and b in preds:
            report['agreement'][f'{a}_{b}'] = agreement(preds[a], preds[b], targets, groups, num_classes)
    return report
