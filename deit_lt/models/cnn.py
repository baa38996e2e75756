"""Building teacher CNNs by timm name, with a linear or cosine (LDAM) head.

Every teacher is a timm registry model created with `pretrained=False` (teachers never download weights):
`resnet32` (this package, CIFAR), `resnet50` (timm; the torchvision layout the ImageNet-LT / iNat teachers use) or
any other timm CNN. A cosine head on a timm model that has no `use_norm` argument goes through the `cosine_cnn`
entrypoint registered here (the timm model itself with its `nn.Linear` classifier swapped for `NormedLinear`, so
parameter names stay those of the backbone). The (registry name, keyword arguments) pair returned by
`create_teacher_model` is what model files record as `arch` / `model_kwargs`, and
`timm.create_model(arch, num_classes=C, **model_kwargs)` rebuilds the same module (deit_lt.models.factory does).
"""
from __future__ import annotations

import difflib
from typing import Any

import timm
from timm.models import register_model
from torch import nn

from .layers.normed_linear import NormedLinear

__all__ = ['create_teacher_model', 'check_arch', 'cosine_cnn', 'display_arch', 'has_cosine_head',
           'NATIVE_USE_NORM']

# Registry names whose constructor takes `use_norm` itself (the others get a cosine head through `cosine_cnn`).
NATIVE_USE_NORM = ('resnet32', 'resnet32_aglu', 'se_resnet32', 'se_resnet32_apa', 'resnet50_aglu', 'se_resnet50',
                   'se_resnet50_apa', 'se_resnext50_32x4d_apa', 'ride_resnet32', 'ride_resnet50',
                   'ride_resnext50_32x4d', 'mdcs_resnet32', 'mdcs_resnet50', 'mdcs_resnext50_32x4d')
# Arguments a teacher's config may not set through model.kwargs: they come from the data and the loss.
_RESERVED_KWARGS = ('num_classes', 'in_chans', 'use_norm', 'pretrained', 'backbone')


def check_arch(arch: str) -> None:
    """Raise a ValueError naming close matches when `arch` is not a timm registry name."""
    if arch == 'cosine_cnn':
        raise ValueError("'cosine_cnn' is the internal cosine-head wrapper: give the backbone name (e.g. resnet50) "
                         "with use_norm=true instead")
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f' Did you mean {", ".join(near)}?' if near else ''
        raise ValueError(f'unknown teacher architecture {arch!r}: not a timm model name.{hint}')


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the model's `nn.Linear` classifier (named by its pretrained_cfg) for a `NormedLinear`."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier')
    head = model.get_submodule(name) if name else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f'{type(model).__name__}: a cosine head needs a single nn.Linear classifier, found '
                         f'{type(head).__name__} at {name!r}; use a linear head (use_norm=false)')
    parent_name, _, attr = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, NormedLinear(head.in_features, num_classes))


@register_model
def cosine_cnn(pretrained: bool = False, backbone: str = 'resnet50', num_classes: int = 1000, use_norm: bool = True,
               **kwargs) -> nn.Module:
    """timm model `backbone` whose linear classifier is a cosine head (LDAM ResNet-50 teachers).

    The state dict is the backbone's, with the head weight stored (in_features, num_classes) as Saddle-LongTail's
    `NormedLinear` `fc.weight`. `use_norm=False` returns the backbone unchanged (its linear head): the switch the
    classifier re-balancing tools flip when they replace a cosine head by a linear one. `reset_classifier` would
    also restore a linear head.
    """
    if pretrained:
        raise ValueError('cosine_cnn: teachers are built without pretrained weights')
    check_arch(backbone)
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)
    if use_norm:
        if num_classes <= 0:
            raise ValueError('cosine_cnn needs num_classes > 0 (the cosine head is the classifier)')
        _replace_classifier(model, num_classes)
    return model


def create_teacher_model(arch: str, num_classes: int, *, use_norm: bool = False, in_chans: int = 3,
                         **kwargs: Any) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build a teacher without pretrained weights.

    Args:
        arch: timm registry name ('resnet32', 'resnet50', ...).
        num_classes: classes of the head.
        use_norm: cosine head (LDAM) instead of a linear one.
        in_chans: input channels.
        **kwargs: further `timm.create_model` arguments (e.g. zero_init_last=False for torchvision-like ResNets).

    Returns:
        (model, registry name, model_kwargs) with `timm.create_model(name, num_classes=num_classes, **model_kwargs)`
        rebuilding the same architecture.
    """
    check_arch(arch)
    bad = sorted(set(kwargs) & set(_RESERVED_KWARGS))
    if bad:
        raise ValueError(f'model kwargs {bad} are set by the teacher builder (from the data and loss); remove them')
    if num_classes <= 0:
        raise ValueError(f'a teacher needs num_classes > 0, got {num_classes}')
    model_kwargs: dict[str, Any] = dict(kwargs, in_chans=in_chans)
    name = arch
    if arch in NATIVE_USE_NORM:
        model_kwargs['use_norm'] = bool(use_norm)
    elif use_norm:
        name = 'cosine_cnn'
        model_kwargs.update(backbone=arch, use_norm=True)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    return model, name, model_kwargs


def display_arch(arch: str, model_kwargs: dict[str, Any] | None) -> str:
    """The user-facing architecture of a (registry name, kwargs) pair: the backbone for `cosine_cnn`."""
    return (model_kwargs or {}).get('backbone', arch) if arch == 'cosine_cnn' else arch


def has_cosine_head(model: nn.Module) -> bool:
    """True when the model's classifier is a `NormedLinear`."""
    return any(isinstance(m, NormedLinear) for m in model.modules())
