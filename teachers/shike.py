"""SHIKE losses (stage 1: CE + dynamic knowledge transfer; stage 2: balanced softmax) and its learning-rate schedule.

Jin et al., "Long-Tailed Visual Recognition via Self-Heterogeneous Integration with Knowledge Excavation",
CVPR 2023 (arXiv 2304.01279); official code jinyan-06/SHIKE @ 2b04b62, `cifarTrain.py` (`mix_outputs`, lines
175-220; the stage switch at 134-137) and `utils.py` (`soft_entropy`, `CosineAnnealingLRWarmup`). The model is
`deit_lt.models.shike`.

Stage 1 (0-based epochs 0 .. stage2_epoch - 1), with z_i the (B, C) logits of expert i and KLm PyTorch's default
'mean' reduction of `F.kl_div` (sum over batch and classes / (B * C), cifarTrain.py:213-220):

    L1 = sum_i CE(z_i, y)                                    (mean over the batch)
       + 10 * sum_i KLm(softmax(t) || softmax(s_i))         hardest-negative suppression (HNS)
       + 1 * sum_i sum_{j != i} KLm(softmax(z_j) || softmax(z_i))   mutual distillation (MD)

    zbar = mean_i z_i,  h = argmax_{c != y} zbar_c,  zmax_c = max_i z_i,c
    t_c = 0 (c = y), zbar_h (c = h), zmax_c otherwise;     s_i,c = -30 (c = y), z_i,c otherwise.

One teacher t per sample, shared by the experts: the hardest negative keeps the ensemble average while every other
negative is raised to the experts' maximum, so relative to the rest the hardest negative is suppressed. Nothing is
detached (cifarTrain.py:175-187, 215): the teacher (through zbar and zmax) and both sides of every mutual KL get
gradients.

Stage 2 (epochs >= stage2_epoch): balanced softmax per expert on the stage-2 heads,
L2 = sum_i CE(z_i + log n, y), n = training images per class.

Epochs are 0-based everywhere, as in the official loop (`for epoch in range(0, args.epochs)`), and the project's
convention: `set_epoch(e)` is called with the index of the epoch about to run.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ShikeLoss', 'hns_teacher_logits', 'shike_lr', 'warmup_cosine_lr']

KL_REDUCTIONS = ('mean', 'batchmean')


def hns_teacher_logits(expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The HNS teacher logits t (official `reformed_nt`), differentiable w.r.t. every expert.

    Args:
        expert_logits: (E, B, C) logits.
        targets: (B,) class indices.

    Returns:
        (B, C): 0 at the target, the ensemble mean at the ensemble's hardest negative, the experts' max elsewhere.
    """
    zbar = expert_logits.mean(0)
    # torch.max (not amax): its gradient goes to one expert per entry, as in the official code.
    zmax = expert_logits.max(0).values
    is_target = F.one_hot(targets, zbar.shape[-1]).bool()
    # argmax over the negatives only. The official code fills the target slot with -30 instead, the same for
    # cosine logits in [-30, 30] up to exact ties.
    hardest = zbar.masked_fill(is_target, float('-inf')).argmax(-1)
    is_hardest = F.one_hot(hardest, zbar.shape[-1]).bool()
    return torch.where(is_hardest, zbar, zmax).masked_fill(is_target, 0.0)


def _kl(target_log_probs: torch.Tensor, input_log_probs: torch.Tensor, reduction: str) -> torch.Tensor:
    """sum over the last two dims of KL(P || Q) from log-probabilities, each (..., B, K), divided by B * K ('mean',
    PyTorch's default of F.kl_div) or by B ('batchmean'); leading dims are summed."""
    pointwise = F.kl_div(input_log_probs, target_log_probs, reduction='none', log_target=True)
    b, k = pointwise.shape[-2:]
    return pointwise.sum() / (b * k if reduction == 'mean' else b)


