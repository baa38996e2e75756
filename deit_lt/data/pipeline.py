"""Training and evaluation batch pipelines for both augmentation placements.

'device' (the fast path for in-memory datasets such as CIFAR and digits): the decoded uint8 dataset lives on the
device once; a step gathers its index slice and augments the batch there (`gpu_aug.DeviceAugment`), airbench-style.
'loader' (large datasets, or on request): per-image PIL augmentation (`transforms.build_train_transform`, timm's
recipe) in DataLoader workers with pinned memory and non-blocking copies.

Both are deterministic functions of (seed, epoch, step, rank): the device path seeds a generator per step, the
loader path seeds each sample from its position in the epoch (so results do not depend on the number of workers).
Any step of any epoch can therefore be regenerated, which is what exact resume needs (`iter_epoch(start_step=)`).

Images that cannot be decoded (`data.bad_images=skip`) are replaced inside the workers by a fixed same-class image
(`LTDataset.read`); each item reports the replacement back, and the main process records it (`SkippedImages`).
"""
from __future__ import annotations

import abc
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

from einops import rearrange
import numpy as np
import torch
import torch.utils.data

from ..config import AugConfig
from ..errors import ConfigError, DatasetError
from ..seeding import step_seed
from .lt_datasets import LTDataset
from .samplers import LTSampler
from .transforms import build_eval_transform, build_train_transform, default_crop_pct, resolve_norm

__all__ = ['Batch', 'resolve_placement', 'TrainBatches', 'DeviceTrainBatches', 'LoaderTrainBatches',
           'create_train_batches', 'EvalBatches', 'create_eval_batches']


@dataclass
class Batch:
    """One micro-batch: augmented normalised images, labels, optionally the clean (un-augmented) images, and the
    extra augmented views of the same images (two-view methods: MDCS weak/strong, P2OT's swapped prediction)."""
    x: torch.Tensor
    y: torch.Tensor
    x_clean: torch.Tensor | None = None
    views: tuple[torch.Tensor, ...] = ()


def default_workers(setting: int | None) -> int:
    """DataLoader workers: the configured number, or the cores this process may use (up to 8)."""
    if setting is not None:
        return max(0, int(setting))
    local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(local, 1) - 1))


def resolve_placement(dataset: LTDataset, cfg: AugConfig, max_mb: int = 4096) -> str:
    """'device' for in-memory datasets that fit the budget, 'loader' otherwise (or as configured)."""
    if cfg.placement == 'loader':
        return 'loader'
    fits = dataset.in_memory and dataset.images.nbytes <= max_mb * 2 ** 20
    if cfg.placement == 'device':
        if not dataset.in_memory:
            raise ConfigError(f'aug.placement=device needs an in-memory dataset; {dataset.name} is read from files '
                              f'(use aug.placement=loader, or data.preload for small folders)')
        return 'device'
    return 'device' if fits else 'loader'


class TrainBatches(abc.ABC):
    """Iterates the micro-batches of one epoch for this rank.

    `drop_last` (the default) keeps only full batches: Mixup/CutMix pair images inside a batch and need an even
    size, and a compiled step keeps one shape. Recipes without mixing (the CNN teachers) keep the last partial
    batch, as their original data loaders do.
    """

    def __init__(self, sampler: LTSampler, batch_size: int, seed: int, rank: int, drop_last: bool = True):
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.drop_last = drop_last
        self.dataset: LTDataset | None = None    # set by loader-fed subclasses: where skipped images are recorded
        if len(sampler) < batch_size:
            raise ConfigError(f'the batch ({batch_size} per device) is larger than the samples one device sees per '
                              f'epoch ({len(sampler)}); lower optim.batch_size')

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _positions(self, step: int) -> range:
        """Positions in the epoch's index list of micro-batch `step`."""
        return range(step * self.batch_size, min((step + 1) * self.batch_size, len(self.sampler)))

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        self.sampler.set_epoch(epoch)
        return np.fromiter(iter(self.sampler), dtype=np.int64)

    @abc.abstractmethod
    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield the micro-batches of `epoch` from `start_step` on."""

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's dataset indices of `epoch`, in micro-batch order (`step_positions` cuts them)."""
        return self._epoch_indices(epoch)

    def step_positions(self, step: int) -> range:
        """Positions in `epoch_indices` of micro-batch `step`."""
        return self._positions(step)

    def attach_run_dir(self, run_dir) -> None:
        """Name the run folder that receives `skipped_images.json` (data.bad_images=skip; one file per rank, the
        validation and test splits included). Call once per process before the first epoch."""
        if self.dataset is not None:
            self.dataset.skipped.attach(run_dir, self.rank)


