"""RIDE losses: stage 1 (LDAM + DRW per expert, distribution-aware diversity) and stage 2 (expert-assignment router).

Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts", ICLR 2021; official code
frank-xwang/RIDE-LongTailRecognition@ab8be5c (`model/loss.py` `RIDELoss`, `RIDELossWithDistill`;
`model/ldam_drw_resnets/ea_resnet_cifar.py` for the router). The network is
`deit_lt.models.multi_expert.MultiExpertResNet` (`ride_resnet32`, `ride_resnext50_32x4d`, ...), whose logits are
already multiplied by s = 30.

Stage 1, per expert e with logits z_e (B, C) and the ensemble zbar = mean_e z_e:

    L = sum_e [ LDAM_DRW(z_e, y) + lambda * Tbar^2 * (1/B) sum_i KL( softmax(zbar_i / T) || softmax(z_e,i / T) ) ]

- LDAM: the true-class logit drops by s * m_y, m_c = max_m (n_min / n_c)^(1/4); plain mean before the DRW epoch,
  then the weighted mean sum_i w_yi l_i / sum_i w_yi with class-balanced weights (beta 0.9999, sum_c w_c = C).
- Diversity: T is per class (column), T_c = alpha * beta_c / max_j beta_j with beta_c = gamma C pi_c + 1 - gamma,
  switched on with DRW (before it T = alpha); Tbar = mean_c T_c; softmax(zbar / T) is detached and zbar includes
  expert e itself. lambda < 0 pushes experts apart (maximises the KL), as in the paper.

Epochs are **0-based** here (the project's convention). The official trainer counts from 1 and switches DRW and the
temperatures on when `epoch > reweight_epoch` (`loss.py:190-199`), i.e. from 1-based epoch reweight_epoch + 1; that
is 0-based epoch reweight_epoch, so `drw_epoch` takes the official config value unchanged: 160 for CIFAR (200
epochs), 80 for ImageNet-LT (100 epochs).

Stage 2 (`RouterLoss`): experts frozen (BN in eval mode, `MultiExpertResNet.freeze_experts`), E - 1 routers trained
with BCE-with-logits (positive weight 100), target t_k = 1 iff the ensemble of experts 0..k is wrong and some longer
prefix is right (`ea_resnet_cifar.py` `forward`, training branch). Its data come from RIDE's `BalancedSampler`
(`data_loader/cifar_data_loaders.py`): every draw picks a class uniformly at random, independently, and takes the
next image of that class's cycle (reshuffled when used up), N draws per epoch. `deit_lt.data.samplers`'
'class_balanced' sampler has the same class marginal (1 / C) but visits classes in shuffled rounds
(`samples_per_class` consecutive images per visit; use samples_per_class=1 to come closest): a stratified rather
than an i.i.d. class sequence, and its cycles restart every epoch from (seed, epoch), where RIDE's pointers carry over.

Teacher methods (`teachers.methods`, `loss.type`): 'ride' trains stage 1 (`loss.kwargs` go to `RIDELoss`);
'ride_router' trains the routers of a model built with `model.kwargs.router: true` on the experts of the stage-1
model file `model.init_from` (`loss.kwargs` go to `RouterLoss`). Both read the per-expert outputs through
`model(x, return_experts=True)`. The router run logs, per epoch, the average number of experts its routed
inference uses per training sample ('experts_used') and the routed accuracy ('acc'); see `routed_outputs`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.errors import CheckpointError, ConfigError
from deit_lt.losses import class_balanced_weights
from deit_lt.models.multi_expert import MultiExpertResNet

from .losses import ldam_margins
from .methods import ExpertLogitsMethod, TeacherMethod, _accuracy, register_method

__all__ = ['ride_diversity_temperatures', 'RIDELoss', 'prefix_correctness', 'router_targets', 'RouterLoss',
           'routed_outputs', 'RIDEMethod', 'RIDERouterMethod']


def ride_diversity_temperatures(counts: Sequence[int] | torch.Tensor, reweight_factor: float = 0.05,
                                base_temperature: float = 1.0) -> torch.Tensor:
    """Per-class diversity temperatures T_c = alpha * beta_c / max_j beta_j, beta_c = gamma C pi_c + 1 - gamma.

    Args:
        counts: (C,) training images per class.
        reweight_factor: gamma (0.05 CIFAR, 0.02 ImageNet-LT).
        base_temperature: alpha (1).

    Returns:
        (C,) float32; head classes get alpha, rarer classes less (`loss.py` `per_cls_weights_enabled_diversity`).
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    pi = n / n.sum()
    beta = len(n) * pi * reweight_factor + 1.0 - reweight_factor
    if (beta <= 0).any():
        raise ValueError(f'reweight_factor={reweight_factor} is too large: some beta_c <= 0')
    return (base_temperature * beta / beta.max()).to(torch.float32)


