"""Helpers shared by the device augmentation modules: channel statistics, PIL rounding, random draws."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ['resolve_channel_stats']


def resolve_channel_stats(values: Sequence[float], chans: int, what: str = 'mean') -> tuple[float, ...]:
    """Per-channel statistics for a `chans`-channel image.

    A statistic with one entry per channel is used as is, a single entry is repeated. For 1-channel images and
    3-entry (RGB) statistics the entries are averaged (ImageNet's defaults give mean 0.449, std 0.226): a grey
    value then lands in the same range as the RGB normalisation puts it, whichever channel it stands for.

    Args:
        values: The configured statistic (e.g. ``AugConfig.mean``).
        chans: Number of image channels (1 or 3).
        what: Name used in error messages.

    Returns:
        A tuple with `chans` floats.
    """
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    if len(values) == 1:
        return values * chans
    if chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f'{what} has {len(values)} entries but the images have {chans} channels; give one entry per '
                     f'channel (or a single entry).')


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def _to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``(UINT8)`` cast of a clipped float: truncation (values are >= 0 after the clip)."""
    return torch.floor(x.clamp(0.0, 255.0))


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    gdev = generator.device
    if gdev.type != device.type or (gdev.index is not None and device.index is not None and gdev.index != device.index):
        raise ValueError(f'the generator lives on {gdev} but the images on {device}; create it with '
                         f'torch.Generator(device=images.device).manual_seed(seed).')


def _rand(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
