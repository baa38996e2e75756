"""The clustering network of P²OT / SP²OT: a backbone frozen except its last block(s), cosine prototype heads, and the
pseudo-labeller's training state held as buffers.

Backbone (rhfeiyang/PPOT@bd6721c4b5f6581ae5cd896eba9cc9250c769997 models/dino.py:7-19): the pooled pre-logits
features of any timm model built with `num_classes=0` (a ViT's class token after the final norm; a distilled
DeiT's mean of the class and distillation tokens); only the last `train_blocks` transformer blocks train, the final
norm stays frozen, or everything trains ('all', a network from scratch).

Heads (PPOT models/classifer.py:8-20): logits = scale * <x / |x|, w_k / |w_k|>, which is the official weight-normed
linear layer with its gain fixed to 1; one head per `num_heads`, each with K prototypes.

`OTState` holds what the pseudo-labeller carries from step to step: the FIFO logit banks, each head's last column
scaling (the solver's warm start) and the running loss of the epoch (which head is evaluated). Being buffers of the
model, they are written into every resumable checkpoint by the run loop and restored with the weights, so a resumed
run continues exactly; they also travel with `.to()` and, under DDP, are kept identical on every process (the
recipe gathers the logits before solving).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_model_file
from ..errors import CheckpointError, ConfigError
from ..models.factory import create_model_from_checkpoint, load_state_dict_checked
from .config import ClusterModelConfig
from .losses import MemoryBank

__all__ = ['CosineHead', 'OTState', 'ClusterModel', 'create_backbone', 'set_trainable', 'load_cluster_model',
           'CLUSTER_ARCH']

CLUSTER_ARCH = 'p2ot_cluster'   # `arch` of the model files this recipe writes (load them with load_cluster_model)


class CosineHead(nn.Module):
    """K prototypes; logits are `scale` times the cosine between the feature and each prototype.

    Args:
        dim: feature width.
        num_clusters: K.
        scale: logit scale (PPOT `logit_factor`, 10).
    """

    def __init__(self, dim: int, num_clusters: int, scale: float = 10.0):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_clusters, dim))
        # nn.Linear's default init, as the official weight-normed layer starts from it
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) features -> (B, K) logits."""
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()


class OTState(nn.Module):
    """Training state of the pseudo-labeller, as buffers (saved and restored with the weights).

    Attributes:
        banks: one `MemoryBank` of K-wide logits per head (empty without a bank).
        log_b: (H, K + 1) float64 log column scaling of each head's last solve.
        warm: (H,) whether `log_b` holds a solve yet.
        loss_sum: (H,) float64 sum of each head's loss over the steps of epoch `loss_epoch` (all processes).
        loss_epoch: the epoch `loss_sum` belongs to (-1: none yet).
    """

    def __init__(self, num_heads: int, num_clusters: int, bank_size: int):
        super().__init__()
        self.banks = nn.ModuleList([MemoryBank(bank_size, num_clusters) for _ in range(num_heads)] if bank_size else [])
        self.register_buffer('log_b', torch.zeros(num_heads, num_clusters + 1, dtype=torch.float64))
        self.register_buffer('warm', torch.zeros(num_heads, dtype=torch.bool))
        self.register_buffer('loss_sum', torch.zeros(num_heads, dtype=torch.float64))
        self.register_buffer('loss_epoch', torch.full((), -1, dtype=torch.long))

    @torch.no_grad()
    def add_losses(self, losses: torch.Tensor, epoch: int) -> None:
        """Add one step's (H,) head losses to the sums of `epoch` (restarting them when the epoch changes)."""
        if int(self.loss_epoch) != epoch:
            self.loss_sum.zero_()
            self.loss_epoch.fill_(epoch)
        self.loss_sum += losses.detach().to(self.loss_sum)

    def best_head(self) -> int:
        """The head with the lowest loss in the last epoch (PPOT's evaluated head); 0 before any training."""
        if int(self.loss_epoch) < 0:
            return 0
        return int(torch.argmin(self.loss_sum))


