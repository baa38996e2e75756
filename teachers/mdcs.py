"""MDCS loss: diversity loss (per-expert logit-adjusted CE) + consistency self-distillation on confident instances.

Zhao et al., "MDCS: More Diverse Experts with Consistency Self-distillation for Long-tailed Recognition", ICCV 2023;
official code fistyee/MDCS@1a1d54e (`model/loss.py` `MDCSLoss`, `trainer/trainer.py` `_train_epoch`). The network is
`deit_lt.models.multi_expert` (`mdcs_resnet32`: RIDE's reduced ResNet-32 with 3 experts, cosine heads, logits
already multiplied by s = 30).

Every image comes as a weak view x_w and a strong view x_s; **both go through the network in one batch**
[x_w; x_s] of 2B rows, so BatchNorm normalises them together (`trainer.py:101-108`): use `forward_two_views`.
With z_k the logits of expert k and n the raw training counts:

- Diversity loss (DL): a_k = z_k + log(n^q_k + 1e-9), q = (-0.5, 1, 2.5): expert 1 stays head-biased, expert 2 is
  the balanced (logit-adjusted) expert, expert 3 is pushed to the tail. L_DL = sum_k CE(a_k, y) averaged over all
  2B rows (both views get the CE).
- Consistency self-distillation (CS) with confident instance sampling (CIS): per expert, the teacher is
  softmax(a_k) of the weak view (detached), the student log_softmax(a_k) of the strong view; only samples whose weak
  view expert k classifies correctly (argmax a_k = y) count: KL_k = mean over that set of KL(P || Q), 0 if empty.
  L_CS = sum_k KL_k.
- L = L_DL + 0.6 * min(epoch / 20, 1) * L_CS with the official 1-based epoch. Epochs are **0-based** here, so the
  factor is 0.6 * min((epoch + 1) / 20, 1): 0.03 at epoch 0, 0.6 from epoch 19 on.

At test time the prediction is the mean of the experts' *raw* logits z_k (no priors: MDCS `test.py:98-99`), which
is `MultiExpertResNet.forward`.

Points where the official code is the only source followed (the paper text could not be checked against it):
the config's temperature tau = 2 is overwritten and never used, every softmax runs at temperature 1
(`loss.py:317, 356`); DRW weights are built but never applied (`loss.py:325-348`); CIS uses each expert's own
adjusted weak-view argmax and averages the KL over the selected samples, not over B (`loss.py:393-419`).

Teacher method 'mdcs' (`teachers.methods`, `loss.type: mdcs`): the weak view is the batch's image (`aug`), the
strong view its second augmented view (`Batch.views[0]`, the config's `aug2` section); `loss.kwargs` go to
`MDCSLoss`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from einops import rearrange
import torch
import torch.nn.functional as F
from torch import nn

from deit_lt.errors import ConfigError
from deit_lt.models.multi_expert import MultiExpertResNet

from .methods import TeacherMethod, _accuracy, register_method

__all__ = ['MDCS_PRIOR_EXPONENTS', 'mdcs_prior_offsets', 'cis_masks', 'forward_two_views', 'MDCSLoss', 'MDCSMethod']

# q_k of the three experts (`loss.py:361-365`): head-biased, balanced, tail-biased.
MDCS_PRIOR_EXPONENTS = (-0.5, 1.0, 2.5)


def mdcs_prior_offsets(counts: Sequence[int] | torch.Tensor,
                       exponents: Sequence[float] = MDCS_PRIOR_EXPONENTS, eps: float = 1e-9) -> torch.Tensor:
    """log(n^q_k + eps) per expert and class: (E, C) float32.

    Raw counts, as the official code (q log n up to the eps); using pi = n / N instead shifts each row by a
    constant, which no softmax sees.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n <= 0).any():
        raise ValueError('MDCS priors need every class in the training set (log n of an empty class is -inf)')
    q = torch.as_tensor(exponents, dtype=torch.float64).view(-1, 1)
    return torch.log(n.view(1, -1) ** q + eps).to(torch.float32)