class RIDELoss(nn.Module):
    """RIDE's stage-1 objective over E experts, summed (not averaged) over experts.

    Args:
        train_counts: (C,) training images per class.
        drw_epoch: first 0-based epoch with class-balanced LDAM weights (the official `reweight_epoch`: 160 CIFAR,
            80 ImageNet-LT); None = never.
        diversity_factor: lambda (-0.45 in the CIFAR config, -0.2 the official default used for ImageNet-LT / iNat).
        reweight_factor: gamma of the per-class temperatures (0.05 CIFAR, 0.02 ImageNet-LT).
        base_temperature: alpha (1).
        temperature_epoch: first 0-based epoch with per-class temperatures: 'drw' (default, with DRW, as the official
            code does), an int, or None (T = alpha throughout).
        temperature_sq_factor: multiply the diversity term by Tbar^2 (`loss.py:245`). The paper's equation has no
            such factor; the authors fold it into lambda (issue #5), so the configs' lambda assumes it: True.
        max_m: largest LDAM margin (0.5).
        s: the scale the logits carry (30); margins are subtracted as s * m_y.
        beta: effective-number beta of the DRW weights (0.9999).
        base_loss_factor: weight of the individual LDAM terms (1).
        collaborative_without_diversity: official behaviour for lambda == 0 only (`loss.py:224`): the "individual"
            loss then uses the ensemble logits zbar for every expert. Default False: each expert's own logits,
            as the paper (ablations without diversity should drop the KL term, not change the CE).
        distill_temperature: temperature of the optional distillation from a RIDE teacher (1.5 in its config).
        distill_factor: weight of that distillation term (1).
        official_distill_scaling: the official `RIDELossWithDistill` (`loss.py:273-283`) adds the whole RIDE loss
            and the distillation KL once per expert, multiplying the objective by E. Default False (added once).
    """

    def __init__(self, train_counts: Sequence[int], drw_epoch: int | None = None, diversity_factor: float = -0.2,
                 reweight_factor: float = 0.05, base_temperature: float = 1.0,
                 temperature_epoch: int | str | None = 'drw', temperature_sq_factor: bool = True, max_m: float = 0.5,
                 s: float = 30.0, beta: float = 0.9999, base_loss_factor: float = 1.0,
                 collaborative_without_diversity: bool = False, distill_temperature: float = 1.5,
                 distill_factor: float = 1.0, official_distill_scaling: bool = False):
        super().__init__()
        if temperature_epoch is not None and temperature_epoch != 'drw' and not isinstance(temperature_epoch, int):
            raise ValueError(f"temperature_epoch must be 'drw', an int or None, got {temperature_epoch!r}")
        self.drw_epoch = drw_epoch
        self.temperature_epoch = drw_epoch if temperature_epoch == 'drw' else temperature_epoch
        self.diversity_factor = diversity_factor
        self.base_temperature = base_temperature
        self.temperature_sq_factor = temperature_sq_factor
        self.s = s
        self.base_loss_factor = base_loss_factor
        self.collaborative_without_diversity = collaborative_without_diversity
        self.distill_temperature = distill_temperature
        self.distill_factor = distill_factor
        self.official_distill_scaling = official_distill_scaling
        self.register_buffer('margins', ldam_margins(train_counts, max_m), persistent=False)
        self.register_buffer('class_weights', class_balanced_weights(train_counts, beta), persistent=False)
        temps = ride_diversity_temperatures(train_counts, reweight_factor, base_temperature)
        self.register_buffer('class_temperatures', temps, persistent=False)
        # A constant: computed once on the host so the step never syncs (the official code calls .item() per step).
        self.temperature_mean = float(temps.double().mean())
        self.drw_active = False
        self.temperature_active = False

    def set_epoch(self, epoch: int) -> None:
        """Switch DRW and the per-class temperatures on for 0-based `epoch` (see the module docstring)."""
        self.drw_active = self.drw_epoch is not None and epoch >= self.drw_epoch
        self.temperature_active = self.temperature_epoch is not None and epoch >= self.temperature_epoch

    def ldam(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """LDAM(+DRW) of one expert: (B, C) scaled logits, (B,) labels -> scalar."""
        margin = self.s * self.margins[targets]
        adjusted = logits - F.one_hot(targets, logits.shape[1]).to(logits.dtype) * margin[:, None]
        return F.cross_entropy(adjusted, targets, weight=self.class_weights if self.drw_active else None)

    def forward(self, expert_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage-1 loss.

        Args:
            expert_logits: (E, B, C) per-expert logits, already multiplied by s (`forward_experts(x)['logits']`).
            targets: (B,) class indices.
            teacher_logits: optional (B, C) logits of a RIDE teacher (distillation, Sec. 4 of the paper).

        Returns:
            (scalar loss, parts) with detached device scalars 'ldam' (sum over experts of the individual terms),
            'diversity' (sum of lambda-weighted KL terms) and, with a teacher, 'distill'.
        """
        expert_logits = expert_logits.float()
        mean_logits = expert_logits.mean(0)
        if self.temperature_active:
            temperature = self.class_temperatures.view(1, -1)
            t_mean = self.temperature_mean
        else:
            temperature, t_mean = self.base_temperature, self.base_temperature
        factor = self.diversity_factor * (t_mean * t_mean if self.temperature_sq_factor else 1.0)
        with torch.no_grad():
            # Detached: the ensemble is the fixed reference each expert moves away from (`loss.py` no_grad block).
            ensemble = F.softmax(mean_logits / temperature, dim=1)
        collaborative = self.collaborative_without_diversity and self.diversity_factor == 0
        ldam = expert_logits.new_zeros(())
        diversity = expert_logits.new_zeros(())
        for z in expert_logits:
            ldam = ldam + self.base_loss_factor * self.ldam(mean_logits if collaborative else z, targets)
            if self.diversity_factor != 0:
                kl = F.kl_div(F.log_softmax(z / temperature, dim=1), ensemble, reduction='batchmean')
                diversity = diversity + factor * kl
        loss = ldam + diversity
        parts = {'ldam': ldam.detach(), 'diversity': diversity.detach()}
        if teacher_logits is not None:
            t = self.distill_temperature
            distill = F.kl_div(F.log_softmax(mean_logits / t, dim=1), F.softmax(teacher_logits.float() / t, dim=1),
                               reduction='batchmean') * (t * t) * self.distill_factor
            loss = loss + distill
            parts['distill'] = distill.detach()
            if self.official_distill_scaling:
                loss = loss * expert_logits.shape[0]
        return loss, parts


def prefix_correctness(expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(E, B, C) logits, (B,) labels -> (E, B) bool: is the mean of experts 0..k right on sample i?"""
    return expert_logits.float().cumsum(0).argmax(dim=2) == targets.unsqueeze(0)


def router_targets(expert_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RIDE's router labels (E - 1, B), float: t_k = 1 iff prefix 0..k is wrong and some longer prefix is right.

    (The argmax of a sum equals that of the mean, so prefix sums are used.)
    """
    correct = prefix_correctness(expert_logits, targets)
    # later_right[k] = any prefix longer than k is right: reverse cumulative "or" over the prefixes k+1..E-1.
    later_right = correct.flip(0).cummax(0).values.flip(0)[1:]
    return (~correct[:-1] & later_right).float()


class RouterLoss(nn.Module):
    """Stage-2 loss: mean over the E - 1 routers of BCE-with-logits (batch mean, positive weight `pos_weight`).

    Args:
        pos_weight: weight of the positive ("run the next expert") class: 100 in both configs (the model
            default of the official code is 20).
    """

    def __init__(self, pos_weight: float = 100.0):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, router_logits: torch.Tensor, expert_logits: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The router loss.

        Args:
            router_logits: (E - 1, B) from `forward_experts(x)['router_logits']`.
            expert_logits: (E, B, C) per-expert logits of the same batch (no gradient needed).
            targets: (B,) class indices.

        Returns:
            (scalar loss, parts) with detached 'router_bce' and 'router_positive' (fraction of positive targets).
        """
        labels = router_targets(expert_logits.detach(), targets)
        pos_weight = router_logits.new_tensor([self.pos_weight])
        per_router = torch.stack([F.binary_cross_entropy_with_logits(r, t, pos_weight=pos_weight)
                                  for r, t in zip(router_logits.float(), labels, strict=True)])
        loss = per_router.mean()
        return loss, {'router_bce': loss.detach(), 'router_positive': labels.mean()}


def routed_outputs(expert_logits: torch.Tensor, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RIDE's routed inference from one full pass's outputs (`forward_experts` of a model with a router).

    Router k's logit in that pass is computed from the same inputs routed inference gives it (expert k's feature
    and the mean logits of experts 0..k), so with frozen experts in eval-mode BatchNorm this equals
    `MultiExpertResNet.forward_routed` while costing no extra pass.

    Args:
        expert_logits: (E, B, C) per-expert logits.
        router_logits: (E - 1, B) router logits.

    Returns:
        (logits (B, C): the mean logits of the experts each sample uses, experts_used (B,) int64 in 1..E).
    """
    go_on = (torch.sigmoid(router_logits) > 0.5).long().cumprod(0)   # a stopped sample never resumes
    used = 1 + go_on.sum(0)
    steps = torch.arange(1, expert_logits.shape[0] + 1, device=expert_logits.device, dtype=expert_logits.dtype)
    prefix = expert_logits.cumsum(0) / steps.view(-1, 1, 1)
    return prefix[used - 1, torch.arange(expert_logits.shape[1], device=expert_logits.device)], used


def _multi_expert(model: nn.Module, method: str) -> MultiExpertResNet:
    if not isinstance(model, MultiExpertResNet):
        raise ConfigError(f'loss.type={method} trains a multi-expert network: set model.name to ride_resnet32, '
                          f'ride_resnet50 or ride_resnext50_32x4d (got {type(model).__name__})')
    return model


def _loss_error(e: Exception) -> ConfigError:
    return ConfigError(f'loss.kwargs: {e}')


@register_method('ride')
class RIDEMethod(ExpertLogitsMethod):
    """RIDE stage 1: LDAM + DRW per expert and the distribution-aware diversity loss, summed over experts.

    Reads `loss.drw_epoch` (also the switch of the per-class temperatures), `loss.max_m` and `loss.beta`;
    `loss.kwargs` are the other `RIDELoss` options (diversity_factor, reweight_factor, ...). `loss.s` is not read:
    the logits carry the model's own scale (`model.kwargs.scale`, 30), which the margins are multiplied by.
    """
    default_use_norm = True         # cosine heads, as every official config (`use_norm: true`)
    cosine_logits = False           # the model multiplies its cosines by s itself: model files record scale 1

    def __init__(self, cfg, train_counts, model: nn.Module):
        super().__init__(cfg, train_counts, model)
        model = _multi_expert(model, self.name)
        try:
            self.criterion = RIDELoss(train_counts, drw_epoch=cfg.loss.drw_epoch, max_m=cfg.loss.max_m,
                                      s=model.scale, beta=cfg.loss.beta, **cfg.loss.kwargs)
        except (TypeError, ValueError) as e:
            raise _loss_error(e) from None

    def on_epoch(self, epoch: int) -> dict[str, Any]:
        self.criterion.set_epoch(epoch)
        return {'drw': self.criterion.drw_active, 'class_temperatures': self.criterion.temperature_active}


@register_method('ride_router')
class RIDERouterMethod(TeacherMethod):
    """RIDE stage 2: the expert-assignment routers on frozen stage-1 experts (BCE with positive weight).

    Needs a model built with a router (`model.kwargs: {router: true, router_top_k: K}`, K <= classes) and the
    stage-1 model file in `model.init_from`, whose experts are loaded by `MultiExpertResNet.load_experts_state_dict`
    and frozen with BatchNorm in eval mode. RIDE samples this stage class-balanced: `aug.sampler: class_balanced`
    with `aug.samples_per_class: 1` (see the module docstring for how it differs from RIDE's sampler).
    `loss.kwargs` go to `RouterLoss` (pos_weight).
    """
    default_use_norm = True
    cosine_logits = False

    def __init__(self, cfg, train_counts, model: nn.Module):
        super().__init__(cfg, train_counts, model)
        model = _multi_expert(model, self.name)
        if model.router is None:
            raise ConfigError(f'loss.type={self.name} trains the expert-assignment routers: build the model with '
                              f'them (model.kwargs: {{router: true, router_top_k: K}}, K <= the number of classes)')
        if not cfg.model.init_from:
            raise ConfigError(f'loss.type={self.name} routes between trained experts: set model.init_from to the '
                              f'stage-1 (loss.type=ride) model file')
        try:
            self.criterion = RouterLoss(**cfg.loss.kwargs)
        except TypeError as e:
            raise _loss_error(e) from None

    def init_weights(self, model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        try:
            model.load_experts_state_dict(state_dict)
        except RuntimeError as e:
            raise CheckpointError(f'{source} does not hold experts of this model: {e}') from None

    def setup(self, model: nn.Module) -> None:
        model.freeze_experts()

    def loss(self, model, batch, targets):
        out = model(batch.x, return_experts=True)
        loss, parts = self.criterion(out['router_logits'], out['logits'], targets)
        logits, used = routed_outputs(out['logits'].detach(), out['router_logits'].detach())
        return loss, parts | {'acc': _accuracy(logits, targets), 'experts_used': used.float().mean()}
