"""Building blocks shared by the training recipes (the DeiT-LT student here, the teachers in `teachers/`): the
data of a run, its micro-batch size, and the metadata every model file carries."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .config import AugConfig, DataConfig, OptimConfig, to_dict
from .data import LTDataset, create_datasets
from .data.pipeline import EvalBatches, TrainBatches, create_eval_batches, create_train_batches, resolve_placement
from .data.samplers import create_sampler
from .data.transforms import resolve_norm
from .errors import ConfigError, DatasetError

__all__ = ['RunData', 'micro_batch_size', 'load_datasets', 'create_run_data', 'model_meta']


def micro_batch_size(optim: OptimConfig, world: int) -> int:
    """Images per process and micro-batch: the global batch split over processes and accumulation steps."""
    if optim.batch_size < 1 or optim.accum_steps < 1:
        raise ConfigError('optim.batch_size and optim.accum_steps must be >= 1')
    parts = world * optim.accum_steps
    if optim.batch_size % parts:
        raise ConfigError(f'optim.batch_size={optim.batch_size} is the global batch of one update; it must divide '
                          f'evenly into {world} process(es) x optim.accum_steps={optim.accum_steps} micro-batches')
    return optim.batch_size // parts


@dataclasses.dataclass
class RunData:
    """The datasets of a run and this process's batches."""
    train: LTDataset
    test: LTDataset
    val: LTDataset | None
    train_batches: TrainBatches
    eval_batches: dict[str, EvalBatches]
    placement: str
    micro_batch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_chans(self) -> int:
        return self.train.in_chans


def load_datasets(data_cfg: DataConfig) -> dict[str, LTDataset]:
    """{'train', 'test'[, 'val']} of `data_cfg` (DatasetError when they cannot be read)."""
    return create_datasets(data_cfg)


def create_run_data(sets: dict[str, LTDataset], data_cfg: DataConfig, aug: AugConfig, optim: OptimConfig, *,
                    accelerator, seed: int, img_size: int | None, eval_batch_size: int, drop_last: bool = True,
                    return_clean: bool = False, compile: bool = False, extra_views: Sequence[AugConfig] = ()
                    ) -> RunData:
    """Sampler and batches of a training run over `sets` (from `load_datasets`).

    `extra_views`: augmentations of further views of each image (`Batch.views`). The sampler is `aug.sampler`
    (with DeiT's repeated augmentation when `aug.repeated_aug` > 1 and the sampler is 'instance'); the placement of
    augmentation is `aug.placement`. `img_size` None means the images' own size (in-memory datasets) or 224.

    Raises:
        ConfigError: batch sizes that do not divide, or a batch larger than one process's epoch.
        DatasetError: data that cannot be read.
    """
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    micro = micro_batch_size(optim, world)
    train, test, val = sets['train'], sets['test'], sets.get('val')
    if img_size is None:
        img_size = train.image_size[0] if train.image_size else 224
    mean, std = resolve_norm(aug.mean, aug.std, train.in_chans)
    name = aug.sampler
    if name == 'instance' and aug.repeated_aug > 1:
        name = 'repeated_aug'
    sampler = create_sampler(name, train.targets, num_replicas=world, rank=rank, seed=seed,
                             num_repeats=aug.repeated_aug, samples_per_class=aug.samples_per_class,
                             total_epochs=optim.epochs)
    try:
        placement = resolve_placement(train, aug, data_cfg.in_memory_max_mb)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        batches = create_train_batches(train, aug, img_size=img_size, batch_size=micro, device=device,
                                       sampler=sampler, seed=seed, rank=rank, return_clean=return_clean,
                                       placement=None if aug.placement == 'auto' else placement,
                                       max_device_mb=data_cfg.in_memory_max_mb, compile=compile, drop_last=drop_last,
                                       extra_views=extra_views)
    except ValueError as e:
        if 'larger than the samples' in str(e):
            raise ConfigError(f'{e} (optim.batch_size={optim.batch_size} over {world} process(es) x '
                              f'{optim.accum_steps} accumulation steps)') from None
        raise DatasetError(str(e)) from None
    evals = {'test': test} | ({'val': val} if val is not None else {})
    eval_batches = {k: create_eval_batches(ds, aug, img_size=img_size, batch_size=eval_batch_size, device=device,
                                           num_replicas=world, rank=rank, placement=placement)
                    for k, ds in evals.items()}
    return RunData(train, test, val, batches, eval_batches, placement, micro, tuple(mean), tuple(std))


def model_meta(data: RunData, data_cfg: DataConfig, *, arch: str, model_kwargs: dict[str, Any], img_size: int,
               config: Any, **extra: Any) -> dict[str, Any]:
    """The metadata of a model file: everything needed to rebuild the model and to use it on the right data."""
    train = data.train
    return {
        'arch': arch, 'num_classes': train.num_classes, 'model_kwargs': model_kwargs, 'img_size': img_size,
        'in_chans': train.in_chans, 'mean': list(data.mean), 'std': list(data.std),
        'train_counts': train.train_counts.tolist(), 'class_names': train.class_names,
        'class_map': train.class_map.tolist() if train.class_map is not None else None,
        'label_space': 'sorted' if train.class_map is not None else 'dataset',
        'dataset': {'name': data_cfg.name, 'imb_factor': data_cfg.imb_factor}, 'splits': train.splits.as_dict(),
        'config': to_dict(config), **extra,
    }
