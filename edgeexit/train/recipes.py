"""Training recipes: the paper's settings per dataset x method, and a fast CPU recipe.

A recipe is plain data; CLI flags override any field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from edgeexit.data.names import canonical_dataset
from edgeexit.train.losses import METHODS, LossConfig

# Per-method loss settings. MLCSD: the paper's T=4, α=5, β=10, γ=1. SD: KD from the final exit at
# T=4 with weight 1. BYOT: the BYOT release's T=3, α=0.3 (CE/KD mix), λ=0.03 (feature hint).
METHOD_LOSS = {
    "ce": LossConfig(temperature=4.0, alpha=0.0, beta=0.0, gamma=1.0),
    "sd": LossConfig(temperature=4.0, alpha=1.0, beta=0.0, gamma=1.0),
    "byot": LossConfig(temperature=3.0, alpha=0.3, beta=0.03, gamma=1.0),
    "mlcsd": LossConfig(temperature=4.0, alpha=5.0, beta=10.0, gamma=1.0),
    "l2w": LossConfig(temperature=4.0, alpha=0.0, beta=0.0, gamma=1.0),  # CE's, plus the meta weighting
}


@dataclass
class Recipe:
    epochs: int = 240
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    width: float = 1.0
    exits: int = 8
    val_size: int | None = None  # held-out images; None: 5,000, or a fifth of a smaller training set
    augment: bool = True
    pad: int = 4
    flip: bool = True
    crop: str = "pad"  # pad: the paper's padded random crop; resized: random-resized-crop (camera photos)
    stem: str = "cifar"  # cifar | imagenet (see models.MultiExitConfig)
    image_size: int | None = None  # ImageFolder training size (None: the stem's natural size)
    # dataset: the training set's mean/std; imagenet: ImageNet's (pretrained); or MEAN/STD (see parse_normalize)
    normalize: str = "dataset"
    backbone_lr_scale: float = 1.0  # the backbone's learning rate relative to the heads'
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict:
        return asdict(self)


PAPER = Recipe()
# Fashion-MNIST on two CPU cores: a quarter-width net, batch 32, a cosine schedule with a short
# warm-up, no crop augmentation, so one or two epochs already give a usable model. Measured on
# 10,000 images x 1 epoch (docs/lab-notebook.md §1): the paper's α=5 lets the KD term (T²·KL summed over 8
# exits) dominate before the exits agree on anything, and the final exit stays near 0.70-0.77;
# α=0.5, β=1 reaches 0.82. SD gets the same KD weight so the comparison is like for like.
FAST_CPU = Recipe(
    epochs=2, batch_size=32, lr=0.02, schedule="cosine", milestones=[], warmup_epochs=0.1, width=0.25, augment=False
)
FAST_CPU_LOSS = {
    "mlcsd": {"alpha": 0.5, "beta": 1.0},
    "sd": {"alpha": 0.5},
}


# Fine-tuning from ImageNet weights on a user's ImageFolder (camera photos, 224 px): torchvision's
# ResNet18 layout and normalisation, random-resized-crop + flip at the training size, a backbone
# learning rate a tenth of the fresh heads', a few epochs. The MLCSD loss keeps the CPU recipe's
# lighter distillation weights (the heads start from nothing while the backbone already knows a lot).
FINETUNE = Recipe(
    epochs=5,
    batch_size=32,
    lr=0.01,
    schedule="cosine",
    milestones=[],
    warmup_epochs=0.5,
    width=1.0,
    exits=8,
    augment=True,
    crop="resized",
    stem="imagenet",
    normalize="imagenet",
    backbone_lr_scale=0.1,
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_normalize(spec: str) -> tuple[list[float], list[float]] | None:
    """``--normalize``: None for the named choices (dataset, imagenet), else (mean, std) as given.
    A network the user trained with its own statistics only predicts as it did when fed the same ones,
    which --freeze-trunk's promise (the final exit unchanged) depends on."""
    if spec in ("dataset", "imagenet"):
        return None
    parts = spec.split("/")
    if len(parts) != 2:
        raise ValueError(f"must be dataset, imagenet or MEAN/STD, got '{spec}'")
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in parts)
    except ValueError:
        raise ValueError(f"MEAN/STD must be numbers separated by commas, got '{spec}'") from None
    if len(mean) != len(std):
        raise ValueError(f"gives {len(mean)} means and {len(std)} standard deviations: give as many of each")
    if not all(math.isfinite(v) and -1.0 <= v <= 2.0 for v in mean):
        raise ValueError(f"means are on the 0..1 pixel scale (e.g. 0.485), got {spec.split('/')[0]}")
    if not all(math.isfinite(v) and 1e-3 <= v <= 10.0 for v in std):
        raise ValueError(f"standard deviations must be within 0.001..10 (e.g. 0.229), got {spec.split('/')[1]}")
    return mean, std


def normalization_for(spec: str, in_chans: int, dataset_mean: list[float], dataset_std: list[float]):
    """The (mean, std) a run trains with, per channel."""
    if spec == "dataset":
        return list(dataset_mean), list(dataset_std)
    if spec == "imagenet":  # pretrained weights expect ImageNet's statistics
        return list(IMAGENET_MEAN[:in_chans]), list(IMAGENET_STD[:in_chans])
    mean, std = parse_normalize(spec) or ([], [])
    if len(mean) == 1:
        return mean * in_chans, std * in_chans
    if len(mean) != in_chans:
        counts = "1" if in_chans == 1 else f"1 or {in_chans}"
        raise ValueError(f"gives {len(mean)} values per statistic for {in_chans}-channel images: give {counts}")
    return mean, std


def get_recipe(dataset: str, method: str, finetune: bool = False) -> Recipe:
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if finetune:
        return replace(FINETUNE, loss=replace(METHOD_LOSS[method], **FAST_CPU_LOSS.get(method, {})))
    if canonical_dataset(dataset) == "fashion-mnist":
        return replace(FAST_CPU, loss=replace(METHOD_LOSS[method], **FAST_CPU_LOSS.get(method, {})))
    return replace(PAPER, loss=replace(METHOD_LOSS[method]))
