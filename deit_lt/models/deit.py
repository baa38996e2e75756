"""Small-image DeiT students, registered in timm's model registry.

The paper's students are timm's own `deit_{tiny,small,base}_distilled_patch16_224` (CLS + DIST tokens). For
native-resolution CIFAR we add the same architectures with 4x4 patches at 32x32 (8x8 = 64 patch tokens), and
a 4-block "micro" DeiT with 2x2 patches at 8x8 for the bundled digits dataset. Non-distilled twins (CLS token
only) serve as the ViT baseline. All are timm `VisionTransformerDistilled` / `VisionTransformer` instances built
through `build_model_with_cfg`, so `timm.create_model(name, num_classes=..., drop_path_rate=..., in_chans=...)`
works as for any timm model; none has pretrained weights (nothing is ever downloaded).

AGLU students (Alexandridis et al., "Adaptive Parametric Activation", ECCV 2024): every model here takes
`act_layer='aglu'`, which replaces the GELU of each block's MLP by its own AGLU (one scalar kappa and lambda per
block, the 'swin' init of the official code, kostas1515/AGLU@ed45253ea23421bf1ef5f78773b4a28d433fa620
mmdetection_v3.2/mmdet/models/backbones/swin.py:52-79, the one transformer MLP with AGLU in the official code), with
`act_kwargs` for other AGLU settings. The `*_aglu` names register the same students with AGLU as their default,
including the paper-size `deit_base_distilled_patch16_224_aglu` (timm's own `deit_base_distilled_patch16_224` is
built by timm, which does not know the name 'aglu'). The attention softmax is left alone: the official README also
trains plain ViTs with an APA attention (`--attn gumbel`, kostas1515/AGLU@293a1b3aa0a3072dd0d6e62ee9a710c5f8a86952
classification/README.md:48), whose model code is not among the repository files read here.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import checkpoint_filter_fn

from .layers.apa import AGLU, resolve_act_layer

__all__ = []  # filled by register_model

_SIZES = {
    'micro': dict(embed_dim=96, depth=4, num_heads=3),
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
}


def _cfg(img_size: int, **kwargs):
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, img_size, img_size), 'pool_size': None, 'crop_pct': 1.0,
        'interpolation': 'bicubic', 'fixed_input_size': True, 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f'deit_{s}_distilled_patch4_32.untrained': _cfg(32, classifier=('head', 'head_dist'))
       for s in ('tiny', 'small', 'base')},
    **{f'deit_{s}_patch4_32.untrained': _cfg(32) for s in ('tiny', 'small', 'base')},
    'deit_micro_distilled_patch2_8.untrained': _cfg(8, classifier=('head', 'head_dist')),
    'deit_micro_patch2_8.untrained': _cfg(8),
    **{f'deit_{s}_distilled_patch4_32_aglu.untrained': _cfg(32, classifier=('head', 'head_dist'))
       for s in ('tiny', 'small', 'base')},
    'deit_micro_distilled_patch2_8_aglu.untrained': _cfg(8, classifier=('head', 'head_dist')),
    # timm's DeiT cfg for 224 px (crop 0.875); only informative, the data configs set the transforms.
    'deit_base_distilled_patch16_224_aglu.untrained': _cfg(224, crop_pct=0.875, classifier=('head', 'head_dist')),
})


def _act_layer(act_layer: Any, act_kwargs: dict[str, Any] | None):
    """The MLP activation constructor: 'aglu' (or the AGLU class) -> AGLU with the transformer ('swin') init and
    scalar parameters; other names / classes as timm takes them (act_kwargs bound to them if given)."""
    if act_layer is AGLU or (isinstance(act_layer, str) and act_layer.lower() == 'aglu'):
        return resolve_act_layer('aglu', **dict(dict(init='swin'), **(act_kwargs or {})))
    if act_kwargs:
        return resolve_act_layer('gelu' if act_layer is None else act_layer, **act_kwargs)
    return act_layer    # a timm name or class (None: timm's GELU), resolved by timm itself


def _create(variant: str, size: str, default_patch: int, default_img: int, distilled: bool, pretrained: bool,
            default_act: str | None = None, **kwargs):
    if pretrained:
        raise ValueError(f'{variant} has no pretrained weights; DeiT-LT students are trained from scratch')
    act_kwargs = kwargs.pop('act_kwargs', None)
    act_layer = kwargs.pop('act_layer', default_act)
    if act_layer is not None or act_kwargs:
        kwargs['act_layer'] = _act_layer(act_layer, act_kwargs)
    model_args = dict(img_size=default_img, patch_size=default_patch, **_SIZES[size])   # kwargs may override
    return build_model_with_cfg(
        VisionTransformerDistilled if distilled else VisionTransformer,
        variant,
        pretrained=False,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),
        **dict(model_args, **kwargs),
    )


@register_model
def deit_tiny_distilled_patch4_32(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-Ti with CLS + DIST tokens, 4x4 patches at 32x32 (CIFAR at native resolution)."""
    return _create('deit_tiny_distilled_patch4_32', 'tiny', 4, 32, True, pretrained, **kwargs)


