"""Teacher training methods: what one long-tail method contributes to the teacher recipe.

The recipe (`teachers.recipe`) builds the data, the model, the optimizer (SGD / SAM) and the schedule the same way for
every method; a method adds its loss, how a batch is turned into that loss, what changes at an epoch start, how
many augmented views of each image it reads, and any preparation of the model (freezing for a second stage). The
config's `loss.type` names the method; `loss.kwargs` passes method-specific options to it.

Registered here: 'ce' and 'ldam' (with DRW; Cao et al., NeurIPS 2019; Saddle-LongTail). The multi-expert methods
register themselves from their own modules (`teachers.ride`, `teachers.mdcs`, `teachers.shike`).
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import torch
from torch import nn

from deit_lt.data.pipeline import Batch
from deit_lt.errors import ConfigError

from .losses import TeacherLoss

__all__ = ['TeacherMethod', 'CrossEntropyMethod', 'register_method', 'get_method', 'method_names']

_METHODS: dict[str, type['TeacherMethod']] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a `TeacherMethod` available as `loss.type=<name>`."""
    def wrap(cls: type) -> type:
        _METHODS[name] = cls
        cls.name = name
        return cls
    return wrap


def _load_plugins() -> None:
    # the multi-expert methods live beside their losses; importing them registers them
    from . import mdcs, ride, shike  # noqa: F401


def method_names() -> list[str]:
    _load_plugins()
    return sorted(_METHODS)


def get_method(name: str) -> type['TeacherMethod']:
    """The method class registered as `name` (ConfigError naming the known ones otherwise)."""
    _load_plugins()
    if name not in _METHODS:
        raise ConfigError(f'unknown loss.type {name!r}; choose one of {", ".join(sorted(_METHODS))}')
    return _METHODS[name]


class TeacherMethod(abc.ABC):
    """Base class of a teacher method.

    Attributes (class level):
        views: augmented views of each image the loss reads (2 for weak/strong methods; the second view's
            augmentation is the config's `aug2` section).
        mixing: whether the loss accepts Mixup/CutMix probability targets.
        cosine_logits: the model outputs unscaled cosines (an LDAM / cosine head): the scale the model file records
            for soft distillation is `loss.s`; False: the outputs are logits already (scale 1).
        default_use_norm: what `model.use_norm: null` means for this method (the `use_norm` argument of the
            architecture: a cosine head).

    Args:
        cfg: the teacher config (its `loss` section and `loss.kwargs` are the method's options).
        train_counts: (C,) training images per class.
        model: the network being trained (already built; `setup` may change it).
    """
    name = 'base'
    views = 1
    mixing = False
    cosine_logits = False
    default_use_norm = False

    def __init__(self, cfg, train_counts, model: nn.Module):
        self.cfg = cfg
        self.train_counts = torch.as_tensor(train_counts)

    def to(self, device: torch.device) -> 'TeacherMethod':
        """Move the loss's buffers (margins, class weights) to `device`."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    def setup(self, model: nn.Module) -> None:
        """Prepare the model before the optimizer is built (e.g. freeze everything but a second stage's heads)."""

    def init_weights(self, model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load `model.init_from`'s weights (default: a strict load, with an error naming what differs)."""
        from deit_lt.models.factory import load_state_dict_checked
        load_state_dict_checked(model, state_dict, source)

    def on_epoch(self, epoch: int) -> dict[str, Any]:
        """Called at every epoch start; returns scalars to record for the epoch."""
        return {}

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch, targets: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and statistics to log (0-d tensors, 'acc' in percent)."""


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    labels = targets.argmax(1) if targets.ndim == 2 else targets
    return (logits.detach().argmax(1) == labels).float().mean() * 100.0


class ExpertLogitsMethod(TeacherMethod):
    """A multi-expert method whose criterion reads every expert's logits, (E, B, C), and returns (loss, parts);
    the logged accuracy is the ensemble's (`output`, the mean of the experts' logits)."""
    criterion: nn.Module

    def loss(self, model, batch, targets):
        out = model(batch.x, return_experts=True)
        loss, parts = self.criterion(out['logits'], targets)
        return loss, parts | {'acc': _accuracy(out['output'], targets)}


@register_method('ce')
class CrossEntropyMethod(TeacherMethod):
    """Cross-entropy (with Mixup targets when configured), class-balanced re-weighted from `loss.drw_epoch` on."""
    mixing = True

    def __init__(self, cfg, train_counts, model: nn.Module):
        super().__init__(cfg, train_counts, model)
        self.cosine_logits = bool(_use_norm(cfg))
        try:
            self.criterion = TeacherLoss(train_counts, self.name, drw_epoch=cfg.loss.drw_epoch, beta=cfg.loss.beta,
                                         max_m=cfg.loss.max_m, s=cfg.loss.s, cosine_head=self.cosine_logits,
                                         **cfg.loss.kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f'loss: {e}') from None

    def on_epoch(self, epoch: int) -> dict[str, Any]:
        self.criterion.set_epoch(epoch)
        return {'drw': self.criterion.drw_active}

    def loss(self, model, batch, targets):
        logits = model(batch.x)
        return self.criterion(logits, targets), {'acc': _accuracy(logits, targets)}


@register_method('ldam')
class LDAMMethod(CrossEntropyMethod):
    """LDAM: margins on the true class, scale s, on a cosine head (Cao et al., NeurIPS 2019); DRW as for 'ce'."""
    mixing = False
    default_use_norm = True


def _use_norm(cfg) -> bool:
    """The config's cosine-head setting: `model.use_norm`, or the method's default (on for LDAM, as the
    originals)."""
    return cfg.model.use_norm if cfg.model.use_norm is not None else get_method(cfg.loss.type).default_use_norm
