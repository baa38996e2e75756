"""Configuration of label-free clustering training (`tools/cluster.py`).

`ClusterTrainConfig` reuses the shared sections of `deit_lt.config` (data, augmentation, optimizer, runtime, W&B:
the same keys mean the same things as for the student) with P²OT's recipe as defaults, plus a model section (the
backbone and what of it trains) and a cluster section (heads, the OT pseudo-labeller, the memory bank, SP²OT,
baselines). Defaults follow the official P²OT code, rhfeiyang/PPOT@bd6721c4b5f6581ae5cd896eba9cc9250c769997:
train.py:36-63 (arguments), utils/common_config.py:101-190 (transforms, Adam, per-epoch cosine), models/dino.py:7-19
(only the last ViT block trains), models/classifer.py:8-20 (cosine head, scale 10). SP²OT's additions follow
rhfeiyang/SPPOT@788a7a4670cc6c3205566cfda4d7fa502343daa8 (README commands, utils/sinkhorn_knopp.py `MMOT`).
`validate_config` turns impossible settings into one ConfigError before any data is read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from ..config import AugConfig, DataConfig, OptimConfig, RuntimeConfig, WandbConfig
from ..errors import ConfigError
from .ot import OT_MODES

__all__ = ['ClusterModelConfig', 'ClusterConfig', 'ClusterAugConfig', 'ClusterOptimConfig', 'ClusterTrainConfig',
           'validate_config', 'KMEANS_FEATURES']

# what the k-means baselines cluster: the evaluation images themselves, the backbone features before training
# (what P²OT starts from), the backbone features of the model being evaluated
KMEANS_FEATURES = ('pixels', 'init', 'trained')


@dataclasses.dataclass
class ClusterModelConfig:
    """The backbone: a timm model name (weights from `pretrained_file`, or random), or a deit-lt model file."""
    # timm name, e.g. vit_base_patch16_224.dino (DINO ViT-B/16, the papers' backbone) or deit_micro_patch2_8
    name: str = 'vit_base_patch16_224.dino'
    # A state dict on disk for `name`, loaded through timm's pretrained-file override
    # (pretrained_cfg_overlay=dict(file=...)), never downloaded; .pth/.pt/.bin/.safetensors, plain or under
    # 'state_dict' / 'model'. DINO's dino_vitbase16_pretrain.pth fits vit_base_patch16_224.dino. null: random init.
    pretrained_file: str | None = None
    # A deit-lt model file (best.safetensors / last.safetensors of tools/train.py or tools/train_teacher.py) whose
    # network is the backbone (its classifier is dropped); replaces `name` and `pretrained_file`.
    checkpoint: str | None = None
    # Trainable part: the last N transformer blocks (`model.blocks`, ViTs; 1 = P²OT's block 11 of 12; 0 = only the
    # heads) or 'all' (every parameter: a network trained from scratch). The final norm, patch embedding and tokens
    # stay frozen unless 'all'.
    train_blocks: int | Literal['all'] = 1
    # input size: passed to models that take one (ViTs); a CNN takes any, and the data is resized to it. null: the
    # model's own (a checkpoint: the size it was trained at)
    img_size: int | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)   # more timm.create_model arguments


@dataclasses.dataclass
class ClusterConfig:
    """Cluster heads and the P²OT / SP²OT pseudo-labeller (`deit_lt.cluster.ot`)."""
    num_clusters: int | None = None     # K; null: the number of classes of the data (the papers' protocol)
    num_heads: int = 1                  # independent heads of K clusters (PPOT: 2 on CIFAR-100, 1 elsewhere)
    logit_scale: float = 10.0           # cosine head: logits = scale * cos(feature, prototype)
    # OT problem: 'ppot' (progressive partial OT), 'uot' (rho fixed to 1), 'pot' (exact uniform cluster sizes)
    mode: Literal['ppot', 'uot', 'pot'] = 'ppot'
    epsilon: float = 0.1                # entropic regularisation (sk_factor)
    lam: float = 1.0                    # KL weight of the cluster-size marginal (gamma_bound)
    tol: float = 1e-6                   # scaling stops when ||b - b_prev|| <= tol (SP²OT: 1e-10)
    max_iter: int = 1000                # scaling iteration cap (sk_iter_limit)
    warm_start: bool = True             # start each solve from the previous column scaling
    # transported mass rho_t = rho0 + (rho_max - rho0) * ramp(t / T), t = optimizer update, T = all updates
    rho0: float = 0.1
    rho_max: float = 1.0
    rho_strategy: Literal['sigmoid', 'linear'] = 'sigmoid'
    # FIFO bank of logits per head that the OT is solved on (PPOT: 10 x batch = 5120); 0 = the batch only.
    bank_size: int = 5120
    # First 0-based epoch that uses the bank (PPOT: 1; SP²OT's README: 0, 1 for iNat1000); the bank is filled at
    # that epoch's start from the first training batches (view 0, eval mode), before epoch 0 the OT sees the batch.
    bank_start_epoch: int = 1
    # SP²OT: add the k-NN semantic term, solved by majorisation-minimisation
    sp2ot: bool = False
    mm_factor: float = 1000.0           # lam1 = (1 - rho) * mm_factor (tuned for a ~5120-sample bank)
    mm_tol: float = 1e-6
    mm_max_iter: int = 100
    knn: int = 20                       # neighbours per sample in the similarity graph
    knn_sigma: float = 2.0              # S_ij = exp(-||f_i - f_j||^2 / (2 sigma^2 d))
    # Evaluation: also cluster the training images (split 'train_set', eval transform), as the papers report both
    eval_train: bool = True
    # k-means baselines evaluated beside the heads (predictors 'kmeans_<features>'): see KMEANS_FEATURES
    kmeans: list[Literal['pixels', 'init', 'trained']] = dataclasses.field(default_factory=list)
    kmeans_n_init: int = 10


@dataclasses.dataclass
class ClusterAugConfig(AugConfig):
    """One augmented view (both views by default): P²OT's resize-256 / random-crop-224 / flip recipe, approximated by
    a fixed-area square RandomResizedCrop (0.875^2 of the image), with no RandAugment, erasing or repeats."""
    crop: Literal['rrc', 'pad_crop', 'none'] = 'rrc'
    scale: tuple[float, float] = (0.765625, 0.765625)
    ratio: tuple[float, float] = (1.0, 1.0)
    rand_augment: str | None = None
    re_prob: float = 0.0
    repeated_aug: int = 1


@dataclasses.dataclass
class ClusterOptimConfig(OptimConfig):
    """`OptimConfig` with P²OT's schedule: Adam 5e-4 without weight decay, batch 512, 50 epochs, an epoch-wise cosine
    to lr * 0.1^3 and no warmup."""
    opt: str = 'adam'
    lr: float = 5e-4
    lr_base_batch: int | None = None    # the recipe gives the lr for its batch: no scaling
    weight_decay: float = 0.0
    epochs: int = 50
    batch_size: int = 512
    accum_steps: int = 1
    sched: Literal['cosine', 'multistep', 'constant'] = 'cosine'
    sched_unit: Literal['update', 'epoch'] = 'epoch'
    warmup_epochs: float = 0
    warmup_lr: float | None = None
    min_lr: float = 5e-7


@dataclasses.dataclass
class ClusterTrainConfig:
    """Everything tools/cluster.py reads."""
    name: str = 'p2ot'
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ClusterModelConfig = dataclasses.field(default_factory=ClusterModelConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    aug: ClusterAugConfig = dataclasses.field(default_factory=ClusterAugConfig)
    # the second view's augmentation; null: the same as `aug`, drawn independently (PPOT)
    aug2: ClusterAugConfig | None = None
    optim: ClusterOptimConfig = dataclasses.field(default_factory=ClusterOptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=lambda: RuntimeConfig(output_dir='runs/cluster'))
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


def validate_config(cfg: ClusterTrainConfig) -> None:
    """Reject settings that cannot train, naming the key (all problems in one error). Checks that need the data
    (bank against the epoch, K) happen once it is loaded."""
    m, c, o = cfg.model, cfg.cluster, cfg.optim
    errors = []
    if cfg.data.bad_images == 'skip':
        errors.append('data.bad_images=skip replaces an unreadable image by another of its class, which uses labels; '
                      'a clustering run must not: fix or remove the image (data.verify=decode finds them all)')
    if m.checkpoint is not None and m.pretrained_file is not None:
        errors.append('model.checkpoint and model.pretrained_file both give backbone weights: set one')
    for key in ('checkpoint', 'pretrained_file'):
        path = getattr(m, key)
        if path is not None and not Path(path).expanduser().is_file():
            errors.append(f'model.{key}={path}: no such file')
    if '.' in m.name and m.checkpoint is None and m.pretrained_file is None:
        errors.append(f'model.name={m.name} names pretrained weights (tag {m.name.split(".", 1)[1]!r}): give them as '
                      f'model.pretrained_file=/path/to/weights (nothing is downloaded), or name the architecture '
                      f'without the tag for a random init')
    if m.train_blocks != 'all' and m.train_blocks < 0:
        errors.append(f"model.train_blocks must be >= 0 or 'all', got {m.train_blocks}")
    if m.img_size is not None and m.img_size < 1:
        errors.append(f'model.img_size must be >= 1, got {m.img_size}')
    if c.num_clusters is not None and c.num_clusters < 2:
        errors.append(f'cluster.num_clusters must be >= 2, got {c.num_clusters}')
    if c.num_heads < 1:
        errors.append(f'cluster.num_heads must be >= 1, got {c.num_heads}')
    if c.mode not in OT_MODES:
        errors.append(f'cluster.mode must be one of {OT_MODES}, got {c.mode!r}')
    for key in ('logit_scale', 'epsilon', 'tol', 'knn_sigma'):
        if not getattr(c, key) > 0:
            errors.append(f'cluster.{key} must be > 0, got {getattr(c, key)}')
    if c.lam < 0:
        errors.append(f'cluster.lam must be >= 0, got {c.lam}')
    if c.max_iter < 1 or c.mm_max_iter < 1:
        errors.append('cluster.max_iter and cluster.mm_max_iter must be >= 1')
    if not 0 < c.rho0 <= c.rho_max <= 1:
        errors.append(f'the transported mass needs 0 < cluster.rho0 <= cluster.rho_max <= 1, got rho0={c.rho0}, '
                      f'rho_max={c.rho_max}')
    if c.bank_size < 0:
        errors.append(f'cluster.bank_size must be >= 0 (0 = no bank), got {c.bank_size}')
    if c.bank_size and not 0 <= c.bank_start_epoch < o.epochs:
        errors.append(f'cluster.bank_start_epoch={c.bank_start_epoch} is outside the schedule of optim.epochs='
                      f'{o.epochs} (0-based epochs); lower it, or set cluster.bank_size=0 for no bank')
    if c.sp2ot and (c.knn < 1 or c.mm_factor < 0 or c.mm_tol <= 0):
        errors.append('SP²OT needs cluster.knn >= 1, cluster.mm_factor >= 0 and cluster.mm_tol > 0')
    if c.kmeans_n_init < 1:
        errors.append(f'cluster.kmeans_n_init must be >= 1, got {c.kmeans_n_init}')
    if o.epochs < 1:
        errors.append(f'optim.epochs must be >= 1, got {o.epochs}')
    if o.lr <= 0:
        errors.append(f'optim.lr must be > 0, got {o.lr}')
    if not 0 <= o.warmup_epochs < max(o.epochs, 1):
        errors.append(f'optim.warmup_epochs must be in [0, optim.epochs={o.epochs}), got {o.warmup_epochs}')
    for name, aug in (('aug', cfg.aug), ('aug2', cfg.aug2)):
        if aug is not None and aug.repeated_aug != 1:
            errors.append(f'{name}.repeated_aug must be 1: repeated images in a batch would share OT targets')
    if cfg.aug.sampler != 'instance':
        errors.append(f'aug.sampler={cfg.aug.sampler} draws images by their class labels; clustering trains without '
                      f'labels: use aug.sampler=instance')
    if errors:
        raise ConfigError('invalid cluster config: ' + '; '.join(errors))
