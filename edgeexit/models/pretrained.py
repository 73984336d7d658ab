"""Starting a multi-exit ResNet18 from torchvision ResNet18 weights (``edgeexit train --init PATH``).

With ``stem="imagenet"`` and ``width=1`` the backbone's parameter shapes are torchvision's, so its
state_dict maps key by key: conv1/bn1 → the stem, layerL.B.* → stage L's block B (downsample.* →
shortcut.*), and fc → the final exit's classifier (whose head is pooling + linear, as torchvision's).
The other exit heads start fresh. Nothing is downloaded: the file must already be on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from edgeexit.errors import UserError

TORCHVISION_HINT = (
    "torchvision keeps downloaded weights in ~/.cache/torch/hub/checkpoints/ (ImageNet ResNet18: "
    "resnet18-f37072fd.pth); edgeexit never downloads: copy the file here and pass its path"
)


def torchvision_module_map(model) -> dict[str, nn.Module]:
    """torchvision ResNet18 module name → the multi-exit net's module holding the same parameters."""
    stem = model.segments[0].stem
    mapping: dict[str, nn.Module] = {"conv1": stem[0], "bn1": stem[1], "fc": model.heads[-1].fc}
    for s, blocks in enumerate(model.stages, 1):
        for b, block in enumerate(blocks):
            prefix = f"layer{s}.{b}"
            for part in ("conv1", "bn1", "conv2", "bn2"):
                mapping[f"{prefix}.{part}"] = getattr(block, part)
            if len(block.shortcut):
                mapping[f"{prefix}.downsample.0"] = block.shortcut[0]
                mapping[f"{prefix}.downsample.1"] = block.shortcut[1]
    return mapping


def load_torchvision_resnet18(model, state_dict: dict, include_fc: bool = False) -> list[str]:
    """Copy torchvision ResNet18 weights into ``model`` (imagenet stem, width 1, 3 channels). The
    final classifier is copied only with ``include_fc`` (same number of classes). Returns the keys
    copied; a key that is missing or has another shape is a UserError naming it."""
    cfg = model.config
    if cfg.stem != "imagenet" or cfg.width != 1.0 or cfg.in_chans != 3:
        raise UserError(
            "--init with torchvision ResNet18 weights needs --stem imagenet, --width 1 and 3-channel images "
            f"(this model: stem {cfg.stem}, width {cfg.width}, {cfg.in_chans} channel(s))"
        )
    copied = []
    with torch.no_grad():
        for name, module in torchvision_module_map(model).items():
            if name == "fc" and not include_fc:
                continue
            for key, target in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                src = state_dict.get(f"{name}.{key}")
                if src is None:
                    raise UserError(f"the --init weights have no '{name}.{key}': not a torchvision ResNet18 state_dict")
                if tuple(src.shape) != tuple(target.shape):
                    raise UserError(
                        f"'{name}.{key}' has shape {tuple(src.shape)} in the --init weights but "
                        f"{tuple(target.shape)} here"
                    )
                target.copy_(src)
                copied.append(f"{name}.{key}")
    return copied


def load_init_file(path: str | os.PathLike) -> dict:
    """A torchvision state_dict from disk (``weights_only=True``), or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--init {path}: no such file. {TORCHVISION_HINT}")
    from edgeexit.util import load_untrusted

    sd = load_untrusted(path, "state_dict (--init)")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--init {path} is not a state_dict of tensors")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(
            f"--init {path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]}); the file is "
            "damaged, not the learning rate: use an intact copy of the weights"
        )
    return sd
