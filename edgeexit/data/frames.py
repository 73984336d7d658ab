"""Labelled uint8 frames for an artifact from its dataset (calibrate, bench and benchmarks use them
when the frames stored in the artifact are not what is asked for)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from edgeexit.errors import UserError

if TYPE_CHECKING:
    from edgeexit.runtime.artifact import Artifact


def load_frames(art: Artifact, data: str | None, split: str, data_dir: str | None):
    """(uint8 HWC frames, labels) of the chosen split of ``art``'s dataset (``heldout``: the one the
    checkpoint held out; else the test split), and the dataset's name."""
    from edgeexit.data import load_dataset
    from edgeexit.data.datasets import load_heldout

    name = data or art.dataset
    if not name:
        raise UserError("the artifact records no dataset: pass --data")
    pre = art.preprocessing
    size = list(pre.input_size)
    recorded = art.split if isinstance(art.split, Mapping) else None
    if split == "heldout":
        if recorded is None:
            raise UserError("the artifact records no held-out split: calibrate with --split test (and --data)")
        ds = load_heldout(dict(recorded), data_dir, name)
    else:
        ds = load_dataset(name, "test", data_dir or (recorded or {}).get("data_dir"), image_size=size)
    if ds.in_chans != pre.in_chans or ds.input_size != size:
        raise UserError(f"{name} images are {ds.in_chans}x{ds.input_size} but the model expects {pre.in_chans}x{size}")
    frames = ds.images.permute(0, 2, 3, 1).contiguous().numpy()
    return frames, ds.labels.numpy(), name
