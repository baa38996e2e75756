"""ResNet for 32x32 inputs (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

The CIFAR teacher of LDAM-DRW, Saddle-LongTail (`models/resnet_cifar.py`), PaCo and DeiT-LT (`ResNet_s`): a 3x3
stem with 16 channels, three stages of BasicBlocks with widths 16 / 32 / 64 (strides 1 / 2 / 2), global average
pooling and a linear or cosine (`NormedLinear`) head. Shortcuts are "option A": parameter-free, stride-2 subsampling
plus zero channel padding, so ResNet-32 has 464,154 parameters for 10 classes (teachers_sam.md section 3.1).

Parameter names follow Saddle-LongTail (`conv1`, `bn1`, `layer{1,2,3}.{i}.{conv,bn}{1,2}`, head `linear`) so
released state dicts load without renaming. timm has no CIFAR ResNet-32 (its `resnet32ts` is a different network),
so the family is registered here: `timm.create_model('resnet32', num_classes=C, use_norm=True, in_chans=1)`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .layers.normed_linear import NormedLinear

__all__ = ['ResNetCifar', 'BasicBlock', 'ZeroPadShortcut']


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


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the first convolution.
        norm_layer: normalisation class (BatchNorm2d in the original).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, norm_layer: type = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.shortcut = ZeroPadShortcut(in_chs, out_chs) if stride != 1 or in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


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
    """

    def __init__(self, layers: Sequence[int] = (5, 5, 5), widths: Sequence[int] = (16, 32, 64),
                 num_classes: int = 10, in_chans: int = 3, use_norm: bool = False, drop_rate: float = 0.0,
                 global_pool: str = 'avg', norm_layer: str | type = 'batchnorm2d'):
        super().__init__()
        norm_layer = get_norm_layer(norm_layer)
        if len(layers) != len(widths):
            raise ValueError(f'layers {tuple(layers)} and widths {tuple(widths)} differ in length')
        self.num_classes = num_classes
        self.use_norm = use_norm
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        # A module (not F.relu) so that timm's features_only wrapper, which replays the children in order, sees it.
        self.act1 = nn.ReLU(inplace=True)
        in_chs, reduction = widths[0], 1
        self.feature_info = [dict(num_chs=in_chs, reduction=1, module='act1')]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1, norm_layer)
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
        if num_classes <= 0:
            return nn.Identity()
        return NormedLinear(self.num_features, num_classes) if self.use_norm else nn.Linear(self.num_features,
                                                                                          num_classes)

    @torch.no_grad()
    def init_weights(self) -> None:
        # The original's init: kaiming_normal_ with its defaults (fan_in, gain sqrt(2)) on every conv and Linear
        # weight; BN weight 1 / bias 0 and the Linear bias keep PyTorch's defaults; NormedLinear keeps its own.
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
        """A freshly initialised head (of the same kind: linear or cosine) for `num_classes` classes."""
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
})


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32 for CIFAR: 3 stages x 5 BasicBlocks, widths 16 / 32 / 64 (0.46 M parameters)."""
    model_args = dict(layers=(5, 5, 5), widths=(16, 32, 64))
    return _create_resnet_cifar('resnet32', pretrained, **dict(model_args, **kwargs))
