"""SHIKE: a multi-expert CIFAR ResNet-32 with depth-wise knowledge fusion and decoupled classifier re-training.

Jin et al., "Long-Tailed Visual Recognition via Self-Heterogeneous Integration with Knowledge Excavation",
CVPR 2023 (arXiv 2304.01279); official code jinyan-06/SHIKE @ 2b04b62, `networks.py` (`ResNet_MoE`) and
`cifarTrain.py` (stage switch and inference). The losses are in `teachers.shike`.

Architecture (ResNet-32, E = 3 experts):

- shared trunk: 3x3 stem with 16 channels, layer1 (5 BasicBlocks, 16 ch, 32x32) -> F1, layer2 (5 blocks, 32 ch,
  stride 2, 16x16) -> F2;
- expert i: its own layer3 (5 blocks, 64 ch, stride 2) on F2 -> D_i (B, 64, 8, 8);
- Depth-wise Knowledge Fusion (DKF): expert i also sees the shallow map S_i = F1 for even i, F2 for odd i (the
  official round-robin over the two shallow stages), brought to (B, 64, 8, 8) by a private branch of stride-2
  conv3x3 + BN blocks, H_i; the fused map is the element-wise product G_i = D_i * H_i, average-pooled to g_i (64);
- heads: per expert a cosine classifier with scale s = 30, z_i = s * cos(g_i, w_i,c), plus a second, independent
  set (`rt_classifiers`) that only the stage-2 re-training trains and that the forward pass uses from then on.

Inference is the plain mean of the experts' logits (no router). Shortcuts that change shape are "option B" (strided
1x1 conv + BN, official `networks.py:53`), unlike the option-A ResNet-32 of `resnet_cifar`, so SHIKE's ResNet-32
has 1,277,008 parameters for 100 classes (1,257,808 without the stage-2 heads).

Stage state: `set_stage(2)` freezes every parameter except the stage-2 heads (official `cifarTrain.py:134-137`)
and switches the forward pass to them. The switch is the boolean buffer `use_retrained_heads`, saved in the state
dict, so a reloaded stage-2 checkpoint predicts with the heads it was evaluated with. `forward` returns already
scaled logits (30 x cosine): a teacher adapter needs no extra logit scale.

Only the CIFAR network is built: the official code covers CIFAR-100-LT alone, and the ImageNet-LT backbone
(ResNet-50 / ResNeXt-50 with DKF) is not specified anywhere we could check.
"""
from __future__ import annotations

from typing import Sequence

from einops import rearrange
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .layers.normed_linear import COSINE_LOGIT_SCALE, NormedLinear
from .resnet_cifar import BasicBlock

__all__ = ['OptionBBasicBlock', 'ShikeResNetCifar', 'StridedConvBn']

# Normalisation of the official CIFAR transforms (cifarTrain.py `normalize`).
SHIKE_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SHIKE_CIFAR_STD = (0.2023, 0.1994, 0.2010)


class OptionBBasicBlock(BasicBlock):
    """`resnet_cifar.BasicBlock` whose shape-changing shortcut is a strided 1x1 conv + BN ("option B").

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the first convolution and of the shortcut.
        norm_layer: normalisation class.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, norm_layer: type = nn.BatchNorm2d):
        super().__init__(in_chs, out_chs, stride=stride, norm_layer=norm_layer)
        if stride != 1 or in_chs != out_chs:
            # Parameter names shortcut.0 (conv) / shortcut.1 (BN) as in the official networks.py.
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                          norm_layer(out_chs))


class StridedConvBn(nn.Module):
    """One step of a DKF branch: conv3x3 with stride 2 (no bias) -> BN -> optional ReLU.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        apply_act: ReLU after the BN.
        norm_layer: normalisation class.
    """

    def __init__(self, in_chs: int, out_chs: int, apply_act: bool, norm_layer: type = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False)
        self.bn = norm_layer(out_chs)
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chs, H, W) -> (B, out_chs, ceil(H / 2), ceil(W / 2))."""
        return self.act(self.bn(self.conv(x)))


