"""Datasets (real on-disk formats, loaded into memory as uint8) and batched augmentation."""

from edgeexit.data.datasets import (
    NAMED,
    ImageDataset,
    augment,
    load_dataset,
    normalize,
    random_resized_crop,
    split_calibration,
    split_train_val,
)

__all__ = [
    "NAMED",
    "ImageDataset",
    "augment",
    "load_dataset",
    "normalize",
    "random_resized_crop",
    "split_calibration",
    "split_train_val",
]