@register_model
def deit_small_distilled_patch4_32(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-S with CLS + DIST tokens, 4x4 patches at 32x32."""
    return _create('deit_small_distilled_patch4_32', 'small', 4, 32, True, pretrained, **kwargs)


@register_model
def deit_base_distilled_patch4_32(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-B with CLS + DIST tokens, 4x4 patches at 32x32."""
    return _create('deit_base_distilled_patch4_32', 'base', 4, 32, True, pretrained, **kwargs)


@register_model
def deit_tiny_patch4_32(pretrained=False, **kwargs) -> VisionTransformer:
    """ViT baseline (CLS token only) of DeiT-Ti size, 4x4 patches at 32x32."""
    return _create('deit_tiny_patch4_32', 'tiny', 4, 32, False, pretrained, **kwargs)


@register_model
def deit_small_patch4_32(pretrained=False, **kwargs) -> VisionTransformer:
    """ViT baseline of DeiT-S size, 4x4 patches at 32x32."""
    return _create('deit_small_patch4_32', 'small', 4, 32, False, pretrained, **kwargs)


@register_model
def deit_base_patch4_32(pretrained=False, **kwargs) -> VisionTransformer:
    """ViT baseline of DeiT-B size, 4x4 patches at 32x32."""
    return _create('deit_base_patch4_32', 'base', 4, 32, False, pretrained, **kwargs)


@register_model
def deit_micro_distilled_patch2_8(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """4-block, 96-wide DeiT with CLS + DIST tokens, 2x2 patches at 8x8 (the bundled digits dataset)."""
    return _create('deit_micro_distilled_patch2_8', 'micro', 2, 8, True, pretrained, **kwargs)


@register_model
def deit_micro_patch2_8(pretrained=False, **kwargs) -> VisionTransformer:
    """ViT baseline of the micro size, 2x2 patches at 8x8."""
    return _create('deit_micro_patch2_8', 'micro', 2, 8, False, pretrained, **kwargs)


@register_model
def deit_base_distilled_patch16_224_aglu(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-B/16 at 224 px with CLS + DIST tokens (the DeiT-LT paper's student) and AGLU in every MLP."""
    return _create('deit_base_distilled_patch16_224_aglu', 'base', 16, 224, True, pretrained, 'aglu', **kwargs)


@register_model
def deit_tiny_distilled_patch4_32_aglu(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-Ti/4 at 32 px with CLS + DIST tokens and AGLU in every MLP."""
    return _create('deit_tiny_distilled_patch4_32_aglu', 'tiny', 4, 32, True, pretrained, 'aglu', **kwargs)


@register_model
def deit_small_distilled_patch4_32_aglu(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-S/4 at 32 px with CLS + DIST tokens and AGLU in every MLP (the fast CIFAR setting)."""
    return _create('deit_small_distilled_patch4_32_aglu', 'small', 4, 32, True, pretrained, 'aglu', **kwargs)


@register_model
def deit_base_distilled_patch4_32_aglu(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """DeiT-B/4 at 32 px with CLS + DIST tokens and AGLU in every MLP."""
    return _create('deit_base_distilled_patch4_32_aglu', 'base', 4, 32, True, pretrained, 'aglu', **kwargs)


@register_model
def deit_micro_distilled_patch2_8_aglu(pretrained=False, **kwargs) -> VisionTransformerDistilled:
    """The micro DeiT (digits, tests) with CLS + DIST tokens and AGLU in every MLP."""
    return _create('deit_micro_distilled_patch2_8_aglu', 'micro', 2, 8, True, pretrained, 'aglu', **kwargs)