class DeviceTrainBatches(TrainBatches):
    """The dataset as one uint8 tensor on `device`; each step gathers and augments its slice there."""

    def __init__(self, dataset: LTDataset, cfg: AugConfig, *, img_size: int, batch_size: int,
                 device: torch.device, sampler: LTSampler, seed: int, rank: int = 0, return_clean: bool = False,
                 compile: bool = False, drop_last: bool = True, extra_views: Sequence[AugConfig] = ()):
        super().__init__(sampler, batch_size, seed, rank, drop_last)
        from .gpu_aug import DeviceAugment, DeviceEvalTransform
        self.device = torch.device(device)
        # float64 interpolation reproduces PIL bit for bit (CPU, tests); on GPUs float32 is the fast choice (a few
        # pixels of a warped image may land one uint8 level lower)
        precise = self.device.type == 'cpu'
        self.augment = DeviceAugment(cfg, img_size, in_chans=dataset.in_chans, precise=precise)
        self.view_augments = [DeviceAugment(v, img_size, in_chans=dataset.in_chans, precise=precise)
                              for v in extra_views]
        # np.array copies: cached datasets are read-only memory maps, which torch.from_numpy warns about
        images = rearrange(torch.from_numpy(np.array(dataset.images)), 'n h w c -> n c h w')
        self.images = images.contiguous().to(self.device)
        self.targets = torch.from_numpy(dataset.targets).to(self.device)
        # only the deterministic part is compiled; parameters are drawn eagerly from the step's generator
        self._apply = torch.compile(self.augment.apply) if compile else self.augment.apply
        mean, std = resolve_norm(cfg.mean, cfg.std, dataset.in_chans)
        self.clean = DeviceEvalTransform(img_size, 1.0, cfg.interpolation, mean, std) if return_clean else None

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = torch.from_numpy(self._epoch_indices(epoch)).to(self.device)
        gen = torch.Generator(device=self.device)
        for step in range(start_step, len(self)):
            pos = self._positions(step)
            idx = order[pos.start:pos.stop]
            images = self.images[idx]
            gen.manual_seed(step_seed(self.seed, epoch, step, self.rank))
            params = self.augment.sample_params(len(idx), tuple(images.shape[-2:]), self.device, gen)
            x = self._apply(images, params)
            views = []
            for v, augment in enumerate(self.view_augments, start=1):   # each view its own random stream
                gen.manual_seed(step_seed(self.seed, epoch, step, self.rank, v))
                views.append(augment(images, gen))
            yield Batch(x, self.targets[idx], self.clean(images) if self.clean is not None else None, tuple(views))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


class _SeededSamples(torch.utils.data.Dataset):
    """Dataset view whose items are (index, seed): each sample's augmentation is seeded by its position in the
    epoch, not by worker state, so the loader path is reproducible and resumable. Items are
    (x, y, clean image or an empty tensor, extra views...)."""

    def __init__(self, dataset: LTDataset, transform, clean_transform=None, view_transforms: Sequence = ()):
        self.dataset = dataset
        self.transform = transform
        self.clean_transform = clean_transform
        self.view_transforms = list(view_transforms)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, seed = item
        _seed_all(seed)   # decoding draws no random numbers, so a replaced image keeps the sample's random stream
        img, used = self.dataset.read(i)
        y = int(self.dataset.targets[i])
        x = self.transform(img)
        clean = self.clean_transform(img) if self.clean_transform is not None else torch.empty(0)
        views = []
        for v, transform in enumerate(self.view_transforms, start=1):
            _seed_all(step_seed(seed, v))
            views.append(transform(img))
        return (x, y, clean, _skip_note(self.dataset, i, used), *views)