def _fusion_branch(widths: Sequence[int], src_stage: int, norm_layer: type) -> nn.Sequential:
    """The DKF branch taking stage `src_stage`'s map (widths[src_stage] ch) to the last stage's shape.

    One stride-2 step per stage in between, doubling along `widths`. ReLU follows every step except the second
    (official `ShallowExpert`, `use_relu = k != 1`): the branch from F1 ends on a BN, the one from F2 on a ReLU.
    """
    chs = list(widths[src_stage:])
    return nn.Sequential(*[StridedConvBn(chs[k], chs[k + 1], apply_act=k != 1, norm_layer=norm_layer)
                           for k in range(len(chs) - 1)])


class ShikeResNetCifar(nn.Module):
    """SHIKE's multi-expert CIFAR ResNet with depth-wise knowledge fusion and two sets of cosine heads.

    Args:
        layers: BasicBlocks per stage ((5, 5, 5) = ResNet-32). Three stages: the first two are shared, the last is
            replicated per expert.
        widths: channels per stage; the stem has widths[0].
        num_experts: number of experts E (3 in every published run).
        num_classes: classes C (0 = no heads: `forward` returns the concatenated pooled expert features).
        in_chans: input image channels.
        logit_scale: s, multiplying the cosine logits (30 in the official code).
        drop_rate: dropout on the pooled expert features before the heads (0 in the official code).
        global_pool: timm pooling type of the fused maps ('avg' as the official code).
        norm_layer: timm norm-layer name or class ('batchnorm2d' as the official code).
    """

    def __init__(self, layers: Sequence[int] = (5, 5, 5), widths: Sequence[int] = (16, 32, 64),
                 num_experts: int = 3, num_classes: int = 100, in_chans: int = 3,
                 logit_scale: float = COSINE_LOGIT_SCALE, drop_rate: float = 0.0, global_pool: str = 'avg',
                 norm_layer: str | type = 'batchnorm2d'):
        super().__init__()
        if len(layers) != 3 or len(widths) != 3:
            raise ValueError(f'SHIKE ResNet has three stages (two shared, one per expert); got layers '
                             f'{tuple(layers)}, widths {tuple(widths)}')
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        norm_layer = get_norm_layer(norm_layer)
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.logit_scale = logit_scale
        self.drop_rate = drop_rate
        self.expert_features = widths[-1]
        # pre-logits = the E pooled expert features side by side (a linear map of them covers the mean of E
        # linear heads).
        self.num_features = self.head_hidden_size = widths[-1] * num_experts
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[0], widths[0], layers[0], 1, norm_layer)
        self.layer2 = self._make_stage(widths[0], widths[1], layers[1], 2, norm_layer)
        self.layer3s = nn.ModuleList([self._make_stage(widths[1], widths[2], layers[2], 2, norm_layer)
                                      for _ in range(num_experts)])
        # Expert i fuses shallow stage i % 2 (0 = F1, 1 = F2): official `exp_depth` [2, 1, 2] for E = 3.
        self.shallow_exps = nn.ModuleList([_fusion_branch(widths, i % 2, norm_layer) for i in range(num_experts)])
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.classifiers = self._make_heads(num_classes)
        self.rt_classifiers = self._make_heads(num_classes)

        # Which head set the forward pass uses; persistent so that checkpoints carry the stage. `_use_retrained`
        # mirrors it in Python (set by `set_stage` and after `load_state_dict`) so that the forward pass never
        # reads a device tensor on the host.
        self.register_buffer('use_retrained_heads', torch.tensor(False))
        self._use_retrained = False
        self._freeze_bn_stats = False
        self.register_load_state_dict_post_hook(_sync_stage_after_load)

        self.init_weights()
        self._apply_stage_grads()

    @staticmethod
    def _make_stage(in_chs: int, out_chs: int, depth: int, stride: int, norm_layer: type) -> nn.Sequential:
        return nn.Sequential(*[OptionBBasicBlock(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1,
                                                 norm_layer) for j in range(depth)])

    def _make_heads(self, num_classes: int) -> nn.ModuleList:
        return nn.ModuleList([NormedLinear(self.expert_features, num_classes) if num_classes > 0 else nn.Identity()
                              for _ in range(self.num_experts)])

    @torch.no_grad()
    def init_weights(self) -> None:
        # The official init: kaiming_normal_ (fan_in, gain sqrt(2)) on the trunk's and the experts' convolutions
        # (shortcuts included). The DKF branches are built after that init runs in networks.py, so they keep
        # PyTorch's default conv init; BN keeps its defaults and the cosine heads their own (LDAM) init.
        for name, m in self.named_modules():
            if name.startswith('shallow_exps.'):
                if isinstance(m, nn.Conv2d) or (hasattr(m, 'reset_parameters') and not list(m.children())):
                    m.reset_parameters()
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, NormedLinear):
                m.reset_parameters()

    # ----------------------------------------------------------------------------------------------------------
    # Stage switch
    # ----------------------------------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """1 = representation learning with the stage-1 heads, 2 = classifier re-training / stage-2 heads."""
        return 2 if self._use_retrained else 1

    def set_stage(self, stage: int, freeze_bn_stats: bool = False) -> None:
        """Select the training stage: which heads the forward pass uses and which parameters require grad.

        Stage 1: everything trains except the stage-2 heads (`rt_classifiers`), which the official code never
        uses before the switch (frozen here so that DDP sees no unused parameters). Stage 2 (the official
        `epoch >= cornerstone`, cifarTrain.py:134-137): only `rt_classifiers` train, and `forward` averages their
        logits. Build the stage-2 optimizer after this call, from the parameters that require grad. Idempotent:
        call it again after resuming into stage 2.

        Args:
            stage: 1 or 2.
            freeze_bn_stats: stage 2 only: keep every BN layer in eval mode while the model trains, so running
                statistics stop updating. The official code leaves BN in train mode (cifarTrain.py:237), the
                default here.
        """
        if stage not in (1, 2):
            raise ValueError(f'SHIKE has stages 1 and 2, got {stage}')
        if freeze_bn_stats and stage != 2:
            raise ValueError('freeze_bn_stats applies to stage 2 only')
        self._use_retrained = stage == 2
        self.use_retrained_heads.fill_(self._use_retrained)
        self._freeze_bn_stats = freeze_bn_stats
        self._apply_stage_grads()
        self.train(self.training)

    def _apply_stage_grads(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith('rt_classifiers.') == self._use_retrained)

    def train(self, mode: bool = True) -> ShikeResNetCifar:
        super().train(mode)
        if mode and self._freeze_bn_stats:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------
    # timm interface
    # ----------------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str | list]:
        # Shared stages (per block unless coarse), then all expert stages and DKF branches as one group after them.
        return dict(stem=r'^conv1|bn1|act1',
                    blocks=[(r'^layer([12])\.' if coarse else r'^layer([12])\.(\d+)', None),
                            (r'^(?:layer3s|shallow_exps)\.', (3,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The head set the forward pass uses now (a ModuleList of E heads), or its attribute name."""
        name = 'rt_classifiers' if self._use_retrained else 'classifiers'
        return name if name_only else getattr(self, name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh stage-1 and stage-2 heads for `num_classes` classes (0 = none); the stage is kept."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.classifiers = self._make_heads(num_classes)
        self.rt_classifiers = self._make_heads(num_classes)
        self._apply_stage_grads()

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_dkf(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The maps DKF works on.

        Args:
            x: (B, in_chans, 32, 32) images.

        Returns:
            dict with 'f1' (B, 16, 32, 32), 'f2' (B, 32, 16, 16), and per expert i the lists 'deep' (D_i) and
            'shallow' (H_i), each (B, 64, 8, 8), and 'fused' (G_i = D_i * H_i), (B, 64, 8, 8) (ResNet-32 sizes).
        """
        x = self.act1(self.bn1(self.conv1(x)))
        f1 = self._run(self.layer1, x)
        f2 = self._run(self.layer2, f1)
        shallow_maps = (f1, f2)
        deep = [self._run(stage, f2) for stage in self.layer3s]
        shallow = [branch(shallow_maps[i % 2]) for i, branch in enumerate(self.shallow_exps)]
        fused = [d * h for d, h in zip(deep, shallow)]
        return {'f1': f1, 'f2': f2, 'deep': deep, 'shallow': shallow, 'fused': fused}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) images -> (E, B, 64, H / 4, W / 4) fused expert maps G_i."""
        return torch.stack(self.forward_dkf(x)['fused'])

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(E, B, c, h, w) -> (E, B, c)."""
        e, b = x.shape[:2]
        return self.global_pool(x.flatten(0, 1)).unflatten(0, (e, b))

    def _expert_logits(self, g: torch.Tensor) -> torch.Tensor:
        """(E, B, c) pooled features -> (E, B, C) logits s * cos of the active head set."""
        g = F.dropout(g, p=self.drop_rate, training=self.training) if self.drop_rate else g
        heads = self.rt_classifiers if self._use_retrained else self.classifiers
        return torch.stack([head(g_i) for head, g_i in zip(heads, g.unbind(0))]) * self.logit_scale

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(E, B, c, h, w) fused maps -> (B, C) mean expert logits, or (B, E * c) pooled features with
        `pre_logits` or without heads (num_classes = 0)."""
        g = self._pool(x)
        if pre_logits or self.num_classes <= 0:
            return rearrange(g, 'e b c -> b (e c)')
        return self._expert_logits(g).mean(0)

    def forward_experts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-expert outputs for the SHIKE losses.

        Args:
            x: (B, in_chans, H, W) images.

        Returns:
            dict with 'logits' (E, B, C), scaled by `logit_scale`, from the active head set; 'features'
            (E, B, c), the pooled fused features g_i (before dropout); 'output' (B, C), the mean of 'logits' (what
            `forward` returns).
        """
        if self.num_classes <= 0:
            raise RuntimeError('forward_experts needs classifier heads (num_classes > 0)')
        g = self._pool(self.forward_features(x))
        logits = self._expert_logits(g)
        return {'logits': logits, 'features': g, 'output': logits.mean(0)}

    def forward(self, x: torch.Tensor, return_experts: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """(B, in_chans, H, W) images -> (B, C) ensemble logits (mean over experts; official inference).

        Args:
            x: images.
            return_experts: return `forward_experts(x)` instead (what the SHIKE losses read), through the model
                call so that DDP and torch.compile wrappers see the pass.
        """
        if return_experts:
            return self.forward_experts(x)
        return self.forward_head(self.forward_features(x))


def _sync_stage_after_load(module: ShikeResNetCifar, incompatible_keys) -> None:
    # A loaded `use_retrained_heads` decides the head set; read it once here rather than on every forward pass.
    # requires_grad is not part of a state dict: call `set_stage` to train from a loaded checkpoint.
    module._use_retrained = bool(module.use_retrained_heads)


def _create_shike(variant: str, pretrained: bool = False, **kwargs) -> ShikeResNetCifar:
    if pretrained:
        raise ValueError(f'{variant}: no pretrained weights exist (none were released with the official code); '
                         f'train one and load its model file')
    return build_model_with_cfg(ShikeResNetCifar, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': SHIKE_CIFAR_MEAN, 'std': SHIKE_CIFAR_STD,
        'first_conv': 'conv1', 'classifier': ('classifiers', 'rt_classifiers'), **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'shike_resnet32': _cfg(),
})


@register_model
def shike_resnet32(pretrained: bool = False, **kwargs) -> ShikeResNetCifar:
    """SHIKE ResNet-32 for CIFAR: 3 experts with DKF and cosine heads, s = 30 (1.28 M parameters for 100 classes)."""
    model_args = dict(layers=(5, 5, 5), widths=(16, 32, 64), num_experts=3)
    return _create_shike('shike_resnet32', pretrained, **dict(model_args, **kwargs))
