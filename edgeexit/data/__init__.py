"""Datasets (real on-disk formats, as uint8) and batched augmentation.

The names below load lazily (PEP 562), so ``edgeexit.data.folder`` — what the decode worker
processes import — imports numpy and Pillow only, never torch. ``NAMED`` and
``canonical_dataset`` (the one rule for comparing dataset names) come from ``edgeexit.data.names``,
which imports nothing heavy."""

from __future__ import annotations

__all__ = [
    "NAMED",
    "ImageDataset",
    "augment",
    "canonical_dataset",
    "load_dataset",
    "normalize",
    "random_resized_crop",
    "split_calibration",
    "split_train_val",
]


_NAMES = ("NAMED", "canonical_dataset")


def __getattr__(name: str):
    if name in _NAMES:
        from edgeexit.data import names

        return getattr(names, name)
    if name in __all__:
        from edgeexit.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'edgeexit.data' has no attribute {name!r}")