def cis_masks(adjusted_weak: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Confident instance sampling: (E, B, C) adjusted weak-view logits, (B,) labels -> (E, B) bool masks of the
    samples each expert classifies correctly."""
    return adjusted_weak.argmax(dim=2) == targets.unsqueeze(0)


def forward_two_views(model: nn.Module, x_weak: torch.Tensor,
                      x_strong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both views through the model as one 2B batch (shared BatchNorm statistics, as MDCS).

    Args:
        model: a multi-expert model, or a DDP / torch.compile wrapper of one: it is called as
            `model(x, return_experts=True)` and must return a dict with 'logits' (E, 2B, C).
        x_weak: (B, 3, H, W) weakly augmented images.
        x_strong: (B, 3, H, W) strongly augmented versions of the same images.

    Returns:
        (weak logits (E, B, C), strong logits (E, B, C)).
    """
    logits = model(torch.cat([x_weak, x_strong]), return_experts=True)['logits']
    return logits[:, :x_weak.shape[0]], logits[:, x_weak.shape[0]:]


class MDCSLoss(nn.Module):
    """The MDCS objective (DL + ramped CS).

    Args:
        train_counts: (C,) training images per class.
        prior_exponents: q_k, one per expert (the official loss hard-codes three: -0.5, 1, 2.5).
        cs_weight: weight of the consistency term at full ramp (0.6, hard-coded at `loss.py:421`).
        cs_warmup_epochs: epochs of the linear ramp (20, `loss.py` `self.warmup`).
        eps: added to n^q inside the log (1e-9, as the official code).
    """

    def __init__(self, train_counts: Sequence[int], prior_exponents: Sequence[float] = MDCS_PRIOR_EXPONENTS,
                 cs_weight: float = 0.6, cs_warmup_epochs: int = 20, eps: float = 1e-9):
        super().__init__()
        if cs_warmup_epochs < 1:
            raise ValueError(f'cs_warmup_epochs must be >= 1, got {cs_warmup_epochs}')
        self.num_experts = len(prior_exponents)
        self.cs_weight = cs_weight
        self.cs_warmup_epochs = cs_warmup_epochs
        self.register_buffer('prior_offsets', mdcs_prior_offsets(train_counts, prior_exponents, eps),
                             persistent=False)
        self.cs_factor = 0.0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """CS factor for 0-based `epoch`: cs_weight * min((epoch + 1) / cs_warmup_epochs, 1)."""
        self.cs_factor = self.cs_weight * min((epoch + 1) / self.cs_warmup_epochs, 1.0)

    def forward(self, expert_logits_weak: torch.Tensor, expert_logits_strong: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one step.

        Args:
            expert_logits_weak: (E, B, C) raw (scaled) logits of the weak views.
            expert_logits_strong: (E, B, C) raw logits of the strong views of the same images, from the same
                forward pass as the weak ones (`forward_two_views`).
            targets: (B,) class indices.

        Returns:
            (scalar loss, parts) with detached device scalars 'ce' (L_DL), 'cs' (L_CS, before its factor) and
            'cis' (fraction of (expert, sample) pairs selected by CIS).
        """
        if expert_logits_weak.shape[0] != self.num_experts:
            raise ValueError(f'MDCSLoss has {self.num_experts} prior exponents but got '
                             f'{expert_logits_weak.shape[0]} experts')
        offsets = self.prior_offsets.unsqueeze(1)                        # (E, 1, C)
        weak = expert_logits_weak.float() + offsets
        strong = expert_logits_strong.float() + offsets
        both = torch.cat([weak, strong], dim=1)                          # (E, 2B, C): the official 2B-row batch
        ce = F.cross_entropy(rearrange(both, 'e n c -> (e n) c'), targets.repeat(2).repeat(self.num_experts),
                             reduction='none')
        ce = rearrange(ce, '(e n) -> e n', e=self.num_experts).mean(1).sum()
        masks = cis_masks(weak.detach(), targets)                        # (E, B)
        teacher = F.softmax(weak.detach(), dim=2)
        # KL(P || Q) per sample; P is detached, so the CS gradient reaches the strong view only.
        kl = (teacher * (F.log_softmax(weak.detach(), dim=2) - F.log_softmax(strong, dim=2))).sum(2)   # (E, B)
        selected = masks.sum(1)                                          # (E,)
        # Mean over the selected samples; an expert without any contributes 0 (clamp avoids 0 / 0).
        cs = (torch.where(masks, kl, torch.zeros_like(kl)).sum(1) / selected.clamp_min(1)).sum()
        loss = ce + self.cs_factor * cs
        return loss, {'ce': ce.detach(), 'cs': cs.detach(), 'cis': masks.float().mean()}


@register_method('mdcs')
class MDCSMethod(TeacherMethod):
    """MDCS: diversity loss with per-expert priors + consistency self-distillation from the weak to the strong view.

    Both views go through the network as one batch (`forward_two_views`). The training accuracy logged is the
    ensemble's (mean raw logits, the test-time prediction) on the weak view.
    """
    views = 2                       # weak = Batch.x (aug), strong = Batch.views[0] (aug2)
    default_use_norm = True         # cosine heads, as every official config (`use_norm: true`)
    cosine_logits = False           # the model multiplies its cosines by s itself: model files record scale 1

    def __init__(self, cfg, train_counts, model: nn.Module):
        super().__init__(cfg, train_counts, model)
        if not isinstance(model, MultiExpertResNet):
            raise ConfigError(f'loss.type={self.name} trains a multi-expert network: set model.name to mdcs_resnet32, '
                              f'mdcs_resnet50 or mdcs_resnext50_32x4d (got {type(model).__name__})')
        try:
            self.criterion = MDCSLoss(train_counts, **cfg.loss.kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'loss.kwargs: {e}') from None
        if self.criterion.num_experts != model.num_experts:
            raise ConfigError(f'loss.kwargs.prior_exponents gives {self.criterion.num_experts} experts a prior, the '
                              f'model has {model.num_experts}')

    def on_epoch(self, epoch: int) -> dict[str, Any]:
        self.criterion.set_epoch(epoch)
        return {'cs_factor': self.criterion.cs_factor}

    def loss(self, model, batch, targets):
        weak, strong = forward_two_views(model, batch.x, batch.views[0])
        loss, parts = self.criterion(weak, strong, targets)
        return loss, parts | {'acc': _accuracy(weak.detach().mean(0), targets)}
