"""Multi-expert ResNets of RIDE and MDCS: a shared trunk, E expert branches, one cosine head per expert.

RIDE: Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts", ICLR 2021
(frank-xwang/RIDE-LongTailRecognition@ab8be5c `model/ldam_drw_resnets/ride_resnet_cifar.py`,
`model/ldam_drw_resnets/ea_resnet_cifar.py`, `model/fb_resnets/RIDEResNet.py`, `RIDEResNeXt.py`, `EAResNeXt.py`).
MDCS: Zhao et al., "MDCS: More Diverse Experts with Consistency Self-distillation for Long-tailed Recognition",
ICCV 2023 (fistyee/MDCS@1a1d54e `model/ldam_drw_resnets/expert_resnet_cifar.py`), the same network with three
experts.

- CIFAR (`ride_resnet32`, `mdcs_resnet32`): 3x3 stem (16 ch) + layer1 (5 BasicBlocks, 16 ch) are shared; every
  expert owns layer2 (5 blocks, stride 2) and layer3 (5 blocks, stride 2) at the reduced widths 24 / 48
  (`reduce_dimension=False`: 32 / 64), option-A shortcuts, global average pooling to a 48-d feature. 783,856
  parameters for 100 classes and 3 experts (770,896 for 10).
- ImageNet-LT (`ride_resnet50`, `ride_resnext50_32x4d`, `mdcs_*`): 7x7 stem + max-pool + layer1 + layer2 are shared;
  every expert owns layer3 (6 Bottlenecks, 192 planes) and layer4 (3 Bottlenecks, 384 planes), a 1536-d feature
  (unreduced: 256 / 512 planes, 2048-d).
- Heads: per-expert cosine classifier (`NormedLinear`, no bias) times s = 30. Unlike the single-expert teachers,
  the scale lives in the model (as in the official code, `ride_resnet_cifar.py` `_separate_part`), so every output
  here is a logit on the training scale: a teacher adapter must not multiply by 30 again.
- Output: `forward(x)` is the mean over experts of the scaled logits (RIDE's router-free inference and MDCS's
  test-time prediction, which uses raw logits without the training-time priors: MDCS `test.py:98-99`);
  `forward(x, return_experts=True)` is `forward_experts(x)`, the per-expert outputs the training losses read.
- RIDE stage 2 (expert assignment, `router=True`): E - 1 routers; router k reads the sorted top-K of the mean
  logits of experts 0..k and ReLU(Linear(16)) of the L2-normalised pooled feature of expert k, and a Linear shared
  by all routers gives one logit: "also run expert k + 1" (`ea_resnet_cifar.py` `pred_expert_help`).
  `forward_routed` runs experts one by one on the samples whose routers said so (`ea_resnet_cifar.py` `forward`,
  test branch).

Parameter names follow the official code (`conv1`, `bn1`, `layer1`, `layer2s.{e}`, `layer3s.{e}`, `linears.{e}`;
ImageNet: `layer2`, `layer3s`, `layer4s`), so released checkpoints load after `convert_official_state_dict`
(which strips `module.` / `backbone.`, renames the router and drops MDCS's unused heads).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck
from torch import nn

from .layers.normed_linear import COSINE_LOGIT_SCALE, NormedLinear
from .resnet_cifar import BasicBlock

__all__ = ['MultiExpertResNet', 'ExpertRouter', 'convert_official_state_dict', 'CIFAR_MEAN', 'CIFAR_STD']

# The normalisation of RIDE's and MDCS's CIFAR loaders (RIDE `data_loader/cifar_data_loaders.py`, ImbalanceCIFAR*).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class ExpertRouter(nn.Module):
    """RIDE's expert-assignment routers (stage 2): should a sample also go through the next expert?

    Router k (0-based, k < E - 1) sees the experts 0..k a sample has been through: the top-K of their mean logits,
    sorted in descending order, and a 16-d embedding ReLU(W_k f / ||f||) of expert k's pooled feature f. One linear
    layer shared by all routers maps the concatenation [top-K, embedding] to a logit; sigmoid(logit) > 0.5 means
    "run expert k + 1" (RIDE `ea_resnet_cifar.py` `pred_expert_help`, `share_expert_help_pred_fc=True`).

    Args:
        num_experts: E (>= 2); E - 1 routers are built.
        feature_dim: width of an expert's pooled feature.
        top_k: sorted top logits fed to the router (30 CIFAR, 50 ImageNet-LT); must not exceed the classes.
        hidden_dim: width of the feature embedding (16 in the official code).
    """

    def __init__(self, num_experts: int, feature_dim: int, top_k: int = 30, hidden_dim: int = 16):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f'a router needs at least 2 experts, got {num_experts}')
        self.num_routers = num_experts - 1
        self.top_k = top_k
        self.hidden_fcs = nn.ModuleList([nn.Linear(feature_dim, hidden_dim) for _ in range(self.num_routers)])
        self.fc = nn.Linear(top_k + hidden_dim, 1)

    def forward(self, k: int, features: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
        """Router k's logit.

        Args:
            k: router index, 0..E-2 (decides about expert k + 1).
            features: (B, D) pooled feature of expert k.
            mean_logits: (B, C) mean logits of experts 0..k.

        Returns:
            (B,) logits; sigmoid > 0.5 = run expert k + 1.
        """
        # The official code divides by the norm without an epsilon; F.normalize only differs for all-zero features,
        # where it gives 0 instead of NaN.
        hidden = F.relu(self.hidden_fcs[k](F.normalize(features, dim=1)))
        top = mean_logits.topk(self.top_k, dim=1).values
        return self.fc(torch.cat([top, hidden], dim=1)).squeeze(1)


class MultiExpertResNet(nn.Module):
    """ResNet whose last stages are replicated into E experts, each with its own (cosine) classifier.

    Args:
        block: 'basic' (CIFAR BasicBlock with option-A shortcuts) or 'bottleneck' (timm/torchvision Bottleneck with
            1x1-conv + BN downsampling).
        layers: blocks per stage.
        widths: channels per stage for 'basic', planes per stage for 'bottleneck' (output = 4 x planes).
        num_shared_stages: leading stages shared by all experts (1 CIFAR, 2 ImageNet); the rest are per expert.
        num_experts: E.
        num_classes: classes C of every expert head.
        in_chans: input image channels.
        stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7 conv stride 2 + 3x3 max-pool stride 2).
        cardinality: groups of the Bottleneck 3x3 conv (32 for ResNeXt-50 32x4d).
        base_width: Bottleneck width per group (4 for ResNeXt-50 32x4d, 64 for ResNet-50).
        use_norm: cosine heads (`NormedLinear`, no bias) times `scale`; False: `nn.Linear` heads, scale 1 (as the
            official code, which resets s to 1 for linear heads).
        scale: the cosine scale s (30).
        drop_rate: dropout on the pooled feature before each head (the official code's `dropout`, None = 0).
        norm_layer: timm norm-layer name or class.
        router: build RIDE's expert-assignment routers (stage 2).
        router_top_k: K of the routers (30 CIFAR, 50 ImageNet-LT).
        router_hidden_dim: width of a router's feature embedding (16).
    """

    def __init__(self, block: str = 'basic', layers: Sequence[int] = (5, 5, 5), widths: Sequence[int] = (16, 24, 48),
                 num_shared_stages: int = 1, num_experts: int = 3, num_classes: int = 100, in_chans: int = 3,
                 stem: str = 'cifar', cardinality: int = 1, base_width: int = 64, use_norm: bool = True,
                 scale: float = COSINE_LOGIT_SCALE, drop_rate: float = 0.0, norm_layer: str | type = 'batchnorm2d',
                 router: bool = False, router_top_k: int = 30, router_hidden_dim: int = 16):
        super().__init__()
        if block not in ('basic', 'bottleneck'):
            raise ValueError(f'unknown block {block!r} (basic | bottleneck)')
        if stem not in ('cifar', 'imagenet'):
            raise ValueError(f'unknown stem {stem!r} (cifar | imagenet)')
        if len(layers) != len(widths):
            raise ValueError(f'layers {tuple(layers)} and widths {tuple(widths)} differ in length')
        if not 1 <= num_shared_stages < len(layers):
            raise ValueError(f'num_shared_stages must leave at least one expert stage, got {num_shared_stages}')
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        if num_classes <= 0:
            raise ValueError(f'multi-expert models need num_classes > 0 (the heads define the experts), got '
                             f'{num_classes}')
        if router and router_top_k > num_classes:
            raise ValueError(f'router_top_k={router_top_k} exceeds num_classes={num_classes} (CIFAR-10: set it <= 10)')
        self.block = block
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.use_norm = use_norm
        self.scale = float(scale) if use_norm else 1.0
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.experts_frozen = False
        self._norm_layer = norm_layer = get_norm_layer(norm_layer)
        self._cardinality, self._base_width = cardinality, base_width

        stem_chs = widths[0] if block == 'basic' else 64
        if stem == 'cifar':
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == 'imagenet' else nn.Identity()

        in_chs = stem_chs
        self._shared_names, self._expert_names = [], []
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            if i < num_shared_stages:
                stage, out_chs = self._make_stage(in_chs, width, depth, stride)
                name = f'layer{i + 1}'
                self.add_module(name, stage)
                self._shared_names.append(name)
            else:
                stages = [self._make_stage(in_chs, width, depth, stride) for _ in range(num_experts)]
                out_chs = stages[0][1]
                # `layer{i}s.{e}` as the official code, so its checkpoints load by name.
                name = f'layer{i + 1}s'
                self.add_module(name, nn.ModuleList([s for s, _ in stages]))
                self._expert_names.append(name)
            in_chs = out_chs
        self.num_features = self.head_hidden_size = in_chs
        self.linears = self._make_heads(num_classes)
        self.router = ExpertRouter(num_experts, in_chs, router_top_k, router_hidden_dim) if router else None
        self.init_weights(stem)

    def _make_stage(self, in_chs: int, width: int, depth: int, stride: int) -> tuple[nn.Sequential, int]:
        if self.block == 'basic':
            blocks = [BasicBlock(in_chs if j == 0 else width, width, stride=stride if j == 0 else 1,
                                 norm_layer=self._norm_layer) for j in range(depth)]
            return nn.Sequential(*blocks), width
        out_chs = width * Bottleneck.expansion
        blocks = []
        for j in range(depth):
            downsample = None
            if j == 0 and (stride != 1 or in_chs != out_chs):
                # torchvision / official layout: downsample.0 = 1x1 conv (with the stride), downsample.1 = BN.
                downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                           self._norm_layer(out_chs))
            blocks.append(Bottleneck(in_chs if j == 0 else out_chs, width, stride=stride if j == 0 else 1,
                                     downsample=downsample, cardinality=self._cardinality,
                                     base_width=self._base_width, norm_layer=self._norm_layer))
        return nn.Sequential(*blocks), out_chs

    def _make_heads(self, num_classes: int) -> nn.ModuleList:
        if self.use_norm:
            return nn.ModuleList([NormedLinear(self.num_features, num_classes) for _ in range(self.num_experts)])
        return nn.ModuleList([nn.Linear(self.num_features, num_classes) for _ in range(self.num_experts)])

    @torch.no_grad()
    def init_weights(self, stem: str = 'cifar') -> None:
        """The official inits: CIFAR (LDAM-DRW's `_weights_init`) kaiming-normal (fan_in) on every conv and Linear,
        routers included; ImageNet (`model/fb_resnets/EAResNeXt.py`) normal(0, sqrt(2 / (k * k * out_channels))) on
        convs, BN weight 1 / bias 0, Linear layers at PyTorch's default. NormedLinear keeps its own init."""
        for m in self.modules():
            if stem == 'cifar' and isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif stem == 'imagenet' and isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------------------------------
    # timm API
    # ---------------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r'^conv1|bn1|act1|maxpool', blocks=r'^layer(\d+)s?' if coarse else r'^layer(\d+)s?\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.ModuleList | str:
        """The E expert heads (a ModuleList), or its attribute name."""
        return 'linears' if name_only else self.linears

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Fresh heads of the same kind for `num_classes` classes (the router, which reads the top-K logits, is
        rebuilt too when present)."""
        if global_pool not in (None, 'avg'):
            raise ValueError(f'multi-expert models pool by averaging only, got global_pool={global_pool!r}')
        if num_classes <= 0:
            raise ValueError('multi-expert models need num_classes > 0')
        self.num_classes = num_classes
        self.linears = self._make_heads(num_classes)
        if not self.use_norm:
            for head in self.linears:
                nn.init.kaiming_normal_(head.weight)
        if self.router is not None:
            if self.router.top_k > num_classes:
                raise ValueError(f'router top_k={self.router.top_k} exceeds num_classes={num_classes}')
            self.router = ExpertRouter(self.num_experts, self.num_features, self.router.top_k,
                                       self.router.hidden_fcs[0].out_features)

    # ---------------------------------------------------------------------------------------------------------
    # Forward passes
    # ---------------------------------------------------------------------------------------------------------
    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the shared trunk's map (B, C_shared, h, w)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self._shared_names:
            x = self._run(getattr(self, name), x)
        return x

    def expert_map(self, shared: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's last feature map (B, D, h', w') from the shared map."""
        for name in self._expert_names:
            shared = self._run(getattr(self, name)[e], shared)
        return shared

    def expert_head(self, feature: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's logits (B, C) from its pooled feature (B, D): s * cos for cosine heads."""
        if self.drop_rate:
            feature = F.dropout(feature, p=self.drop_rate, training=self.training)
        return self.linears[e](feature) * self.scale

    def forward_experts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every expert on every sample.

        Returns:
            'logits': (E, B, C) per-expert logits (scaled); 'features': (E, B, D) pooled features; 'output': (B, C)
            their mean over experts; with a router also 'router_logits': (E - 1, B) (see `router_logits`).
        """
        shared = self.forward_shared(x)
        feats, logits = [], []
        for e in range(self.num_experts):
            f = self.expert_map(shared, e).mean((2, 3))
            feats.append(f)
            logits.append(self.expert_head(f, e))
        out = {'logits': torch.stack(logits), 'features': torch.stack(feats)}
        out['output'] = out['logits'].mean(0)
        if self.router is not None:
            out['router_logits'] = self.router_logits(out['logits'], out['features'])
        return out

    def router_logits(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Training-time router outputs: router k on every sample, fed with the mean logits of experts 0..k.

        Args:
            logits: (E, B, C) per-expert logits.
            features: (E, B, D) per-expert pooled features.

        Returns:
            (E - 1, B) router logits.
        """
        if self.router is None:
            raise RuntimeError('this model has no router; build it with router=True (RIDE stage 2)')
        prefix = logits.cumsum(0) / torch.arange(1, logits.shape[0] + 1, device=logits.device,
                                                  dtype=logits.dtype).view(-1, 1, 1)
        return torch.stack([self.router(k, features[k], prefix[k]) for k in range(self.num_experts - 1)])

    def forward(self, x: torch.Tensor, return_experts: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """(B, in_chans, H, W) -> (B, C) mean over experts of the scaled logits (train and eval mode).

        Args:
            x: images.
            return_experts: return `forward_experts(x)` instead (the per-expert outputs the training losses read).
                Training code asks for them through the model call rather than `forward_experts`, so that the
                pass goes through DDP and torch.compile wrappers (DDP syncs gradients only of passes it saw).
        """
        if return_experts:
            return self.forward_experts(x)
        shared = self.forward_shared(x)
        total = None
        for e in range(self.num_experts):
            z = self.expert_head(self.expert_map(shared, e).mean((2, 3)), e)
            total = z if total is None else total + z
        return total / self.num_experts

    @torch.no_grad()
    def forward_routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RIDE's routed inference: expert 0 on all samples; before expert k + 1, only the samples whose router k
        says so continue (a stopped sample never resumes). Inference only (no gradient); meant for eval mode, where
        BatchNorm's running statistics make a subset's outputs equal to the full batch's.

        Returns:
            (logits (B, C): mean logits of the experts each sample used, experts_used (B,) int64 in 1..E).
        """
        if self.router is None:
            raise RuntimeError('routed inference needs a router; build the model with router=True')
        shared = self.forward_shared(x)
        feat = self.expert_map(shared, 0).mean((2, 3))
        total = self.expert_head(feat, 0)
        used = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        active = torch.arange(x.shape[0], device=x.device)       # samples still routed; feat rows follow them
        for k in range(1, self.num_experts):
            gate = self.router(k - 1, feat, total[active] / k)
            active = active[torch.sigmoid(gate) > 0.5]
            if active.numel() == 0:
                break
            feat = self.expert_map(shared[active], k).mean((2, 3))
            total[active] += self.expert_head(feat, k)
            used[active] += 1
        return total / used.unsqueeze(1).to(total.dtype), used

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (E, B, D, h, w): every expert's last feature map."""
        shared = self.forward_shared(x)
        return torch.stack([self.expert_map(shared, e) for e in range(self.num_experts)])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(E, B, D, h, w) expert maps -> (B, C) mean logits, or the pooled (E, B, D) features with `pre_logits`."""
        feats = x.mean((3, 4))
        if pre_logits:
            return feats
        return torch.stack([self.expert_head(feats[e], e) for e in range(self.num_experts)]).mean(0)

    # ---------------------------------------------------------------------------------------------------------
    # RIDE stage 2 (router training on frozen experts)
    # ---------------------------------------------------------------------------------------------------------
    def freeze_experts(self) -> None:
        """Freeze everything but the router; BatchNorm layers then stay in eval mode even under `train()`
        (RIDE's `_hook_before_iter`: frozen BN use their running statistics in stage 2)."""
        if self.router is None:
            raise RuntimeError('freeze_experts is for router training; build the model with router=True')
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith('router.'))
        self.experts_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiExpertResNet:
        super().train(mode)
        if mode and self.experts_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_experts_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a stage-1 (router-free) state dict into this model: every non-router key must match exactly.

        Raises:
            RuntimeError: keys other than the router's are missing or unexpected, or shapes differ.
        """
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith('router.')]
        if missing or result.unexpected_keys:
            raise RuntimeError(f'stage-1 state dict does not fit: missing {missing[:5]}, unexpected '
                               f'{list(result.unexpected_keys)[:5]}')


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a RIDE / MDCS checkpoint's `state_dict` onto `MultiExpertResNet` names.

    Strips `module.` (DataParallel) and `backbone.` (their model wrapper), renames the router
    (`expert_help_pred_hidden_fcs` -> `router.hidden_fcs`, `expert_help_pred_fc` -> `router.fc`) and drops the
    heads MDCS builds but never trains (`linear_head`, `linear_few`, `mlp`: MDCS `expert_resnet_cifar.py`).
    """
    renames = (('expert_help_pred_hidden_fcs.', 'router.hidden_fcs.'), ('expert_help_pred_fc.', 'router.fc.'))
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', 'backbone.'):
            key = key.removeprefix(prefix)
        if key.startswith(('linear_head.', 'linear_few.', 'mlp.')):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def _create_multi_expert(variant: str, pretrained: bool = False, **kwargs) -> MultiExpertResNet:
    if pretrained:
        raise ValueError(f'{variant}: no pretrained weights are fetched; train one, or load a released checkpoint '
                         f'with convert_official_state_dict')
    return build_model_with_cfg(MultiExpertResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> dict:
    return {'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
            'interpolation': 'bilinear', 'mean': CIFAR_MEAN, 'std': CIFAR_STD, 'first_conv': 'conv1',
            'classifier': 'linears', **kwargs}


def _cfg_imagenet(**kwargs) -> dict:
    return _cfg(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, **kwargs)


default_cfgs = generate_default_cfgs({
    'ride_resnet32': _cfg(),
    'ride_resnet50': _cfg_imagenet(),
    'ride_resnext50_32x4d': _cfg_imagenet(),
    'mdcs_resnet32': _cfg(),
    'mdcs_resnet50': _cfg_imagenet(),
    'mdcs_resnext50_32x4d': _cfg_imagenet(),
})


def _cifar_args(num_experts: int, reduce_dimension: bool) -> dict:
    # reduce_dimension (RIDE `ride_resnet_cifar.py`): experts at 24 / 48 channels instead of 32 / 64, so that
    # 3 experts cost about as much as one ResNet-32 plus a third.
    return dict(block='basic', layers=(5, 5, 5), widths=(16, 24, 48) if reduce_dimension else (16, 32, 64),
                num_shared_stages=1, num_experts=num_experts, stem='cifar')


def _imagenet_args(num_experts: int, reduce_dimension: bool, cardinality: int, base_width: int) -> dict:
    return dict(block='bottleneck', layers=(3, 4, 6, 3),
                widths=(64, 128, 192, 384) if reduce_dimension else (64, 128, 256, 512), num_shared_stages=2,
                num_experts=num_experts, stem='imagenet', cardinality=cardinality, base_width=base_width,
                router_top_k=50)


def _mdcs_experts(kwargs: dict) -> int:
    # MDCS's loss has one prior exponent per expert (-0.5, 1, 2.5): three experts, no more, no fewer.
    num_experts = kwargs.pop('num_experts', 3)
    if num_experts != 3:
        raise ValueError(f'MDCS uses exactly 3 experts, got num_experts={num_experts}')
    return 3


@register_model
def ride_resnet32(pretrained: bool = False, num_experts: int = 3, reduce_dimension: bool = True,
                  **kwargs) -> MultiExpertResNet:
    """RIDE ResNet-32 (CIFAR): shared stem + layer1, `num_experts` x (layer2 24 ch, layer3 48 ch), cosine heads."""
    return _create_multi_expert('ride_resnet32', pretrained,
                                **dict(_cifar_args(num_experts, reduce_dimension), **kwargs))


@register_model
def ride_resnet50(pretrained: bool = False, num_experts: int = 3, reduce_dimension: bool = True,
                  **kwargs) -> MultiExpertResNet:
    """RIDE ResNet-50 (ImageNet-LT / iNat): shared stem + layer1 + layer2, experts layer3 (192) + layer4 (384)."""
    return _create_multi_expert('ride_resnet50', pretrained,
                                **dict(_imagenet_args(num_experts, reduce_dimension, 1, 64), **kwargs))


@register_model
def ride_resnext50_32x4d(pretrained: bool = False, num_experts: int = 3, reduce_dimension: bool = True,
                         **kwargs) -> MultiExpertResNet:
    """RIDE ResNeXt-50 32x4d (ImageNet-LT): as `ride_resnet50` with 32 groups of width 4 per 64 planes."""
    return _create_multi_expert('ride_resnext50_32x4d', pretrained,
                                **dict(_imagenet_args(num_experts, reduce_dimension, 32, 4), **kwargs))


@register_model
def mdcs_resnet32(pretrained: bool = False, reduce_dimension: bool = True, **kwargs) -> MultiExpertResNet:
    """MDCS ResNet-32 (CIFAR): RIDE's reduced ResNet-32 with exactly 3 experts."""
    experts = _mdcs_experts(kwargs)
    return _create_multi_expert('mdcs_resnet32', pretrained, **dict(_cifar_args(experts, reduce_dimension), **kwargs))


@register_model
def mdcs_resnet50(pretrained: bool = False, reduce_dimension: bool = True, **kwargs) -> MultiExpertResNet:
    """MDCS ResNet-50 (ImageNet-LT / iNat / Places-LT): `ride_resnet50` with exactly 3 experts."""
    experts = _mdcs_experts(kwargs)
    return _create_multi_expert('mdcs_resnet50', pretrained,
                                **dict(_imagenet_args(experts, reduce_dimension, 1, 64), **kwargs))


@register_model
def mdcs_resnext50_32x4d(pretrained: bool = False, reduce_dimension: bool = True, **kwargs) -> MultiExpertResNet:
    """MDCS ResNeXt-50 32x4d (ImageNet-LT): `ride_resnext50_32x4d` with exactly 3 experts."""
    experts = _mdcs_experts(kwargs)
    return _create_multi_expert('mdcs_resnext50_32x4d', pretrained,
                                **dict(_imagenet_args(experts, reduce_dimension, 32, 4), **kwargs))
