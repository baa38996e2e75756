"""ImageNet-size ResNets with AGLU activations and SE blocks with APA gates (ImageNet-LT / iNat teachers).

Alexandridis et al., "Adaptive Parametric Activation", ECCV 2024; official code
kostas1515/AGLU@ed45253ea23421bf1ef5f78773b4a28d433fa620, classification/resnet_pytorch.py. The networks are timm's
`ResNet` (the torchvision layout of the official code: 7x7 stem, max-pool, stride on the 3x3 conv, 1x1 projection
shortcuts) with three settings timm cannot take from a JSON config by itself:

- `act_layer='aglu'`: every ReLU becomes its own AGLU, the stem's and three per bottleneck (after bn1, after bn2,
  after the residual add; `SEBottleneckGumbel`, resnet_pytorch.py:635-702, and the stem, resnet_pytorch.py:299-302).
  timm resolves activation names through its own table, which has no 'aglu';
- `se_gate='sigmoid' | 'apa'`: the official SE block (`SE_Block`, resnet_pytorch.py:535-569, reduction 16: bias-free
  Linear layers, with the APA gate a LayerNorm and Dropout(0.1)), after bn3 and before the residual add, which is
  where timm's Bottleneck puts its `attn_layer`. timm's own 'se' (`seresnet50`) is a different block (1x1 convs
  with biases, no LayerNorm);
- `head_type='cosnorm'`: the cosine classifier of every published APA recipe (`CosNormClassifier`); 'normed' is
  the LDAM head that `use_norm=True` selects elsewhere in deit-lt.

In Python the same networks can be had from timm directly, e.g.
`timm.create_model('resnet50', act_layer=AGLU, zero_init_last=False,
block_args=dict(attn_layer=partial(SqueezeExcite, reduction=16, gate='apa')))`, but the classes in those arguments
cannot be written to a config or to a checkpoint's `model_kwargs`; the names registered here can:
`timm.create_model('se_resnet50_apa', num_classes=1000, head_type='cosnorm')`.

Like the official code (torchvision's default), the last BN of each block is not zero-initialised
(`zero_init_last=False`, which timm's ResNet otherwise turns on).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet
from timm.models.resnet import _cfg as _resnet_cfg
from torch import nn

from .layers.apa import SqueezeExcite, resolve_act_layer
from .resnet_cifar import make_head, resolve_head_type

__all__ = ['ResNetApa']


class ResNetApa(ResNet):
    """timm `ResNet` whose activation, SE gate and classifier kind are given by name.

    Args:
        act_layer: 'relu', 'aglu' or another timm activation name / class (all ReLUs of the network).
        act_kwargs: arguments bound to the activation (for AGLU the default is the official 'resnet' init).
        se_gate: None, 'sigmoid' or 'apa': an SE block in every residual block.
        se_reduction: SE hidden width = channels // se_reduction (16 in the official ImageNet code).
        head_type: 'linear', 'normed' (NormedLinear, as use_norm) or 'cosnorm'; None follows use_norm.
        use_norm: the LDAM cosine head (`NormedLinear`), as deit-lt's other teachers.
        **kwargs: timm `ResNet` arguments (block, layers, num_classes, in_chans, zero_init_last, block_args, ...).
    """

    def __init__(self, *, act_layer: str | Callable[..., nn.Module] = 'relu', act_kwargs: dict[str, Any] | None = None,
                 se_gate: str | None = None, se_reduction: int = 16, head_type: str | None = None,
                 use_norm: bool = False, **kwargs: Any):
        head_type = resolve_head_type(head_type, use_norm)
        block_args = dict(kwargs.pop('block_args', None) or {})
        if se_gate:
            block_args['attn_layer'] = partial(SqueezeExcite, reduction=se_reduction, gate=se_gate)
        super().__init__(act_layer=resolve_act_layer(act_layer, **(act_kwargs or {})), block_args=block_args,
                         **kwargs)
        self.head_type = head_type
        self.use_norm = head_type == 'normed'
        self.fc = self._make_head(self.num_classes)

    def _make_head(self, num_classes: int) -> nn.Module:
        return make_head(self.head_type, self.num_features, num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A freshly initialised head of the same kind (linear, normed or cosnorm) for `num_classes` classes."""
        super().reset_classifier(num_classes, global_pool)
        if self.head_type != 'linear':
            self.fc = self._make_head(num_classes)


def _create_resnet_apa(variant: str, pretrained: bool = False, **kwargs) -> ResNetApa:
    if pretrained:
        raise ValueError(f'{variant}: no pretrained weights; teachers are trained with tools/train_teacher.py')
    return build_model_with_cfg(ResNetApa, variant, pretrained=False, **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet50_aglu': _resnet_cfg(),
    'se_resnet50': _resnet_cfg(),
    'se_resnet50_apa': _resnet_cfg(),
    'se_resnext50_32x4d_apa': _resnet_cfg(),
})

_R50 = dict(block=Bottleneck, layers=(3, 4, 6, 3), zero_init_last=False)


@register_model
def resnet50_aglu(pretrained: bool = False, **kwargs) -> ResNetApa:
    """ResNet-50 with each of its 49 ReLUs replaced by its own AGLU."""
    model_args = dict(_R50, act_layer='aglu')
    return _create_resnet_apa('resnet50_aglu', pretrained, **dict(model_args, **kwargs))


@register_model
def se_resnet50(pretrained: bool = False, **kwargs) -> ResNetApa:
    """SE-ResNet-50 in the form of the APA code: ReLU, SE with a sigmoid gate (reduction 16, bias-free Linear
    layers). `se_gate='apa'` gives the APA gate with ReLUs."""
    model_args = dict(_R50, se_gate='sigmoid')
    return _create_resnet_apa('se_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def se_resnet50_apa(pretrained: bool = False, **kwargs) -> ResNetApa:
    """The published ImageNet-LT / iNat APA network (official `se_resnet50 --use_gumbel_se`): AGLU in place of
    every ReLU and SE blocks with APA gates, LayerNorm and Dropout(0.1), reduction 16. The published recipes add
    `head_type='cosnorm'`."""
    model_args = dict(_R50, act_layer='aglu', se_gate='apa')
    return _create_resnet_apa('se_resnet50_apa', pretrained, **dict(model_args, **kwargs))


@register_model
def se_resnext50_32x4d_apa(pretrained: bool = False, **kwargs) -> ResNetApa:
    """SE-ResNeXt-50 (32x4d) with AGLU and APA gates, the README's "SE-X50" ImageNet-LT row."""
    model_args = dict(_R50, cardinality=32, base_width=4, act_layer='aglu', se_gate='apa')
    return _create_resnet_apa('se_resnext50_32x4d_apa', pretrained, **dict(model_args, **kwargs))
