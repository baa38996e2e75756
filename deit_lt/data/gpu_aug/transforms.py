"""The training and evaluation transforms of the device placement, composed from the batched ops."""
from __future__ import annotations

import math

import torch

from deit_lt.config import AugConfig

from ._common import _check_generator, _rand, resolve_channel_stats
from .erasing import apply_erasing, sample_erasing
from .randaugment import BatchedRandAugment, apply_ops
from .resize import _FILTER_SUPPORT, _pad_crop_weights, resample, resize_weights, sample_rrc_boxes

__all__ = ['DeviceAugment', 'DeviceEvalTransform']


# --------------------------------------------------------------------------------------------------------------

class DeviceAugment:
    """The timm/DeiT training transform, batched on the images' device with per-sample randomness.

    crop ('rrc' | 'pad_crop' | 'none') -> horizontal flip -> RandAugment (or, without it, optional colour jitter)
    -> normalise -> random erasing. Mixup/CutMix are applied later by the engine.

    Colour jitter (``cfg.color_jitter`` = j, only when ``cfg.rand_augment`` is null, as in timm) is torchvision's
    ``ColorJitter(j, j, j)`` on PIL images: brightness, contrast and saturation factors uniform in
    [max(0, 1 - j), 1 + j], applied in a random order per sample with ``ImageEnhance`` semantics.

    1-channel images: statistics with three entries are averaged (``resolve_channel_stats``); colour ops (Color,
    saturation) are the identity, as in PIL for 'L' images.

    Args:
        cfg: Augmentation section of the config.
        img_size: Output size (square).
        in_chans: Number of image channels (1 or 3).
        precise: float64 interpolation in RandAugment's geometric ops, bit-exact with PIL (default). False uses
            float32: about half the memory traffic of those ops in eager mode, with ~0.01-4% of the pixels of a
            warped image one uint8 level off. Under torch.compile the difference in cost is small.
    """

    def __init__(self, cfg: AugConfig, img_size: int, in_chans: int = 3, *, precise: bool = True):
        if in_chans not in (1, 3):
            raise ValueError(f'in_chans must be 1 or 3, got {in_chans}')
        if cfg.crop not in ('rrc', 'pad_crop', 'none'):
            raise ValueError(f"aug.crop must be 'rrc', 'pad_crop' or 'none', got '{cfg.crop}'")
        if cfg.interpolation not in _FILTER_SUPPORT:
            raise ValueError(f"aug.interpolation must be 'bicubic' or 'bilinear', got '{cfg.interpolation}'")
        scale, ratio = tuple(float(v) for v in cfg.scale), tuple(float(v) for v in cfg.ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f'aug.scale must be (min, max) with 0 < min <= max, got {cfg.scale}')
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f'aug.ratio must be (min, max) with 0 < min <= max, got {cfg.ratio}')
        if not 0.0 <= cfg.hflip <= 1.0 or not 0.0 <= cfg.re_prob <= 1.0:
            raise ValueError(f'aug.hflip and aug.re_prob must be probabilities, got {cfg.hflip}, {cfg.re_prob}')
        if cfg.re_mode not in ('pixel', 'rand', 'const') or cfg.re_count < 1:
            raise ValueError(f"aug.re_mode must be 'pixel', 'rand' or 'const' and aug.re_count >= 1, got "
                             f"'{cfg.re_mode}', {cfg.re_count}")
        if cfg.crop == 'pad_crop' and cfg.padding < 0:
            raise ValueError(f'aug.padding must be >= 0, got {cfg.padding}')
        if cfg.auto_augment or cfg.rotate:
            raise ValueError('aug.auto_augment and aug.rotate run in the loader placement only (PIL)')
        if cfg.cutout < 0:
            raise ValueError(f'aug.cutout must be >= 0, got {cfg.cutout}')
        self.cfg = cfg
        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.scale, self.ratio = scale, ratio
        self.mean = resolve_channel_stats(cfg.mean, in_chans, 'aug.mean')
        self.std = resolve_channel_stats(cfg.std, in_chans, 'aug.std')
        self.rand_augment = None
        if cfg.rand_augment:
            self.rand_augment = BatchedRandAugment(cfg.rand_augment, self.img_size, self.mean, cfg.interpolation,
                                                   precise)
        self.color_jitter = float(cfg.color_jitter) if (not cfg.rand_augment and cfg.color_jitter) else None

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f'images must be a (B, C, H, W) uint8 tensor, got {tuple(images.shape)} '
                             f'{images.dtype}')
        if images.shape[1] != self.in_chans:
            raise ValueError(f'images have {images.shape[1]} channels but DeviceAugment was built for '
                             f'in_chans={self.in_chans} (channels-first (B, C, H, W) expected)')
        if self.cfg.crop == 'pad_crop' and tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"aug.crop='pad_crop' needs images of the output size {self.img_size}x{self.img_size}, "
                             f"got {tuple(images.shape[-2:])}; use crop='rrc' or 'none' to change the size.")

    def sample_params(self, batch_size: int, in_size: tuple[int, int], device: torch.device | str,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw every random number of one batch (crop boxes, flips, RandAugment layers, jitter, erasing).

        Args:
            batch_size: Number of images B.
            in_size: (H, W) of the input images.
            device: Device to draw on (the images' device).
            generator: Random generator on `device` (None: global RNG).

        Returns:
            Dict of tensors: 'crop' (B, 4) int64 (top, left, h, w) in input pixels ('pad_crop': offsets into the
            padded image), 'crop_fallback' (B,), 'flip' (B,) bool, 'ra_op'/'ra_applied'/'ra_magnitude'/'ra_arg'
            (layers, B), 'cj_order' (3, B) / 'cj_factor' (3, B), 're_boxes'/'re_active'/'re_fill'.
        """
        device = torch.device(device)
        _check_generator(generator, device)
        n, (h, w), cfg = batch_size, in_size, self.cfg
        p: dict[str, torch.Tensor] = {}
        if cfg.crop == 'rrc':
            p['crop'], p['crop_fallback'] = sample_rrc_boxes(n, h, w, self.scale, self.ratio, generator, device)
        elif cfg.crop == 'pad_crop':
            span = 2 * cfg.padding + 1
            off = torch.floor(_rand((n, 2), generator, device) * span).long()
            size = torch.full((n, 2), self.img_size, device=device, dtype=torch.long)
            p['crop'] = torch.cat([off, size], 1)
        else:
            p['crop'] = torch.tensor([0, 0, h, w], device=device).expand(n, 4)
        p['flip'] = _rand((n,), generator, device) < cfg.hflip
        if self.rand_augment is not None:
            for key, value in self.rand_augment.sample(n, generator, device).items():
                p['ra_' + key] = value
        elif self.color_jitter is not None:
            j = self.color_jitter
            p['cj_order'] = torch.argsort(_rand((n, 3), generator, device), dim=1).T.contiguous()
            lo, hi = max(0.0, 1.0 - j), 1.0 + j
            p['cj_factor'] = lo + (hi - lo) * _rand((3, n), generator, device)   # per op: brightness, contrast, sat.
        if cfg.re_prob > 0:
            er = sample_erasing(n, self.in_chans, self.img_size, self.img_size, cfg.re_prob, cfg.re_mode,
                                cfg.re_count, generator, device)
            for key, value in er.items():
                p['re_' + key] = value
        if cfg.cutout:
            centre = _rand((n, 2), generator, device) * self.img_size
            p['cutout'] = torch.floor(centre).long()      # (B, 2) centre row, column
        return p

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Deterministic part: augment `images` ((B, C, H, W) uint8) with `params` from ``sample_params``.

        Returns:
            (B, C, img_size, img_size) float32, normalised.
        """
        self._check_images(images)
        b, c, h, w = images.shape
        s, cfg = self.img_size, self.cfg
        x = images.to(torch.float32)
        top, left, ch, cw = params['crop'].unbind(1)
        if cfg.crop == 'pad_crop':
            wy = _pad_crop_weights(s, h, top, cfg.padding)
            wx = _pad_crop_weights(s, w, left, cfg.padding)
        else:
            wy = resize_weights(s, h, top, ch, cfg.interpolation)
            wx = resize_weights(s, w, left, cw, cfg.interpolation)
        wx = torch.where(params['flip'][:, None, None], wx.flip(1), wx)    # flipping the output = reversed rows
        x = resample(x, wy, wx)

        if self.rand_augment is not None:
            x = self.rand_augment.apply(x, {k[3:]: v for k, v in params.items() if k.startswith('ra_')})
        elif 'cj_order' in params:
            names = ['Brightness', 'Contrast', 'Color']
            fill = torch.zeros(c, device=x.device)
            for pos in range(3):
                op_id = params['cj_order'][pos]
                arg = params['cj_factor'].gather(0, op_id[None]).squeeze(0)
                x = apply_ops(x, names, op_id, arg, fill)

        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        x = (x / 255.0 - mean) / std                     # ToTensor + Normalize
        if 're_boxes' in params:
            x = apply_erasing(x, {k[3:]: v for k, v in params.items() if k.startswith('re_')})
        if 'cutout' in params:   # the loader path's Cutout: a square set to the normalised zero, -mean / std
            half = cfg.cutout // 2
            rows = torch.arange(s, device=x.device)[None, :, None]
            cols = torch.arange(s, device=x.device)[None, None, :]
            cy, cx = params['cutout'][:, 0, None, None], params['cutout'][:, 1, None, None]
            m = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
            x = torch.where(m[:, None], -mean / std, x)
        return x

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: (B, C, H, W) uint8 on any device (C = in_chans).
            generator: torch.Generator on the images' device (None = global RNG); a step is reproducible from its
                seed.

        Returns:
            (B, C, img_size, img_size) float32, normalised with the configured mean/std, augmented per sample.
        """
        self._check_images(images)
        params = self.sample_params(images.shape[0], tuple(images.shape[-2:]), images.device, generator)
        return self.apply(images, params)


class DeviceEvalTransform:
    """timm's eval transform on a batch: resize the short side to ``floor(img_size / crop_pct)`` (PIL-style,
    antialiased when downscaling), centre crop `img_size`, normalise. An identity resize is skipped.

    Args:
        img_size: Output size (square).
        crop_pct: Fraction of the resized image kept, in (0, 1].
        interpolation: 'bicubic' or 'bilinear'.
        mean: Normalisation mean (per channel, or 3 entries averaged for 1-channel input).
        std: Normalisation std.
    """

    def __init__(self, img_size: int, crop_pct: float, interpolation: str, mean, std):
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
        if interpolation not in _FILTER_SUPPORT:
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got '{interpolation}'")
        self.img_size = int(img_size)
        self.crop_pct = float(crop_pct)
        self.scale_size = math.floor(self.img_size / self.crop_pct)
        self.interpolation = interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache: dict = {}

    def _weights(self, h: int, w: int, device: torch.device):
        key = (h, w, str(device))
        if key not in self._cache:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.scale_size, int(self.scale_size * long / short)   # torchvision Resize(int)
            nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            top = int(round((nh - self.img_size) / 2.0))                                  # torchvision CenterCrop
            left = int(round((nw - self.img_size) / 2.0))
            zero = torch.zeros(1, dtype=torch.long, device=device)
            wy = resize_weights(nh, h, zero, zero + h, self.interpolation)[:, top:top + self.img_size]
            wx = resize_weights(nw, w, zero, zero + w, self.interpolation)[:, left:left + self.img_size]
            self._cache[key] = (nh, nw, top, left, wy, wx)
        return self._cache[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images: (B, C, H, W) uint8. Returns: (B, C, img_size, img_size) float32, normalised."""
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f'images must be a (B, C, H, W) uint8 tensor, got {tuple(images.shape)} '
                             f'{images.dtype}')
        b, c, h, w = images.shape
        nh, nw, top, left, wy, wx = self._weights(h, w, images.device)
        x = images.to(torch.float32)
        if (nh, nw) == (h, w):          # PIL copies on an identity resize; only the crop remains
            x = x[:, :, top:top + self.img_size, left:left + self.img_size]
        else:
            x = resample(x, wy.expand(b, -1, -1), wx.expand(b, -1, -1))
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f'image of {h}x{w} is too small for a {self.img_size} crop')
        mean = torch.tensor(resolve_channel_stats(self.mean, c, 'mean'), device=x.device).view(1, c, 1, 1)
        std = torch.tensor(resolve_channel_stats(self.std, c, 'std'), device=x.device).view(1, c, 1, 1)
        return (x / 255.0 - mean) / std
