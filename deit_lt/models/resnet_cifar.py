"""ResNet for 32x32 inputs (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

The CIFAR teacher of LDAM-DRW, Saddle-LongTail (`models/resnet_cifar.py`), PaCo and DeiT-LT (`ResNet_s`): a 3x3
stem with 16 channels, three stages of BasicBlocks with widths 16 / 32 / 64 (strides 1 / 2 / 2), global average
pooling and a linear or cosine (`NormedLinear`) head. Shortcuts are "option A": parameter-free, stride-2 subsampling
plus zero channel padding, so ResNet-32 has 464,154 parameters for 10 classes.

Parameter names follow Saddle-LongTail (`conv1`, `bn1`, `layer{1,2,3}.{i}.{conv,bn}{1,2}`, head `linear`) so
released state dicts load without renaming. timm has no CIFAR ResNet-32 (its `resnet32ts` is a different network),
so the family is registered here: `timm.create_model('resnet32', num_classes=C, use_norm=True, in_chans=1)`.

The APA variants (Alexandridis et al., "Adaptive Parametric Activation", ECCV 2024; official code
kostas1515/AGLU@ed45253ea23421bf1ef5f78773b4a28d433fa620, classification/resnet_cifar.py) add three options, all
off by default so that `resnet32` and its checkpoints are unchanged:

- `act_layer='aglu'`: every ReLU (stem, two per block) becomes its own AGLU (`resnet32_aglu`);
- `se_gate='sigmoid' | 'apa'`: a squeeze-and-excitation block after bn2, before the residual add, reduction 4
  (`se_resnet32`; `se_resnet32_apa` is the published CIFAR network: AGLU everywhere plus APA gates);
- `head_type='cosnorm'`: the cosine classifier of the published APA recipes (`CosNormClassifier`).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, create_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .layers.apa import SqueezeExcite, resolve_act_layer
from .layers.normed_linear import NormedLinear

__all__ = ['ResNetCifar', 'BasicBlock', 'ZeroPadShortcut', 'CosNormClassifier', 'HEAD_TYPES', 'make_head',
           'resolve_head_type']

# Classifier kinds: 'linear' (nn.Linear), 'normed' (NormedLinear, the LDAM cosine head that `use_norm` selects),
# 'cosnorm' (CosNormClassifier, the head of the published APA recipes).
HEAD_TYPES = ('linear', 'normed', 'cosnorm')


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every second pixel and zero-pad the channels equally on both sides.

    Args:
        in_chs: input channels.
        out_chs: output channels (in_chs + 2 * pad).
    """

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        if (out_chs - in_chs) % 2:
            raise ValueError(f'option-A shortcut pads channels symmetrically: {in_chs} -> {out_chs} is odd')
        self.pad = (out_chs - in_chs) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chs, H, W) -> (B, out_chs, ceil(H/2), ceil(W/2))."""
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CosNormClassifier(nn.Module):
    """Cosine classifier of the APA recipes: logits = s * (||x|| / (1 + ||x||)) * <x / ||x||, w_c / ||w_c||>.

    `CosNorm_Classifier` of the official APA code (classification/resnet_cifar.py:143-173, also the ImageNet
    head): the feature keeps its direction and has its norm squashed into [0, 1), each class vector is
    L2-normalised, there is no bias, and the fixed scale s = 16 makes the outputs logits for a plain softmax
    cross-entropy (unlike `NormedLinear`, whose raw cosines get the LDAM scale in the loss). The weight is stored
    (num_classes, in_features) like `nn.Linear`.

    Args:
        in_features: feature width d.
        out_features: number of classes C.
        scale: logit scale s (16 in every published recipe).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The official init: uniform(-1 / sqrt(d), 1 / sqrt(d)); the CIFAR ResNet's kaiming re-init skips this head.
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) features -> (B, C) logits."""
        # (||x|| / (1 + ||x||)) * x / ||x|| written as x / (1 + ||x||): the same value, and finite for x = 0 (a
        # pooled post-ReLU feature can be exactly zero), where the official form divides 0 by 0.
        x = x / (1.0 + x.norm(dim=1, keepdim=True))
        return self.scale * (x @ F.normalize(self.weight, dim=1).t())

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}'


def resolve_head_type(head_type: str | None, use_norm: bool) -> str:
    """The head kind of a network's arguments: `head_type`, or from `use_norm` (LDAM's flag) when it is None."""
    if head_type is None:
        head_type = 'normed' if use_norm else 'linear'
    if head_type not in HEAD_TYPES:
        raise ValueError(f'unknown head_type {head_type!r}; choose one of {HEAD_TYPES}')
    if use_norm and head_type != 'normed':
        raise ValueError(f"use_norm=True selects the 'normed' (LDAM cosine) head; it contradicts "
                         f'head_type={head_type!r}')
    return head_type


def make_head(head_type: str, num_features: int, num_classes: int) -> nn.Module:
    """A classifier of kind `head_type` (one of HEAD_TYPES); nn.Identity for num_classes <= 0 (features only)."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f'unknown head_type {head_type!r}; choose one of {HEAD_TYPES}')
    if num_classes <= 0:
        return nn.Identity()
    if head_type == 'normed':
        return NormedLinear(num_features, num_classes)
    if head_type == 'cosnorm':
        return CosNormClassifier(num_features, num_classes)
    return nn.Linear(num_features, num_classes)


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> act -> conv3x3 -> BN [-> SE], plus the shortcut, then act.

    The SE block sits where the official APA code puts it (`Se_Block_Gumbel`, classification/resnet_cifar.py:
    350-384): on the residual branch after bn2, before the add.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the first convolution.
        norm_layer: normalisation class (BatchNorm2d in the original).
        act_layer: activation constructor; each call builds one module (ReLU in the original, AGLU for APA).
        attn_layer: constructor `attn_layer(channels)` of the attention block on the residual branch, or None.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, norm_layer: type = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] = nn.ReLU,
                 attn_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        # Modules rather than F.relu so that an AGLU holds its own kappa / lambda; a ReLU module has no parameters,
        # so the state dict of the plain network is unchanged.
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.se = attn_layer(out_chs) if attn_layer is not None else None
        self.shortcut = ZeroPadShortcut(in_chs, out_chs) if stride != 1 or in_chs != out_chs else nn.Identity()
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.act2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with option-A shortcuts.

    Args:
        layers: BasicBlocks per stage ((5, 5, 5) = ResNet-32: 1 + 3 * 5 * 2 + 1 weighted layers).
        widths: channels per stage; the stem has widths[0].
        num_classes: classes of the head (0 = no head: `forward` returns pooled features).
        in_chans: input image channels.
        use_norm: cosine head (`NormedLinear`, LDAM) instead of `nn.Linear`.
        drop_rate: dropout before the head (0 in every published recipe).
        global_pool: timm pooling type ('avg' as in the original; '' keeps the feature map).
        norm_layer: timm norm-layer name or class; 'batchnorm2d' as the original. A per-sample norm
            ('groupnorm1') makes results independent of how the batch is split over processes (tests).
        act_layer: activation of the stem and of every block: 'relu' (the original), 'aglu' (APA paper: each ReLU
            becomes its own AGLU), another timm activation name, or a class.
        act_kwargs: arguments bound to the activation (for AGLU e.g. {'init': 'readme'}; the default is the
            official 'resnet' init).
        se_gate: None (no SE, the original), 'sigmoid' or 'apa': a squeeze-and-excitation block with that gate in
            every BasicBlock, in the form of the official APA code (LayerNorm and Dropout(0.1) with the APA gate).
        se_reduction: SE hidden width = channels // se_reduction (4 in the official CIFAR code).
        head_type: 'linear', 'normed' (= use_norm) or 'cosnorm' (`CosNormClassifier`, the APA recipes' head);
            None follows use_norm.
    """

    def __init__(self, layers: Sequence[int] = (5, 5, 5), widths: Sequence[int] = (16, 32, 64),
                 num_classes: int = 10, in_chans: int = 3, use_norm: bool = False, drop_rate: float = 0.0,
                 global_pool: str = 'avg', norm_layer: str | type = 'batchnorm2d',
                 act_layer: str | Callable[..., nn.Module] = 'relu', act_kwargs: dict[str, Any] | None = None,
                 se_gate: str | None = None, se_reduction: int = 4, head_type: str | None = None):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer)
        if len(layers) != len(widths):
            raise ValueError(f'layers {tuple(layers)} and widths {tuple(widths)} differ in length')
        head_type = resolve_head_type(head_type, use_norm)
        act_layer = resolve_act_layer(act_layer, **(act_kwargs or {}))
        attn_layer = partial(SqueezeExcite, reduction=se_reduction, gate=se_gate) if se_gate else None
        self.num_classes = num_classes
        self.head_type = head_type
        self.use_norm = head_type == 'normed'
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        # A module (not F.relu) so that timm's features_only wrapper, which replays the children in order, sees it.
        # In place where the activation allows it (ReLU), as before; AGLU ignores the flag.
        self.act1 = create_act_layer(act_layer, inplace=True)
        in_chs, reduction = widths[0], 1
        self.feature_info = [dict(num_chs=in_chs, reduction=1, module='act1')]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1, norm_layer,
                                 act_layer=act_layer, attn_layer=attn_layer)
                      for j in range(depth)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'layer{i + 1}'))
            in_chs = width
        self.num_stages = len(layers)
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = self._make_head(num_classes)
        self.init_weights()

    def _make_head(self, num_classes: int) -> nn.Module:
        return make_head(self.head_type, self.num_features, num_classes)

    @torch.no_grad()
    def init_weights(self) -> None:
        # The original's init: kaiming_normal_ with its defaults (fan_in, gain sqrt(2)) on every conv and Linear
        # weight; BN weight 1 / bias 0 and the Linear bias keep PyTorch's defaults; NormedLinear keeps its own.
        # The APA code does the same (`_weights_init`, classification/resnet_cifar.py), which also covers the SE
        # Linear layers; CosNormClassifier, LayerNorm and APA / AGLU keep their own inits.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r'^conv1|bn1|act1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return 'linear' if name_only else self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A freshly initialised head (of the same kind: linear, normed or cosnorm) for `num_classes` classes."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.linear = self._make_head(num_classes)
        if isinstance(self.linear, nn.Linear):
            nn.init.kaiming_normal_(self.linear.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H / 4, W / 4) for three stages."""
        x = self.act1(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            stage = getattr(self, f'layer{i + 1}')
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, num_features, h, w) -> (B, num_classes) logits (cosines for a cosine head), or the pooled
        (B, num_features) features with `pre_logits`."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resnet_cifar(variant: str, pretrained: bool = False, **kwargs) -> ResNetCifar:
    if pretrained:
        # No weights are published in a form we could fetch, and teachers never download: fail instead of
        # silently returning a random network.
        raise ValueError(f'{variant}: no pretrained weights; train one with tools/train_teacher.py and load it with '
                         f'teachers.load_teacher')
    return build_model_with_cfg(ResNetCifar, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'linear', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet32': _cfg(),
    'resnet32_aglu': _cfg(),
    'se_resnet32': _cfg(),
    'se_resnet32_apa': _cfg(),
})


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32 for CIFAR: 3 stages x 5 BasicBlocks, widths 16 / 32 / 64 (0.46 M parameters)."""
    model_args = dict(layers=(5, 5, 5), widths=(16, 32, 64))
    return _create_resnet_cifar('resnet32', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet32_aglu(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32 with each of its 31 ReLUs replaced by its own AGLU (62 extra scalars).

    The official `resnet32 --use_gumbel_se` would build this network but crashes (`BasicBlockGumbel` calls
    `super(BasicBlock, self)`, classification/resnet_cifar.py:288); this is the network it meant.
    """
    model_args = dict(layers=(5, 5, 5), widths=(16, 32, 64), act_layer='aglu')
    return _create_resnet_cifar('resnet32_aglu', pretrained, **dict(model_args, **kwargs))


@register_model
def se_resnet32(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """SE-ResNet-32: ReLU, and an SE block with a sigmoid gate (reduction 4) in every BasicBlock (official
    `se_resnet32` without `--use_gumbel_se`, `Se_Block`). `se_gate='apa'` gives the APA gate with ReLUs."""
    model_args = dict(layers=(5, 5, 5), widths=(16, 32, 64), se_gate='sigmoid')
    return _create_resnet_cifar('se_resnet32', pretrained, **dict(model_args, **kwargs))


@register_model
def se_resnet32_apa(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """The published CIFAR APA network (official `se_resnet32 --use_gumbel_se`, `Se_Block_Gumbel`,
    classification/resnet_cifar.py:350-384): AGLU in place of every ReLU and SE blocks with APA gates,
    LayerNorm and Dropout(0.1), reduction 4. The published recipes add `head_type='cosnorm'`."""
    model_args = dict(layers=(5, 5, 5), widths=(16, 32, 64), act_layer='aglu', se_gate='apa')
    return _create_resnet_cifar('se_resnet32_apa', pretrained, **dict(model_args, **kwargs))
