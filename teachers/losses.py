"""Teacher losses: cross-entropy and LDAM, with deferred re-weighting (DRW).

- LDAM (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019;
  Saddle-LongTail `losses.py`): the true-class logit is lowered by Delta_y = K / n_y^(1/4), K chosen so that the
  largest margin (rarest class) is `max_m`, and all logits are multiplied by s before softmax cross-entropy.
- DRW: from the switch epoch on, the loss is weighted by the class-balanced weights of Cui et al. (CVPR 2019),
  w_c proportional to (1 - beta) / (1 - beta^{n_c}) (`deit_lt.losses.class_balanced_weights`), with PyTorch's
  `weight=` semantics: the *weighted mean* sum_i w_{y_i} L_i / sum_i w_{y_i} (kaidic/LDAM-DRW `cifar_train.py`,
  `losses.py`). Probability targets (Mixup) take PyTorch's soft-target form of the same weighted CE.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.losses import class_balanced_weights

__all__ = ['ldam_margins', 'TeacherLoss']


def ldam_margins(counts: Sequence[int] | torch.Tensor, max_m: float = 0.5) -> torch.Tensor:
    """Per-class LDAM margins Delta_j = max_m * (n_min / n_j)^(1/4), shape (C,), float32.

    Raises:
        ValueError: a class without training samples (its margin would be infinite) or max_m <= 0.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n <= 0).any():
        empty = torch.nonzero(n <= 0).flatten().tolist()
        raise ValueError(f'LDAM needs every class in the training set; classes {empty[:10]} have no samples')
    if max_m <= 0:
        raise ValueError(f'loss.max_m must be > 0, got {max_m}')
    inv = n.pow(-0.25)
    return (inv * (max_m / inv.max())).to(torch.float32)


class TeacherLoss(nn.Module):
    """CE or LDAM on the teacher's logits, optionally class-balanced re-weighted from `drw_epoch` on.

    Args:
        train_counts: (C,) training images per class.
        loss_type: 'ce' or 'ldam'.
        drw_epoch: first (0-based) epoch with class-balanced weights; None = never.
        beta: effective-number beta of the DRW weights.
        max_m: largest LDAM margin.
        s: LDAM scale. A cross-entropy on a cosine head is scaled by `s` as well (cosines in [-1, 1] cannot
            express a confident softmax), a CE on a linear head is not.
        cosine_head: whether the logits are cosines.
    """

    def __init__(self, train_counts: Sequence[int], loss_type: str = 'ldam', drw_epoch: int | None = None,
                 beta: float = 0.9999, max_m: float = 0.5, s: float = 30.0, cosine_head: bool = False):
        super().__init__()
        if loss_type not in ('ce', 'ldam'):
            raise ValueError(f'unknown teacher loss {loss_type!r} (ce | ldam)')
        self.loss_type = loss_type
        self.drw_epoch = drw_epoch
        self.scale = s if (loss_type == 'ldam' or cosine_head) else 1.0
        margins = ldam_margins(train_counts, max_m) if loss_type == 'ldam' else torch.zeros(len(train_counts))
        self.register_buffer('margins', margins, persistent=False)
        self.register_buffer('class_weights', class_balanced_weights(train_counts, beta), persistent=False)
        self.drw_active = False

    def set_epoch(self, epoch: int) -> None:
        """Switch the class-balanced weights on from `drw_epoch` (the originals rebuild the criterion per epoch)."""
        self.drw_active = self.drw_epoch is not None and epoch >= self.drw_epoch

    @property
    def weights(self) -> torch.Tensor | None:
        """The class weights in use this epoch (None = unweighted)."""
        return self.class_weights if self.drw_active else None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, C) logits (cosines for a cosine head), (B,) labels or (B, C) probabilities (CE) -> scalar loss."""
        logits = logits.float()
        if self.loss_type == 'ldam':
            # Only the true-class logit moves: z_y - Delta_y.
            logits = logits - F.one_hot(targets, logits.shape[1]).to(logits.dtype) * self.margins[targets][:, None]
        return F.cross_entropy(logits * self.scale, targets, weight=self.weights)
