"""The named datasets and the one rule for comparing dataset names (no torch, no numpy).

Every place that asks "is this a named dataset, and which one?" asks `canonical_dataset`: the
loader, the recipe choice, the trainer's ImageFolder sizing and `eval`'s held-out lookup. A name
that is not a named dataset (a path to an ImageFolder) is returned unchanged.
"""

from __future__ import annotations

import os

NAMED = ("fashion-mnist", "cifar10", "cifar100", "tiny-imagenet")

# Other spellings accepted for each named dataset (compared lower-cased).
_ALIASES = {
    "fashion-mnist": ("fashion_mnist", "fashionmnist"),
    "cifar10": ("cifar-10",),
    "cifar100": ("cifar-100",),
    "tiny-imagenet": ("tinyimagenet", "tiny-imagenet-200"),
}
_CANONICAL = {alias: name for name in NAMED for alias in (name, *_ALIASES[name])}


def canonical_dataset(name: str | os.PathLike) -> str:
    """'CIFAR10', 'cifar-10' → 'cifar10' (one of `NAMED`); any other name (a path to an
    ImageFolder) is returned as given, so ``canonical_dataset(x) in NAMED`` asks "is it named"."""
    text = os.fspath(name)
    return _CANONICAL.get(text.lower(), text)


def is_named(name: str | os.PathLike) -> bool:
    return canonical_dataset(name) in NAMED
