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
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
import torch
from torchvision.transforms import v2

from ..config import AugConfig

__all__ = ['resolve_norm', 'default_crop_pct', 'build_train_transform', 'build_eval_transform', 'Cutout']

_AUTO_AUGMENT_POLICIES = {'cifar10': v2.AutoAugmentPolicy.CIFAR10, 'imagenet': v2.AutoAugmentPolicy.IMAGENET,
                          'svhn': v2.AutoAugmentPolicy.SVHN}


class Cutout(torch.nn.Module):
    """Cutout (DeVries & Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", 2017;
    uoguelph-mlrg/Cutout `util/cutout.py`): one square of side `size` around a uniformly drawn centre, clipped at the
    border, set to 0 in [0, 1] pixel space. Applied here after normalisation, where that zero is -mean / std (the
    same image). Written here because torchvision's and timm's random erasing draw areas and aspect ratios, not a
    fixed square with a free centre.

    Args:
        size: side of the square in pixels.
        mean, std: the normalisation already applied.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.size = int(size)
        self.register_buffer('fill', -torch.tensor(mean) / torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) normalised image -> the same image with one square filled."""
        h, w = x.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        x = x.clone()
        x[:, y0:y1, x0:x1] = self.fill.view(-1, 1, 1).to(x.dtype)
        return x


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
    """PIL image -> augmented, normalised (C, img_size, img_size) float tensor.

    Order: crop, flip, rotation, RandAugment | AutoAugment | colour jitter, ToTensor, Normalize, random erasing,
    Cutout. Without rotation, AutoAugment and Cutout, the 'rrc' recipe is timm's `create_transform` itself.
    """
    mean, std = resolve_norm(cfg.mean, cfg.std, in_chans)
    if cfg.auto_augment and cfg.rand_augment:
        raise ValueError('aug.auto_augment and aug.rand_augment are alternatives: set one of them to null')
    extras = cfg.rotate or cfg.auto_augment or cfg.cutout
    if cfg.crop == 'rrc' and not extras:
        return create_transform(
            img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            auto_augment=cfg.rand_augment, color_jitter=cfg.color_jitter, interpolation=cfg.interpolation,
            mean=mean, std=std, re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count)
    interp = v2.InterpolationMode.BICUBIC if cfg.interpolation == 'bicubic' else v2.InterpolationMode.BILINEAR
    if cfg.crop == 'rrc':
        ops = [RandomResizedCropAndInterpolation(img_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                                 interpolation=cfg.interpolation)]
    elif cfg.crop == 'pad_crop':
        ops = [v2.RandomCrop(img_size, padding=cfg.padding)]
    else:
        ops = [v2.Resize((img_size, img_size), interpolation=interp)]
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.rotate:
        ops.append(v2.RandomRotation(cfg.rotate))
    if cfg.auto_augment:
        fill = [min(255, round(255 * m)) for m in mean]
        ops.append(v2.AutoAugment(_AUTO_AUGMENT_POLICIES[cfg.auto_augment], fill=fill))
    elif cfg.rand_augment:
        # the same hparams timm's create_transform passes (incl. the interpolation of the geometric ops)
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=str_to_pil_interp(cfg.interpolation))
        ops.append(rand_augment_transform(cfg.rand_augment, hparams))
    elif cfg.color_jitter:
        ops.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if cfg.re_prob > 0:
        ops.append(RandomErasing(cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count, device='cpu'))
    if cfg.cutout:
        ops.append(Cutout(cfg.cutout, mean, std))
    return v2.Compose(ops)


def build_eval_transform(img_size: int, crop_pct: float, interpolation: str, mean, std, in_chans: int = 3):
    """Resize to img_size / crop_pct, centre crop img_size, normalise (timm's eval transform)."""
    mean, std = resolve_norm(mean, std, in_chans)
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=mean, std=std)
