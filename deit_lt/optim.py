"""Parameter groups for weight decay, shared by every recipe's optimizer.

Two conventions meet here. timm's (`timm.optim.param_groups_weight_decay`, used by DeiT): no decay on 1-D
parameters (norms, biases) and on the names a model lists in `no_weight_decay()` (position embedding, CLS and
DIST tokens). The CNN-teacher recipes of LDAM-DRW / Saddle-LongTail: weight decay on *every* parameter. Both
exempt the parameters a layer declares in its class attribute `no_weight_decay_names` (for example the kappa and
lambda of an adaptive activation, which APA trains without decay).
"""
from __future__ import annotations

from torch import nn

__all__ = ['no_weight_decay_names', 'param_groups']


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Dotted names of the parameters that layers exempt from weight decay (`no_weight_decay_names`)."""
    names = set()
    for prefix, module in model.named_modules():
        for local in getattr(module, 'no_weight_decay_names', ()):
            if getattr(module, local, None) is not None:
                names.add(f'{prefix}.{local}' if prefix else local)
    return names


def param_groups(model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group.

    Args:
        model: the module whose trainable parameters are optimised.
        weight_decay: decay of the decayed group.
        decay_norm_and_bias: False (timm / DeiT): 1-D parameters, biases and `model.no_weight_decay()` names are
            not decayed. True (the CNN-teacher recipes): every parameter is decayed.
            Either way, layer-declared `no_weight_decay_names` are never decayed.

    Returns:
        `[{'params': decayed, 'weight_decay': weight_decay}, {'params': others, 'weight_decay': 0.0}]`, empty
        groups left out.
    """
    exempt = no_weight_decay_names(model)
    if not decay_norm_and_bias:
        listed = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
        exempt |= set(listed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = name in exempt or (not decay_norm_and_bias and (p.ndim <= 1 or name.endswith('.bias')))
        (no_decay if skip else decay).append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return [g for g in groups if g['params']]
