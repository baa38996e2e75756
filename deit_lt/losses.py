"""DeiT-LT distillation loss and the class-balanced (effective-number) weights used by DRW.

Rangwani et al., "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on Long-Tailed Datasets",
CVPR 2024 (project-page equations; official code val-iisc/DeiT-LT@bc36970 `losses.py`, `main.py` 97-101):

    L = (1 - alpha) * L_cls + alpha * L_dist,          alpha = 0.5
    L_cls  = CE(z_cls, y)                              y: mixed, label-smoothed targets (or hard labels)
    L_dist = sum_i w_{t_i} CE(z_dist_i, t_i) / sum_i w_{t_i},   t = argmax teacher(x)   (hard distillation)

with w = 1 before the DRW epoch and w_c = C * r_c / sum_k r_k, r_c = (1 - beta) / (1 - beta^{n_c}) (Cui et al.,
CVPR 2019) from it on, indexed by the *teacher-predicted* class. The weighted mean is PyTorch's
`cross_entropy(weight=...)` semantics, which the official code uses (so the global scale of w does not matter).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['class_balanced_weights', 'soft_target_cross_entropy', 'DistillationLoss']


def class_balanced_weights(counts: Sequence[int] | torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Normalised effective-number weights: w_c = C * r_c / sum_k r_k with r_c = (1 - beta) / (1 - beta^{n_c}).

    Classes without samples get weight 0. beta = 0 gives all-ones weights.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n < 0).any():
        raise ValueError('class counts must be non-negative')
    if beta == 0:
        return (n > 0).to(torch.float32)
    r = torch.where(n > 0, (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)),
                    torch.zeros_like(n))
    return (r / r.sum() * len(n)).to(torch.float32)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample -sum_c y_c log softmax(z)_c for probability targets (timm's SoftTargetCrossEntropy, unreduced)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


class DistillationLoss(nn.Module):
    """The DeiT-LT objective for a student with CLS and DIST heads, equal to the official computation in every mode
    (val-iisc/DeiT-LT@bc36970 `losses.py` DistillationLoss.forward; facebookresearch/deit `losses.py`).

    L = (1 - alpha) * L_cls + alpha * L_dist, L_cls = CE(z_cls, y) with y the mixed, smoothed targets or labels, and
    L_dist by `distill`:

    - 'hard': CE(z_dist, t), t = argmax of the teacher's logits; from `drw_epoch` on the class-weighted mean
      sum_i w_{t_i} CE_i / sum_i w_{t_i} (PyTorch's `cross_entropy(weight=w)`), weights of the teacher's class.
    - 'soft': KL(softmax(z_t / T) || softmax(z_dist / T)) summed over the batch and the classes, times T^2, divided
      by B x C (the "legacy" scaling of DeiT, facebookresearch/deit issue 61). From `drw_epoch` on, the teacher's
      log-probabilities are multiplied by the class weights and divided by their per-sample sum before the KL, as
      the official code does (the result is not a log-distribution; its `exp` is what the KL compares against).
    - 'none': the DIST head learns the ground truth: soft-target CE averaged over the batch; from `drw_epoch` on
      PyTorch's `cross_entropy(weight=w)` on the same targets: the weighted mean over samples for labels, and for
      probability targets sum_i sum_c w_c y_ic (-log p_ic) / B.

    Args:
        train_counts: (C,) training images per class (the DRW weights come from these).
        distill: 'hard', 'soft' or 'none'.
        alpha: weight of the DIST term.
        tau: temperature of soft distillation.
        drw_epoch: first (0-based) epoch with class-balanced weights on the DIST term (None = never).
        beta: effective-number beta.
    """

    def __init__(self, train_counts: Sequence[int], distill: str = 'hard', alpha: float = 0.5, tau: float = 1.0,
                 drw_epoch: int | None = None, beta: float = 0.9999):
        super().__init__()
        if distill not in ('hard', 'soft', 'none'):
            raise ValueError(f'unknown distillation type {distill!r} (hard | soft | none)')
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f'distill.alpha must be in [0, 1], got {alpha}')
        self.distill = distill
        self.alpha = alpha
        self.tau = tau
        self.drw_epoch = drw_epoch
        self.register_buffer('class_weights', class_balanced_weights(train_counts, beta), persistent=False)
        self.drw_active = False

    def set_epoch(self, epoch: int) -> None:
        """DRW switches on at `drw_epoch` (the criterion is rebuilt per epoch in the official code)."""
        self.drw_active = self.drw_epoch is not None and epoch >= self.drw_epoch

    @staticmethod
    def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE against probability targets (B, C) or labels (B,)."""
        if targets.ndim == 2:
            return soft_target_cross_entropy(logits, targets).mean()
        return F.cross_entropy(logits, targets)

    def forward(self, cls_logits: torch.Tensor, dist_logits: torch.Tensor | None, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total loss, {'loss_cls': L_cls, 'loss_dist': L_dist}) as device tensors (no host sync).

        A single-head model (dist_logits None) is trained on the ground truth alone (ViT baseline).
        """
        loss_cls = self._ce(cls_logits.float(), targets)
        if dist_logits is None:
            return loss_cls, {'loss_cls': loss_cls.detach()}
        dist_logits = dist_logits.float()
        w = self.class_weights if self.drw_active else None
        if self.distill == 'none':
            loss_dist = self._ce(dist_logits, targets) if w is None else F.cross_entropy(dist_logits, targets,
                                                                                          weight=w)
        elif teacher_logits is None:
            raise ValueError(f'{self.distill} distillation needs teacher logits')
        elif self.distill == 'hard':
            loss_dist = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1), weight=w)
        else:
            T = self.tau
            log_t = F.log_softmax(teacher_logits.float() / T, dim=1)
            if w is not None:
                log_t = log_t * w
                log_t = log_t / log_t.sum(1, keepdim=True)
            loss_dist = F.kl_div(F.log_softmax(dist_logits / T, dim=1), log_t, reduction='sum',
                                 log_target=True) * (T * T) / dist_logits.numel()
        total = (1.0 - self.alpha) * loss_cls + self.alpha * loss_dist
        return total, {'loss_cls': loss_cls.detach(), 'loss_dist': loss_dist.detach()}
