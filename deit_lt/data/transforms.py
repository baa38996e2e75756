"""Per-image (PIL) transforms: the reference augmentation path, run in DataLoader workers.

The student recipe is timm's `create_transform(is_training=True)` exactly as DeiT / DeiT-LT use it
(RandomResizedCrop -> flip -> RandAugment -> ToTensor -> Normalize -> RandomErasing); the CIFAR CNN-teacher recipe is
pad-and-crop + flip. `deit_lt.data.gpu_aug` implements the same families batched on the device; its tests compare
the two distributions.
"""
from __future__ import annotations

from typing import Sequence

from timm.data import create_transform
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
import torch
from torchvision.transforms import v2

from ..config import AugConfig

__all__ = ['resolve_norm', 'default_crop_pct', 'build_train_transform', 'build_eval_transform']


def resolve_norm(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple, tuple]:
    """Mean/std with one entry per channel; a 3-entry RGB normalisation is averaged for 1-channel images."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std):
        raise ValueError(f'mean and std differ in length: {mean} vs {std}')
    if len(mean) == in_chans:
        return mean, std
    if in_chans == 1 and len(mean) == 3:
        return (sum(mean) / 3,), (sum(std) / 3,)
    raise ValueError(f'normalisation has {len(mean)} channels but the images have {in_chans}')


def default_crop_pct(cfg: AugConfig, img_size: int, native_size: int | None) -> float:
    """Eval crop fraction: the configured one, else 1.0 at the data's native size and DeiT's 0.875 otherwise."""
    if cfg.eval_crop_pct is not None:
        return cfg.eval_crop_pct
    return 1.0 if native_size is not None and native_size == img_size else 0.875


def build_train_transform(cfg: AugConfig, img_size: int, in_chans: int = 3):
    """PIL image -> augmented, normalised (C, img_size, img_size) float tensor."""
    mean, std = resolve_norm(cfg.mean, cfg.std, in_chans)
    if cfg.crop == 'rrc':
        return create_transform(
            img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            auto_augment=cfg.rand_augment, color_jitter=cfg.color_jitter, interpolation=cfg.interpolation,
            mean=mean, std=std, re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count)
    interp = v2.InterpolationMode.BICUBIC if cfg.interpolation == 'bicubic' else v2.InterpolationMode.BILINEAR
    ops = [v2.RandomCrop(img_size, padding=cfg.padding) if cfg.crop == 'pad_crop' else
           v2.Resize((img_size, img_size), interpolation=interp)]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.rand_augment:
        # the same hparams timm's create_transform passes (incl. the interpolation of the geometric ops)
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=str_to_pil_interp(cfg.interpolation))
        ops.append(rand_augment_transform(cfg.rand_augment, hparams))
    elif cfg.color_jitter:
        ops.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if cfg.re_prob > 0:
        ops.append(RandomErasing(cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count, device='cpu'))
    return v2.Compose(ops)


def build_eval_transform(img_size: int, crop_pct: float, interpolation: str, mean, std, in_chans: int = 3):
    """Resize to img_size / crop_pct, centre crop img_size, normalise (timm's eval transform)."""
    mean, std = resolve_norm(mean, std, in_chans)
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=mean, std=std)
