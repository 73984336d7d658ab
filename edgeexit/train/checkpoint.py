"""The `model.pt` checkpoint contract (docs/contract.md §4): plain dicts and tensors only.

Checkpoints load with ``torch.load(path, weights_only=True)`` and are written atomically
(temporary file in the same directory, then ``os.replace``), so a crash never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edgeexit import __version__
from edgeexit.errors import UserError
from edgeexit.models import MultiExitConfig, MultiExitNet, build_model
from edgeexit.util import atomic_write, load_untrusted, shorten

FORMAT = "edgeexit-checkpoint"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def make_checkpoint(
    model: MultiExitNet,
    *,
    preprocessing: dict,
    class_names: list[str],
    metrics: dict,
    split: dict,
    dataset: str,
    extra: dict | None = None,
) -> dict:
    from edgeexit.models import count_unit_cost

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "edgeexit_version": __version__,
        "config": model.config.to_dict(),
        "state_dict": state,
        "preprocessing": preprocessing,
        "class_names": list(class_names),
        "metrics": metrics,
        "split": split,
        "dataset": dataset,
        "units": count_unit_cost(model),
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate an edgeexit checkpoint; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    ckpt = load_untrusted(path, "edgeexit checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an edgeexit checkpoint (no format='{FORMAT}' key)")
    if not isinstance(ckpt.get("version"), int):
        raise UserError(f"{path} has no valid checkpoint version: it is not an edgeexit checkpoint")
    if ckpt["version"] > VERSION:
        raise UserError(
            f"{path} has checkpoint version {ckpt.get('version')}; this edgeexit reads up to "
            f"{VERSION}: upgrade edgeexit"
        )
    for key in ("config", "state_dict", "preprocessing", "class_names"):
        if key not in ckpt:
            raise UserError(f"{path} is missing '{key}'")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> MultiExitNet:
    try:
        model = build_model(MultiExitConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint weights do not match its config ({shorten(str(e).splitlines()[0])})") from None
    return model.eval()