def _skip_note(dataset: LTDataset, i: int, used: int) -> dict:
    """What an item tells the main process about a replaced image (index -1: none); collated into a batch."""
    if used == i:
        return {'index': -1, 'used': -1, 'reason': ''}
    return {'index': i, 'used': used, 'reason': dataset.known_bad.get(dataset.paths[i], '')}


def _record_skips(dataset: LTDataset, note: dict) -> None:
    """Record the replaced images of a collated batch (main process; the tensors are on the CPU, no device sync)."""
    for k in torch.nonzero(note['index'] >= 0).flatten().tolist():
        dataset.note_skip(int(note['index'][k]), int(note['used'][k]), note['reason'][k])


def _worker_message(e: DatasetError) -> str:
    """The one-line message of a DatasetError raised in a DataLoader worker: torch re-raises it in the main process
    with the worker's whole traceback as the text; its last line holds the original message."""
    text = str(e)
    if 'Traceback' not in text:
        return text
    marker = f'{DatasetError.__name__}: '
    found = [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]
    return found[-1] if found else text.strip().splitlines()[-1]


def _loader_items(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate `loader`, turning a data error from a worker back into a one-line DatasetError."""
    it = iter(loader)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except DatasetError as e:
            raise DatasetError(_worker_message(e)) from None
        yield item


class _EpochBatchSampler:
    """Batches of (index, seed) for the epoch and start step set before each iteration."""

    def __init__(self, owner: 'LoaderTrainBatches'):
        self.owner = owner
        self.epoch = 0
        self.start_step = 0

    def __len__(self):
        return len(self.owner) - self.start_step

    def __iter__(self):
        o = self.owner
        idx = o._epoch_indices(self.epoch)
        for step in range(self.start_step, len(o)):
            pos = o._positions(step)
            yield [(int(idx[p]), step_seed(o.seed, self.epoch, o.rank, p)) for p in pos]


class LoaderTrainBatches(TrainBatches):
    """Per-image PIL augmentation in DataLoader workers (timm's reference recipe)."""

    def __init__(self, dataset: LTDataset, cfg: AugConfig, *, img_size: int, batch_size: int,
                 device: torch.device, sampler: LTSampler, seed: int, rank: int = 0, return_clean: bool = False,
                 drop_last: bool = True, extra_views: Sequence[AugConfig] = ()):
        super().__init__(sampler, batch_size, seed, rank, drop_last)
        self.device = torch.device(device)
        self.dataset = dataset
        mean, std = resolve_norm(cfg.mean, cfg.std, dataset.in_chans)
        clean = build_eval_transform(img_size, 1.0, cfg.interpolation, mean, std, dataset.in_chans) \
            if return_clean else None
        views = [build_train_transform(v, img_size, dataset.in_chans) for v in extra_views]
        samples = _SeededSamples(dataset, build_train_transform(cfg, img_size, dataset.in_chans), clean, views)
        self.batch_sampler = _EpochBatchSampler(self)
        workers = default_workers(cfg.num_workers)
        self.loader = torch.utils.data.DataLoader(
            samples, batch_sampler=self.batch_sampler, num_workers=workers,
            pin_memory=self.device.type == 'cuda', persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        self.batch_sampler.epoch, self.batch_sampler.start_step = epoch, start_step
        for item in _loader_items(self.loader):
            _record_skips(self.dataset, item[3])
            x, y, clean = (t.to(self.device, non_blocking=True) for t in item[:3])
            views = tuple(t.to(self.device, non_blocking=True) for t in item[4:])
            yield Batch(x, y, clean if clean.numel() else None, views)


def create_train_batches(dataset: LTDataset, cfg: AugConfig, *, img_size: int, batch_size: int,
                         device: torch.device | str, sampler: LTSampler, seed: int, rank: int = 0,
                         return_clean: bool = False, placement: str | None = None,
                         max_device_mb: int = 4096, compile: bool = False, drop_last: bool = True,
                         extra_views: Sequence[AugConfig] = ()) -> TrainBatches:
    """The training batches for `dataset` with augmentation `cfg` on the configured / automatic placement.

    `extra_views` are the augmentations of further views of the same images (`Batch.views`), each drawn from its
    own random stream. With placement 'auto' (None here and cfg.placement 'auto'), a recipe the device path does
    not implement (AutoAugment, rotation) falls back to the loader with a warning.
    """
    if len(sampler) < batch_size:
        raise ConfigError(f'the batch ({batch_size} per device) is larger than the samples one device sees per '
                          f'epoch ({len(sampler)}); lower optim.batch_size')
    common = dict(img_size=img_size, batch_size=batch_size, device=torch.device(device), sampler=sampler, seed=seed,
                  rank=rank, return_clean=return_clean, drop_last=drop_last, extra_views=tuple(extra_views))
    chosen = placement or resolve_placement(dataset, cfg, max_device_mb)
    if chosen == 'loader':
        return LoaderTrainBatches(dataset, cfg, **common)
    try:
        return DeviceTrainBatches(dataset, cfg, compile=compile, **common)
    except ValueError as e:
        if placement is not None or cfg.placement != 'auto':
            raise
        warnings.warn(f'augmentation on the device is not possible ({e}); using per-image loader augmentation')
        return LoaderTrainBatches(dataset, cfg, **common)


class EvalBatches:
    """Evaluation batches of this rank's contiguous shard (eval transform, dataset order).

    Shards have ceil(N / world) samples (the last rank's is padded with repeats of its own last sample), so
    gathering all ranks' outputs and keeping the first N restores dataset order.
    """

    def __init__(self, dataset: LTDataset, cfg: AugConfig, *, img_size: int, batch_size: int,
                 device: torch.device | str, crop_pct: float | None = None, num_replicas: int = 1, rank: int = 0,
                 placement: str | None = None, max_device_mb: int = 4096):
        self.dataset = dataset
        self.device = torch.device(device)
        self.batch_size = batch_size
        n = len(dataset)
        per = math.ceil(n / num_replicas)
        shard = np.arange(rank * per, (rank + 1) * per)
        self.indices = np.minimum(shard, n - 1) if n else shard
        self.num_total = n
        native = dataset.image_size[0] if dataset.image_size else None
        crop_pct = crop_pct if crop_pct is not None else default_crop_pct(cfg, img_size, native)
        mean, std = resolve_norm(cfg.mean, cfg.std, dataset.in_chans)
        self.placement = placement or resolve_placement(dataset, cfg, max_device_mb)
        if self.placement == 'device':
            from .gpu_aug import DeviceEvalTransform
            self.transform = DeviceEvalTransform(img_size, crop_pct, cfg.interpolation, mean, std)
            self.images = rearrange(torch.from_numpy(np.array(dataset.images)), 'n h w c -> n c h w').contiguous()
            self.targets = torch.from_numpy(dataset.targets)
        else:
            tf = build_eval_transform(img_size, crop_pct, cfg.interpolation, mean, std, dataset.in_chans)
            subset = torch.utils.data.Subset(_Transformed(dataset, tf), self.indices.tolist())
            self.loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                                      num_workers=default_workers(cfg.num_workers),
                                                      pin_memory=self.device.type == 'cuda')

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.placement == 'device':
            for s in range(0, len(self.indices), self.batch_size):
                idx = torch.from_numpy(self.indices[s:s + self.batch_size])
                images = self.images[idx].to(self.device, non_blocking=True)
                yield self.transform(images), self.targets[idx].to(self.device, non_blocking=True)
        else:
            for x, y, note in _loader_items(self.loader):
                _record_skips(self.dataset, note)
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _Transformed(torch.utils.data.Dataset):
    """(eval-transformed image, label, skip note) of each sample."""

    def __init__(self, dataset: LTDataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, used = self.dataset.read(i)
        return self.transform(img), int(self.dataset.targets[i]), _skip_note(self.dataset, i, used)


def create_eval_batches(dataset: LTDataset, cfg: AugConfig, *, img_size: int, batch_size: int,
                        device: torch.device | str, crop_pct: float | None = None, num_replicas: int = 1,
                        rank: int = 0, placement: str | None = None) -> EvalBatches:
    """Evaluation batches (eval transform: resize / centre crop / normalise), in dataset order."""
    return EvalBatches(dataset, cfg, img_size=img_size, batch_size=batch_size, device=device, crop_pct=crop_pct,
                       num_replicas=num_replicas, rank=rank, placement=placement)
