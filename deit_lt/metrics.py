"""Classification metrics for long-tailed evaluation: pure functions on tensors, shared by the teacher, the student
and the rebalancing tools.

Split accuracy follows DeiT-LT / Decoupling: the unweighted mean of per-class accuracies inside each class group
(on a balanced test set the overall top-1 equals the mean per-class accuracy). Calibration is the usual
equal-width-bin expected calibration error (Guo et al., 2017) on the max-softmax confidence.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

__all__ = ['topk_correct', 'topk_accuracy', 'confusion_matrix', 'per_class_accuracy', 'split_accuracy',
           'expected_calibration_error', 'calibration_error', 'classification_report', 'report_from_topk']


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample bool tensors: is the target among the top-k predictions (k clipped to the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == targets[:, None]
    return {k: hit[:, :min(k, maxk)].any(dim=1) for k in ks}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent."""
    return {k: 100.0 * v.float().mean().item() for k, v in topk_correct(logits, targets, ks).items()}


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) accuracy in percent of each class; NaN for a class without test samples."""
    cm = confusion_matrix(preds, targets, num_classes)
    support = cm.sum(1).double()
    acc = 100.0 * cm.diagonal().double() / support
    return torch.where(support > 0, acc, torch.full_like(acc, float('nan')))


def split_accuracy(class_acc: torch.Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Mean of per-class accuracies inside each group (NaN classes ignored; an empty group gives NaN)."""
    out = {}
    for name, idx in groups.items():
        vals = class_acc[list(idx)] if len(idx) else class_acc.new_empty(0)
        vals = vals[~torch.isnan(vals)]
        out[name] = vals.mean().item() if len(vals) else float('nan')
    return out


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """ECE in percent: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    conf, pred = probs.max(dim=1)
    return calibration_error(conf, pred == targets, n_bins)


def calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE in percent from per-sample max-probability confidences and correctness."""
    correct = correct.double()
    conf = conf.double()
    # bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 goes to the first bin
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)
    ece = conf.new_zeros(())
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.double().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return 100.0 * ece.item()


def classification_report(logits: torch.Tensor, targets: torch.Tensor, groups: Mapping[str, Sequence[int]],
                          ks: Sequence[int] = (1, 5), n_bins: int = 15) -> dict:
    """Everything reported for one predictor: top-k, per-class and split accuracy, ECE, confusion matrix."""
    logits = logits.float()
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    conf = logits.softmax(1).max(1).values
    return report_from_topk(top, conf, targets, logits.shape[1], groups, ks, n_bins)


def report_from_topk(top: torch.Tensor, conf: torch.Tensor, targets: torch.Tensor, num_classes: int,
                     groups: Mapping[str, Sequence[int]], ks: Sequence[int] = (1, 5), n_bins: int = 15) -> dict:
    """`classification_report` from the (N, k) top-k class ids and (N,) max-softmax confidences, which is all
    that needs gathering across processes (full logits of 8,142-class iNat would not be)."""
    hit = top == targets[:, None]
    preds = top[:, 0]
    class_acc = per_class_accuracy(preds, targets, num_classes)
    out = {f'top{k}': 100.0 * hit[:, :k].any(1).double().mean().item() for k in ks}
    # an empty group (e.g. no class has < 20 training images) has no accuracy: None, printed as '-'
    out.update({name: None if math.isnan(v) else v for name, v in split_accuracy(class_acc, groups).items()})
    out['ece'] = calibration_error(conf, preds == targets, n_bins)
    out['per_class'] = [None if torch.isnan(a) else round(a.item(), 4) for a in class_acc]
    out['confusion'] = confusion_matrix(preds, targets, num_classes).tolist()
    return out
