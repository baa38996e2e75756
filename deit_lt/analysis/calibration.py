"""Calibration per head: reliability diagram bins and expected calibration error (Guo et al., "On Calibration of
Modern Neural Networks", ICML 2017).

Confidence is the max-softmax probability of each predictor's logits. The bins are those of
`deit_lt.metrics.calibration_error` (equal width, bin b holds confidences in (b/n, (b+1)/n], a confidence of 0 goes
to the first), and the ECE is that function's value, so the diagram and the reported ECE agree with every other
deit-lt report. A cosine-head teacher outputs cosines in [-1, 1]; its logits are multiplied by the scale it was
trained with (LDAM's s = 30, the checkpoint's `logit_scale`) before the softmax, otherwise its confidences would
all sit near 1/C.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..metrics import calibration_error

__all__ = ['reliability_bins', 'calibration_report']


def reliability_bins(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> dict:
    """Per-bin statistics of a reliability diagram.

    Args:
        conf: (N,) max-softmax confidences in [0, 1].
        correct: (N,) bool, whether the top-1 prediction is right.
        n_bins: equal-width bins on [0, 1].

    Returns:
        {'edges': (n_bins + 1,), 'count': (n_bins,), 'accuracy': (n_bins,) in [0, 1] (None for an empty bin),
        'confidence': (n_bins,) mean confidence (None for an empty bin)}.
    """
    conf = conf.detach().double().cpu()
    correct = correct.detach().double().cpu()
    bins = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)   # as metrics.calibration_error
    count = torch.bincount(bins, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    nonzero = count > 0
    return {
        'edges': [b / n_bins for b in range(n_bins + 1)],
        'count': count.tolist(),
        'accuracy': [(a / n) if ok else None for a, n, ok in zip(acc_sum.tolist(), count.tolist(), nonzero.tolist())],
        'confidence': [(c / n) if ok else None
                       for c, n, ok in zip(conf_sum.tolist(), count.tolist(), nonzero.tolist())],
    }


def calibration_report(logits: Mapping[str, torch.Tensor], targets: torch.Tensor, n_bins: int = 15,
                       logit_scale: float = 1.0) -> dict:
    """Reliability bins, ECE (%) and mean confidence of every predictor.

    Args:
        logits: predictor name -> (N, C) logits.
        targets: (N,) true classes.
        n_bins: equal-width confidence bins.
        logit_scale: multiplies the logits before the softmax (a cosine head's training scale; 1 otherwise).

    Returns:
        {predictor: {'ece': %, 'mean_confidence': [0, 1], 'accuracy': [0, 1], **reliability_bins}}.
    """
    out = {}
    targets = targets.long().cpu()
    for name, z in logits.items():
        probs = (z.float().cpu() * logit_scale).softmax(1)
        conf, pred = probs.max(1)
        correct = pred == targets
        out[name] = {'ece': calibration_error(conf, correct, n_bins), 'mean_confidence': conf.double().mean().item(),
                     'accuracy': correct.double().mean().item(), **reliability_bins(conf, correct, n_bins)}
    return out
