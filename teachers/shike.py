"""SHIKE losses (stage 1: CE + dynamic knowledge transfer; stage 2: balanced softmax) and its learning-rate schedule.

Jin et al., "Long-Tailed Visual Recognition via Self-Heterogeneous Integration with Knowledge Excavation",
CVPR 2023 (arXiv 2304.01279); official code jinyan-06/SHIKE @ 2b04b62, `cifarTrain.py` (`mix_outputs`, lines
175-220; the stage switch at 134-137) and `utils.py` (`soft_entropy`, `CosineAnnealingLRWarmup`). The model is
`deit_lt.models.shike`.

Stage 1 (official 0-based epochs 0..179), `ShikeLoss`, with z_i the (B, C) logits of expert i and KLm PyTorch's
default 'mean' reduction of `F.kl_div` (sum over batch and classes / (B * C), cifarTrain.py:213-220):

    L1 = sum_i CE(z_i, y)                                    (mean over the batch)
       + 10 * sum_i KLm(softmax(t) || softmax(s_i))         hardest-negative suppression (HNS)
       + 1 * sum_i sum_{j != i} KLm(softmax(z_j) || softmax(z_i))   mutual distillation (MD)

    zbar = mean_i z_i,  h = argmax_{c != y} zbar_c,  zmax_c = max_i z_i,c
    t_c = 0 (c = y), zbar_h (c = h), zmax_c otherwise;     s_i,c = -30 (c = y), z_i,c otherwise.

One teacher t per sample, shared by the experts: the hardest negative keeps the ensemble average while every other
negative is raised to the experts' maximum, so relative to the rest the hardest negative is suppressed. Nothing is
detached (cifarTrain.py:175-187, 215): the teacher (through zbar and zmax) and both sides of every mutual KL get
gradients.

Stage 2 (official epochs 180..199), `BalancedSoftmaxLoss`: balanced softmax per expert on the stage-2 heads,
L2 = sum_i CE(z_i + log n, y), n = training images per class.

Two runs here, one run there. The official script trains both stages in one loop of 200 epochs: at the start of
every epoch >= `cornerstone` (180) it freezes everything but the stage-2 heads, switches the forward pass to them
and steps a second SGD with its own warm-up + cosine schedule (cifarTrain.py:134-137). Here each stage is a run of
its own: the teacher method 'shike' (stage 1, 180 epochs) and 'shike_stage2' (20 epochs, `model.init_from` = the
stage-1 run's `last.safetensors`, `ShikeResNetCifar.set_stage(2)`), each with its schedule in its config. What
carries over in the official loop is the model (weights and BatchNorm statistics, both in the model file); the
stage-2 SGD starts fresh there too. `shike_lr` gives the official learning rate of every epoch of the 200; the
configs under `configs/teachers/shike/` reproduce it with the project's warm-up + cosine schedule.

Epochs are 0-based everywhere, as in the official loop (`for epoch in range(0, args.epochs)`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.errors import ConfigError
from deit_lt.models.shike import ShikeResNetCifar

from .methods import ExpertLogitsMethod, register_method

__all__ = ['ShikeLoss', 'BalancedSoftmaxLoss', 'hns_teacher_logits', 'shike_lr', 'warmup_cosine_lr',
           'ShikeMethod', 'ShikeStage2Method']

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


def _check_expert_logits(expert_logits: torch.Tensor, targets: torch.Tensor, num_classes: int | None) -> None:
    if expert_logits.ndim != 3 or (num_classes is not None and expert_logits.shape[-1] != num_classes):
        want = f'(E, B, {num_classes})' if num_classes is not None else '(E, B, C)'
        raise ValueError(f'expected {want} expert logits, got {tuple(expert_logits.shape)}')
    if targets.ndim != 1 or targets.shape[0] != expert_logits.shape[1] or targets.is_floating_point():
        raise ValueError(f'expected ({expert_logits.shape[1]},) integer class targets, got '
                         f'{tuple(targets.shape)} {targets.dtype}')


class ShikeLoss(nn.Module):
    """SHIKE's stage-1 loss: per-expert CE + hardest-negative suppression + mutual distillation.

    Defaults are the official ones. The options reproduce variants the official code does not take, for ablations:
    none of them is used by the published run.

    Args:
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

    def __init__(self, hns_weight: float = 10.0, mutual_weight: float = 1.0, kl_reduction: str = 'mean',
                 student_target_logit: float = -30.0, exclude_target: bool = False, detach_teacher: bool = False):
        super().__init__()
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f'unknown kl_reduction {kl_reduction!r} ({" | ".join(KL_REDUCTIONS)})')
        self.hns_weight = hns_weight
        self.mutual_weight = mutual_weight
        self.kl_reduction = kl_reduction
        self.student_target_logit = student_target_logit
        self.exclude_target = exclude_target
        self.detach_teacher = detach_teacher

    def forward(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The stage-1 loss.

        Args:
            expert_logits: (E, B, C) expert logits (already scaled by s, as `forward_experts` returns them).
            targets: (B,) class indices.

        Returns:
            (scalar loss, parts) where parts holds detached scalars that sum to the loss: 'ce', 'hns', 'mutual'
            (each weighted).
        """
        _check_expert_logits(expert_logits, targets, None)
        z = expert_logits.float()  # the official softmax / kl_div run in float32 under autocast too
        ce = sum(F.cross_entropy(z_i, targets) for z_i in z.unbind(0))
        hns = self.hns_weight * self.hns(z, targets)
        mutual = self.mutual_weight * self.mutual(z)
        return ce + hns + mutual, {'ce': ce.detach(), 'hns': hns.detach(), 'mutual': mutual.detach()}

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


class BalancedSoftmaxLoss(nn.Module):
    """SHIKE's stage-2 loss: the balanced softmax of every expert, summed over experts.

    L2 = sum_i CE(z_i + log n, y), each a mean over the batch (Ren et al., "Balanced Meta-Softmax for Long-Tailed
    Visual Recognition", NeurIPS 2020; official `cifarTrain.py` stage-2 branch).

    Args:
        train_counts: (C,) training images per class (all positive: log n_c must exist).
    """

    def __init__(self, train_counts: Sequence[int] | torch.Tensor):
        super().__init__()
        counts = torch.as_tensor(train_counts, dtype=torch.float64)
        if counts.ndim != 1 or (counts <= 0).any():
            raise ValueError('train_counts must be a 1-d sequence of positive class counts (the balanced softmax '
                             'needs log n_c for every class)')
        self.num_classes = len(counts)
        self.register_buffer('log_prior', counts.log().to(torch.float32), persistent=False)

    def forward(self, expert_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(E, B, C) expert logits, (B,) labels -> (scalar loss, {'balanced_ce': detached loss})."""
        _check_expert_logits(expert_logits, targets, self.num_classes)
        z = expert_logits.float() + self.log_prior.to(expert_logits.device)
        loss = sum(F.cross_entropy(z_i, targets) for z_i in z.unbind(0))
        return loss, {'balanced_ce': loss.detach()}


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


def _shike_model(model: nn.Module, method: str) -> ShikeResNetCifar:
    if not isinstance(model, ShikeResNetCifar):
        raise ConfigError(f'loss.type={method} trains a SHIKE network: set model.name=shike_resnet32 (got '
                          f'{type(model).__name__})')
    return model


@register_method('shike')
class ShikeMethod(ExpertLogitsMethod):
    """SHIKE stage 1: CE + hardest-negative suppression + mutual distillation on the stage-1 heads.

    `loss.kwargs` are `ShikeLoss` options (all default to the official values). Train stage 2 afterwards with
    'shike_stage2' from this run's model file.
    """
    default_use_norm = False        # shike_resnet32 takes no use_norm: its heads are always cosine (times 30)
    cosine_logits = False           # the model multiplies its cosines by 30 itself: model files record scale 1

    def __init__(self, cfg, train_counts, model: nn.Module):
        super().__init__(cfg, train_counts, model)
        _shike_model(model, self.name)
        try:
            self.criterion = ShikeLoss(**cfg.loss.kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'loss.kwargs: {e}') from None

    def setup(self, model: nn.Module) -> None:
        model.set_stage(1)          # also when model.init_from is a stage-2 file: train the stage-1 heads


@register_method('shike_stage2')
class ShikeStage2Method(ExpertLogitsMethod):
    """SHIKE stage 2 (decoupled classifier re-training): balanced softmax on the stage-2 heads, all else frozen.

    Needs the stage-1 model file in `model.init_from`; `ShikeResNetCifar.set_stage(2)` freezes every parameter
    but the stage-2 heads (the optimizer holds only those) and makes the model predict with them, also in the model
    files it writes. `loss.kwargs`: `freeze_bn_stats` (default false: BatchNorm running statistics keep updating,
    as the official `model.train()` does).
    """
    default_use_norm = False
    cosine_logits = False

    def __init__(self, cfg, train_counts, model: nn.Module):
        super().__init__(cfg, train_counts, model)
        _shike_model(model, self.name)
        if not cfg.model.init_from:
            raise ConfigError(f'loss.type={self.name} re-trains the classifiers of a trained SHIKE network: set '
                              f'model.init_from to the stage-1 (loss.type=shike) model file')
        options = dict(cfg.loss.kwargs)
        self.freeze_bn_stats = bool(options.pop('freeze_bn_stats', False))
        if options:
            raise ConfigError(f'loss.kwargs: {self.name} takes only freeze_bn_stats, got {sorted(options)}')
        try:
            self.criterion = BalancedSoftmaxLoss(train_counts)
        except ValueError as e:
            raise ConfigError(f'{self.name}: {e}') from None

    def setup(self, model: nn.Module) -> None:
        model.set_stage(2, freeze_bn_stats=self.freeze_bn_stats)
