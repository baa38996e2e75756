"""Long-tailed datasets, samplers, augmentation and the batch pipelines that feed training."""
from .lt_datasets import (
    DATASET_NAMES, ClassSplits, DatasetError, LTDataset, canonical_lt_indices, class_splits_from_bounds,
    class_splits_from_counts, create_datasets, lt_class_counts,
)
from .lists import parse_list_file, read_list_file
