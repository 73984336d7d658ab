"""Writing NAME.edgeexit/manifest.json, and the stored frames it names (json + pathlib + numpy).

The parse and every check live in runtime/artifact.py (`Artifact.load`); this module is the I/O
around it: `write_calibration` / `write_manifest` (atomic, refusing to write into an artifact
another export replaced) and the stored frames' file, ``calibration/frames.npz``, written by
`save_calibration_frames` (export) and read by `load_calibration_frames` (calibrate, bench, engines)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from edgeexit.errors import ArtifactError
from edgeexit.runtime.artifact import MANIFEST_NAME, Artifact, Calibration, content_id, read_manifest_json

MAX_FRAMES_BYTES = 2 << 30  # the stored file (compressed)
MAX_FRAMES_EXPANDED = 4 << 30  # what its members may expand to, at most (less: count x shape)
CALIBRATION_FRAMES = "calibration/frames.npz"  # inside the artifact
# its arrays: uint8 (N, H, W, C) frames, their labels, and the calibration / verification indices
FRAME_MEMBERS = ("frames", "labels", "calibration", "verification")


def save_calibration_frames(folder: Path, frames, labels, calibration, verification, source: str) -> dict:
    """Write ``frames`` (uint8 N x H x W x C, the model's input size), their ``labels`` and the
    ``calibration`` / ``verification`` index halves as ``folder``/calibration/frames.npz; returns the
    manifest's ``calibration_frames`` entry (``source``: where the frames come from, in words)."""
    import hashlib

    import numpy as np

    path = folder / CALIBRATION_FRAMES
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(FRAME_MEMBERS, (frames, labels, calibration, verification), strict=True))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return {
        "path": CALIBRATION_FRAMES,
        "count": int(len(frames)),
        "calibration": int(len(calibration)),
        "verification": int(len(verification)),
        "source": source,
        "shape": list(frames.shape[1:]),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
    }


def _check_npz_members(path: Path, data: bytes, count: int | None, shape: tuple | None) -> None:
    """Sizes from the zip directory, before anything is decompressed: only the four arrays, which
    together expand to no more than the manifest's count x shape of uint8 frames plus their labels
    and indices (a 3.8 MB file that expands to 3.9 GB, a zip bomb, is refused unread)."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = z.infolist()
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path} is not a calibration-frames file ({e}): re-export the model") from None
    allowed = {f"{k}.npy" for k in FRAME_MEMBERS}
    limit = MAX_FRAMES_EXPANDED
    if isinstance(count, int) and shape is not None and all(isinstance(v, int) for v in shape):
        limit = min(limit, count * (math.prod(shape) + 3 * 8) + 4 * 4096)
    total = 0
    for m in members:
        if m.filename not in allowed:
            raise ArtifactError(f"{path} holds {m.filename!r}, not a calibration-frames member: re-export the model")
        total += m.file_size
        if total > limit:
            raise ArtifactError(
                f"{path} expands to more than {limit} bytes ({m.filename}: {m.file_size} bytes from "
                f"{m.compress_size}), more than its {count} frames can take (a decompression bomb?): refused; "
                "re-export the model"
            )


def load_calibration_frames(art: Artifact) -> dict | None:
    """The held-out images `edgeexit export` stored in the artifact (numpy only; checked against the
    manifest's sha256): frames (N, H, W, C) uint8, labels, and the calibration/verification indices.
    None when the artifact has none."""
    import hashlib
    import io

    import numpy as np

    from edgeexit.util import check_input_file

    info = art.calibration_frames
    if info is None:
        return None
    path = info.path
    try:
        check_input_file(path, "calibration frames", root=art.folder, max_bytes=MAX_FRAMES_BYTES)
    except ArtifactError:
        raise
    except Exception as e:  # UserError: a FIFO, a device, too large; say to re-export
        raise ArtifactError(f"{e}; re-export the model") from None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({e.strerror or e}): re-export the model") from None
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise ArtifactError(f"{path} does not match the sha256 in the manifest: re-export the model")
    _check_npz_members(path, data, info.count, info.shape)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            out = {k: z[k] for k in FRAME_MEMBERS}
    except (ValueError, KeyError, OSError, EOFError) as e:
        raise ArtifactError(f"{path} is not a calibration-frames file ({e}): re-export the model") from None
    except Exception as e:  # zipfile.BadZipFile, a truncated member (zlib.error) ...
        raise ArtifactError(
            f"{path} is not a calibration-frames file ({type(e).__name__}: {e}): re-export the model"
        ) from None
    _check_frames(art, path, out)
    return out


def _check_frames(art, path, out: dict) -> None:
    """Stored frames must be what the model takes, labels its classes, the two splits disjoint."""
    import numpy as np

    for key, value in out.items():  # a 0-d or non-.npy member (raw bytes, a pickle) is not an array of rows
        if not isinstance(value, np.ndarray) or value.ndim == 0:
            raise ArtifactError(f"{path}: member {key} is not an array of rows; re-export the model")
    n = len(out["frames"])
    if out["frames"].dtype != np.uint8 or len(out["labels"]) != n:
        raise ArtifactError(f"{path}: frames must be uint8 with one label each; re-export the model")
    frames, labels = out["frames"], out["labels"]
    pre = art.preprocessing
    want = (*pre.input_size, pre.in_chans)
    if frames.ndim != 4 or frames.shape[1:] != want:
        raise ArtifactError(
            f"{path}: frames are {list(frames.shape[1:])} (H, W, C) but the model takes {list(want)}: calibrating "
            "on resized frames would not be what runs; re-export the model"
        )
    classes = len(art.class_names)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (n and (labels.min() < 0 or labels.max() >= classes)):
        raise ArtifactError(
            f"{path}: labels must be integers 0..{classes - 1} (one per class name); re-export the model"
        )
    for key in ("calibration", "verification"):
        idx = out[key]
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
            raise ArtifactError(f"{path}: {key} indices out of range; re-export the model")
        if len(np.unique(idx)) != len(idx):
            raise ArtifactError(f"{path}: {key} indices repeat an image; re-export the model")
    if np.intersect1d(out["calibration"], out["verification"]).size:
        raise ArtifactError(
            f"{path}: verification indices include calibration images, so verification would not be on new "
            "images; re-export the model"
        )


def write_calibration(art: Artifact, calibration: Calibration | Mapping | None) -> None:
    """Write ``calibration`` (a `Calibration` or its block) as the manifest's calibration of ``art``
    (the `Artifact` it was calibrated from), refusing to when another export replaced the artifact
    meanwhile."""
    write_manifest(art, art.with_calibration(calibration).to_json())


def write_manifest(art: Artifact, manifest: dict) -> None:
    """Write ``manifest`` into the folder of ``art`` (the `Artifact` it was made from), atomically.
    When the folder holds another export now (an `export --force` replaced it while a calibrate ran:
    its ``content_id`` changed), nothing is written and an ArtifactError says so, rather than writing
    the old model's calibration into the new artifact."""
    from edgeexit.util import atomic_write_json

    folder = art.folder
    try:
        now = content_id(folder, read_manifest_json(folder))
    except ArtifactError:
        now = None
    if now != art.content_id:
        raise ArtifactError(
            f"{folder} was replaced by another export while this job ran (its units changed): nothing "
            "was written; run the job again on the new artifact"
        )
    atomic_write_json(folder / MANIFEST_NAME, manifest)
