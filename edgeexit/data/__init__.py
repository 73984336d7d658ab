"""Datasets (real on-disk formats, as uint8) and batched augmentation.

The names below load lazily (PEP 562), so ``edgeexit.data.folder`` — what the decode worker
processes import — imports numpy and Pillow only, never torch."""

from __future__ import annotations

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


def __getattr__(name: str):
    if name in __all__:
        from edgeexit.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'edgeexit.data' has no attribute {name!r}")