class ClusterModel(nn.Module):
    """Backbone + `num_heads` cosine heads; `forward` gives (H, B, K) logits.

    Args:
        backbone: a module mapping images to (B, feature_dim) features (a timm model with `num_classes=0`).
        feature_dim: width of those features.
        num_clusters: K per head.
        num_heads: H.
        logit_scale: cosine-head scale.
        bank_size: rows of each head's logit bank (0: none).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_clusters: int, num_heads: int = 1,
                 logit_scale: float = 10.0, bank_size: int = 0):
        super().__init__()
        self.backbone = backbone
        self.feature_dim, self.num_clusters, self.num_heads = int(feature_dim), int(num_clusters), int(num_heads)
        self.heads = nn.ModuleList([CosineHead(feature_dim, num_clusters, logit_scale) for _ in range(num_heads)])
        self.ot_state = OTState(num_heads, num_clusters, bank_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, feature_dim) backbone features."""
        return self.backbone(x)

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) -> (H, B, K) logits of every head."""
        return torch.stack([head(features) for head in self.heads])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(self.forward_features(x))


def _feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, 'head_hidden_size', None) or getattr(backbone, 'num_features', None)
    if not dim:
        raise ConfigError(f'{type(backbone).__name__} does not say its feature width (timm num_features)')
    return int(dim)


def create_backbone(cfg: ClusterModelConfig, in_chans: int) -> tuple[nn.Module, str, dict[str, Any], int]:
    """The backbone of `cfg` without classifier: (module, timm arch, its kwargs incl. in_chans, input size).

    A deit-lt model file (`cfg.checkpoint`) is rebuilt from its metadata and loaded; otherwise `timm.create_model`
    builds `cfg.name`, with weights from `cfg.pretrained_file` through timm's pretrained-file override (never a
    download) or randomly initialised.

    Raises:
        ConfigError: unknown model, channels that do not fit, a model without `reset_classifier`.
        CheckpointError: weights that do not fit the model.
    """
    if cfg.checkpoint is not None:
        model, meta = create_model_from_checkpoint(cfg.checkpoint)
        arch, kwargs = meta['arch'], dict(meta.get('model_kwargs') or {})
        if int(meta.get('in_chans', kwargs.get('in_chans', 3))) != in_chans:
            raise ConfigError(f'model.checkpoint={cfg.checkpoint} takes {meta.get("in_chans")}-channel images, the '
                              f'data has {in_chans}')
        if cfg.img_size is not None and cfg.img_size != meta.get('img_size'):
            raise ConfigError(f'model.img_size={cfg.img_size}: the checkpoint was trained at {meta.get("img_size")} '
                              f'px; leave model.img_size null')
        if not hasattr(model, 'reset_classifier'):
            raise ConfigError(f'model.checkpoint={cfg.checkpoint}: {arch} has no reset_classifier(); use a ViT')
        model.reset_classifier(0)
        model.train()
        return model, arch, kwargs, int(meta.get('img_size') or _input_size(model))
    kwargs = dict(cfg.kwargs, in_chans=in_chans)
    extra: dict[str, Any] = {}
    if cfg.pretrained_file is not None:
        extra = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(os.path.expanduser(cfg.pretrained_file))))
    try:
        try:
            model = timm.create_model(cfg.name, num_classes=0, **kwargs, **extra,
                                      **({'img_size': cfg.img_size} if cfg.img_size is not None else {}))
            if cfg.img_size is not None:
                kwargs['img_size'] = cfg.img_size
        except TypeError as e:
            if cfg.img_size is None or 'img_size' not in str(e):
                raise
            # a CNN takes any input size: model.img_size is then only the size the data is brought to
            model = timm.create_model(cfg.name, num_classes=0, **kwargs, **extra)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ConfigError(f'model.name={cfg.name!r} is not a timm model') from None
        if cfg.pretrained_file is not None:   # state-dict keys or shapes that do not fit
            raise CheckpointError(f'model.pretrained_file={cfg.pretrained_file} does not fit {cfg.name}: '
                                  f'{str(e).splitlines()[0]}') from None
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f'model.name={cfg.name!r}: {e} (check model.kwargs)') from None
    if cfg.pretrained_file is not None:
        _check_loaded(model, cfg.pretrained_file, cfg.name)
    return model, cfg.name, kwargs, cfg.img_size or _input_size(model)


def _check_loaded(model: nn.Module, path: str, name: str) -> None:
    """timm loads a pretrained file non-strictly whenever the model's class count differs from the weights' (here
    always: num_classes=0), so missing weights would silently stay random; every weight of the model must come
    from the file (after the model family's own key conversion, `checkpoint_filter_fn`)."""
    state_dict = timm.models.load_state_dict(os.path.expanduser(path))
    convert = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if convert is not None:
        state_dict = convert(state_dict, model)
    missing = [k for k in model.state_dict() if k not in state_dict]
    if missing:
        raise CheckpointError(f'model.pretrained_file={path} does not fit {name}: no weights for {missing[:4]}'
                              f'{" ..." if len(missing) > 4 else ""} ({len(missing)} tensors)')


def _input_size(model: nn.Module) -> int:
    pe = getattr(model, 'patch_embed', None)
    if pe is not None and getattr(pe, 'img_size', None) is not None:
        return int(pe.img_size[0])
    return int(model.pretrained_cfg['input_size'][-1])


def set_trainable(backbone: nn.Module, train_blocks: int | str) -> int:
    """Freeze the backbone except its last `train_blocks` blocks (0: all of it; 'all': none of it); returns the
    number of trainable backbone parameters.

    Raises:
        ConfigError: a block count for a backbone without `.blocks`, or more blocks than it has.
    """
    for p in backbone.parameters():
        p.requires_grad_(train_blocks == 'all')
    if train_blocks not in ('all', 0):
        blocks = getattr(backbone, 'blocks', None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise ConfigError(f"model.train_blocks={train_blocks} needs a backbone with transformer blocks "
                              f"(.blocks); {type(backbone).__name__} has none: use model.train_blocks=all or 0")
        if train_blocks > len(blocks):
            raise ConfigError(f'model.train_blocks={train_blocks} but the backbone has {len(blocks)} blocks')
        for block in list(blocks)[len(blocks) - int(train_blocks):]:
            for p in block.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)


def load_cluster_model(path: str | os.PathLike, device: str | torch.device = 'cpu') -> tuple[ClusterModel, dict]:
    """Rebuild a clustering model from a model file of `tools/cluster.py` (best / last / checkpoint); returns
    (model in eval mode on `device`, metadata). Predict clusters with
    `model(x)[model.ot_state.best_head()].argmax(1)`: the head with the lowest loss in the file's last epoch."""
    state_dict, meta = load_model_file(path)
    if not meta or meta.get('arch') != CLUSTER_ARCH:
        raise CheckpointError(f'{path} is not a clustering model file of tools/cluster.py')
    bb = meta['backbone']
    backbone = timm.create_model(bb['arch'], pretrained=False, num_classes=0, **bb['model_kwargs'])
    model = ClusterModel(backbone, meta['feature_dim'], meta['num_clusters'], meta['num_heads'],
                         meta['logit_scale'], meta['bank_size'])
    load_state_dict_checked(model, state_dict, str(path))
    return model.to(device).eval(), meta