class ShikeLoss(nn.Module):
    """SHIKE's stage-1 loss (CE + HNS + mutual distillation) and stage-2 balanced softmax, switched by epoch.

    Defaults are the official ones. The options reproduce variants the official code does not take, for ablations:
    none of them is used by the published run.

    Args:
        train_counts: (C,) training images per class (log n of the balanced softmax).
        stage2_epoch: first 0-based epoch of the classifier re-training (official `cornerstone` 180);
            None = stage 1 throughout.
        hns_weight: weight of the HNS term (official 10).
        mutual_weight: weight of the mutual-distillation term (official 1).
        kl_reduction: 'mean' (official: KL summed over the batch and classes, divided by B * C, so for C = 100 the
            per-sample weights are 10 / C and 1 / C) or 'batchmean' (divided by B: the textbook KL, C times larger).
        student_target_logit: the constant put at the target slot of the HNS student logits (official -30).
        exclude_target: drop the target class from both HNS distributions (a KL over the C - 1 negatives). The
            official teacher keeps logit 0 at the target while the student has -30 there, so P puts mass on the
            target that Q cannot follow; `student_target_logit` is unused when set.
        detach_teacher: stop the gradient through the HNS teacher (the official code does not).
    """

    def __init__(self, train_counts: Sequence[int] | torch.Tensor, stage2_epoch: int | None = 180,
                 hns_weight: float = 10.0, mutual_weight: float = 1.0, kl_reduction: str = 'mean',
                 student_target_logit: float = -30.0, exclude_target: bool = False, detach_teacher: bool = False):
        super().__init__()
        counts = torch.as_tensor(train_counts, dtype=torch.float64)
        if counts.ndim != 1 or (counts <= 0).any():
            raise ValueError('train_counts must be a 1-d sequence of positive class counts (the balanced softmax '
                             'needs log n_c for every class)')
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f'unknown kl_reduction {kl_reduction!r} ({" | ".join(KL_REDUCTIONS)})')
        self.num_classes = len(counts)
        self.stage2_epoch = stage2_epoch
        self.hns_weight = hns_weight
        self.mutual_weight = mutual_weight
        self.kl_reduction = kl_reduction
        self.student_target_logit = student_target_logit
        self.exclude_target = exclude_target
        self.detach_teacher = detach_teacher
        self.register_buffer('log_prior', counts.log().to(torch.float32), persistent=False)
        self.stage = 1

    def set_epoch(self, epoch: int) -> None:
        """Select the loss for 0-based `epoch`: stage 2 from `stage2_epoch` on.

        The model must switch at the same epoch (`ShikeResNetCifar.set_stage(2)`); the official loop does both at
        the start of each epoch >= cornerstone.
        """
        self.stage = 2 if self.stage2_epoch is not None and epoch >= self.stage2_epoch else 1

    def forward(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of the current stage.

        Args:
            expert_logits: (E, B, C) expert logits (already scaled by s, as `forward_experts` returns them).
            targets: (B,) class indices.

        Returns:
            (scalar loss, parts) where parts holds detached scalars that sum to the loss: 'ce', 'hns', 'mutual'
            (weighted) in stage 1, 'balanced_ce' in stage 2.
        """
        if expert_logits.ndim != 3 or expert_logits.shape[-1] != self.num_classes:
            raise ValueError(f'expected (E, B, {self.num_classes}) expert logits, got {tuple(expert_logits.shape)}')
        if targets.ndim != 1 or targets.shape[0] != expert_logits.shape[1] or targets.is_floating_point():
            raise ValueError(f'expected ({expert_logits.shape[1]},) integer class targets, got '
                             f'{tuple(targets.shape)} {targets.dtype}')
        z = expert_logits.float()  # the official softmax / kl_div run in float32 under autocast too
        if self.stage == 2:
            loss = self.balanced_ce(z, targets)
            return loss, {'balanced_ce': loss.detach()}
        ce = sum(F.cross_entropy(z_i, targets) for z_i in z.unbind(0))
        hns = self.hns_weight * self.hns(z, targets)
        mutual = self.mutual_weight * self.mutual(z)
        return ce + hns + mutual, {'ce': ce.detach(), 'hns': hns.detach(), 'mutual': mutual.detach()}

    def balanced_ce(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum_i CE(z_i + log n, y), each a mean over the batch: (E, B, C), (B,) -> scalar."""
        z = expert_logits + self.log_prior.to(expert_logits.device)
        return sum(F.cross_entropy(z_i, targets) for z_i in z.unbind(0))

    def hns(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unweighted sum_i KL(softmax(t) || softmax(s_i)): (E, B, C), (B,) -> scalar."""
        t = hns_teacher_logits(expert_logits, targets)
        if self.detach_teacher:
            t = t.detach()
        is_target = F.one_hot(targets, expert_logits.shape[-1]).bool()
        if self.exclude_target:
            # Keep the C - 1 negatives of every row (row order is preserved by boolean indexing).
            keep = ~is_target
            e, b, c = expert_logits.shape
            t = t[keep].view(b, c - 1)
            s = expert_logits[:, keep].view(e, b, c - 1)
        else:
            s = expert_logits.masked_fill(is_target, self.student_target_logit)
        return _kl(F.log_softmax(t, -1), F.log_softmax(s, -1), self.kl_reduction)

    def mutual(self, expert_logits: torch.Tensor) -> torch.Tensor:
        """Unweighted sum_i sum_{j != i} KL(softmax(z_j) || softmax(z_i)), no stop-gradient: (E, B, C) -> scalar."""
        log_p = F.log_softmax(expert_logits, -1)
        e = log_p.shape[0]
        total = log_p.new_zeros(())
        for i in range(e):
            for j in range(e):
                if i != j:
                    total = total + _kl(log_p[j], log_p[i], self.kl_reduction)
        return total


def warmup_cosine_lr(epoch: int, *, base_lr: float, peak_lr: float, warmup_epochs: int, total_epochs: int) -> float:
    """Official `CosineAnnealingLRWarmup` (eta_min 0) for 0-based `epoch` within a stage of `total_epochs`.

    Warm-up (epoch < warmup_epochs): the line through (1, base_lr) and (warmup_epochs, peak_lr), evaluated at
    epoch - 1, so epoch 0 starts below base_lr and the peak is first reached by the cosine at warmup_epochs.
    Then peak_lr * (1 + cos(pi * (epoch - warmup_epochs) / (total_epochs - warmup_epochs))) / 2.
    """
    if warmup_epochs < 2:
        raise ValueError('the official warm-up needs warmup_epochs >= 2')
    if epoch < warmup_epochs:
        return base_lr + (peak_lr - base_lr) * (epoch - 1) / (warmup_epochs - 1)
    return peak_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (total_epochs - warmup_epochs))) / 2.0


def shike_lr(epoch: int, stage2_epoch: int = 180, total_epochs: int = 200, base_lr: float = 0.05,
             stage1_peak_lr: float = 0.15, stage2_peak_lr: float = 0.1, warmup_epochs: int = 5) -> float:
    """Learning rate of 0-based `epoch` in the official CIFAR-100-LT recipe (cifarTrain.py `scheduler_feat`,
    `scheduler_crt`; `--learning_rate` 0.05): stage 1 warms up over 5 epochs to 0.15 and cosine-decays over the
    remaining 175; stage 2 (a separate SGD) restarts with its own 5-epoch warm-up to 0.1 and a cosine over 15.
    The schedule steps once per epoch."""
    if epoch < stage2_epoch:
        return warmup_cosine_lr(epoch, base_lr=base_lr, peak_lr=stage1_peak_lr, warmup_epochs=warmup_epochs,
                                total_epochs=stage2_epoch)
    return warmup_cosine_lr(epoch - stage2_epoch, base_lr=base_lr, peak_lr=stage2_peak_lr,
                            warmup_epochs=warmup_epochs, total_epochs=total_epochs - stage2_epoch)
