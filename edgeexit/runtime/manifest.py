"""Reading and validating NAME.edgeexit/manifest.json (json + pathlib only)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from edgeexit.errors import ArtifactError
from edgeexit.runtime.plan import unit_names

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED = ("schema_version", "preprocessing", "class_names", "units", "model")


def load_manifest(artifact: str | os.PathLike) -> dict:
    """Load and check a manifest; every problem is an ArtifactError saying what to rebuild.

    The one parse is `edgeexit.runtime.artifact.Artifact.load` (typed, every field and file it
    names checked); this returns its manifest as a mutable dict for the readers that use one, with
    ``_folder`` and ``_content_id`` (which `write_manifest` checks and drops)."""
    from edgeexit.runtime.artifact import Artifact

    return Artifact.load(artifact).manifest_dict()


def check_manifest_dict(folder: Path, manifest: dict) -> None:
    """The field checks on the parsed JSON (before the typed build in runtime/artifact.py).

    A manifest is data from whoever made the artifact: every file it names must resolve inside
    the artifact folder (symlinks resolved), and the preprocessing and class names must make sense
    for the model, so a tampered or careless manifest fails here rather than giving silent garbage."""
    path = folder / MANIFEST_NAME
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}: re-export the model")
    version = manifest["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION or version < 1:
        raise ArtifactError(
            f"{path} has schema_version {version!r}; this edgeexit reads 1..{SCHEMA_VERSION}: "
            "upgrade edgeexit or re-export with this version"
        )
    if not isinstance(manifest["model"], dict):
        raise ArtifactError(f"{path}: model must be an object; re-export the model")
    _check_units(path, folder, manifest)
    _check_preprocessing(path, manifest["preprocessing"])
    _check_class_names(path, manifest)
    _check_calibration(path, manifest)


def artifact_file(folder: str | os.PathLike, name) -> Path:
    """``folder/name`` for a file a manifest names, refusing anything that leaves the artifact:
    an absolute path, ``..``, or a symlink (anywhere on the way) that resolves outside."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(f"{folder / MANIFEST_NAME} names a file as {name!r}: not a file name; re-export the model")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ArtifactError(
            f"{folder / MANIFEST_NAME} names {name!r}, outside the artifact: files must be inside {folder}; "
            "re-export the model"
        )
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ArtifactError(f"{path} resolves outside the artifact {folder} (a symlink?): re-export the model")
    return path


def _check_units(path: Path, folder: Path, manifest: dict) -> None:
    units = manifest["units"]
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise ArtifactError(f"{path}: units must be a list of objects; re-export the model")
    names = [u.get("name") for u in units]
    k = len(names) // 2
    if k == 0 or names != unit_names(k):
        raise ArtifactError(f"{path}: units must be seg_01, head_01, ... in order; found {names}")
    for u in units:
        _check_unit_io(path, u)
        onnx_path = artifact_file(folder, u.get("onnx"))
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path} is missing: re-export the model")
        if "onnx_int8" in u:
            artifact_file(folder, u["onnx_int8"])
        engines = u.get("engines") or []
        if not isinstance(engines, list):
            raise ArtifactError(f"{path}: unit {u['name']} engines must be a list; re-export the model")
        for engine in engines:
            artifact_file(folder, engine.get("path") if isinstance(engine, dict) else None)
    if "weights" in manifest:
        artifact_file(folder, manifest["weights"])
    frames = manifest.get("calibration_frames")
    if frames is not None:
        if not isinstance(frames, dict):
            raise ArtifactError(f"{path}: calibration_frames must be an object; re-export the model")
        artifact_file(folder, frames.get("path"))


def _check_unit_io(path: Path, u: dict) -> None:
    kind = "segment" if u["name"].startswith("seg_") else "head"
    if u.get("kind") != kind:
        raise ArtifactError(f"{path}: unit {u['name']} must have kind '{kind}'; re-export the model")
    for key in ("inputs", "outputs"):
        io = u.get(key)
        ok = (
            isinstance(io, list)
            and io
            and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list) for t in io
            )
        )
        if not ok:
            raise ArtifactError(
                f"{path}: unit {u['name']} {key} must list {{name, shape}} objects; re-export the model"
            )


def _check_calibration(path: Path, manifest: dict) -> None:
    """A calibration block that the runtime would trip over later is refused now."""
    from edgeexit.runtime.policies import POLICIES

    cal = manifest.get("calibration")
    if cal is None:
        return

    def bad(what: str):
        return ArtifactError(f"{path}: calibration {what}; run `edgeexit calibrate` again")

    if not isinstance(cal, dict):
        raise bad("is not an object")
    th = cal.get("thresholds")
    k = len(manifest["units"]) // 2
    if th is not None and not (isinstance(th, list) and len(th) == k and all(_finite(t) for t in th)):
        raise bad(f"thresholds must be {k} finite numbers, got {th!r}")
    ladder = cal.get("ladder")
    if ladder is not None and not (
        isinstance(ladder, list)
        and all(
            isinstance(r, dict)
            and isinstance(r.get("thresholds"), list)
            and len(r["thresholds"]) == k
            and all(_finite(t) for t in r["thresholds"])
            and _finite(r.get("predicted_ms"))
            and _finite(r.get("predicted_accuracy"))
            for r in ladder
        )
    ):
        raise bad(f"ladder must list {{thresholds ({k} numbers), predicted_ms, predicted_accuracy}} objects")
    policy = cal.get("policy", "max_softmax")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise bad(f"policy {cal.get('policy')!r} is not one of {', '.join(POLICIES)}")
    table = (cal.get("latency") or {}).get("units") if isinstance(cal.get("latency"), dict | None) else None
    if table is not None:
        names = unit_names(k)
        if not (
            isinstance(table, dict)
            and all(isinstance(table.get(n), dict) and _finite(table[n].get("p95_ms")) for n in names)
        ):
            raise bad("latency.units must give p95_ms for every unit")


def _check_preprocessing(path: Path, pre) -> None:
    def bad(what: str):
        return ArtifactError(f"{path}: preprocessing {what}; re-export the model")

    if not isinstance(pre, dict):
        raise bad("is not an object")
    chans = pre.get("in_chans")
    if chans not in (1, 3):
        raise bad(f"in_chans must be 1 or 3, got {chans!r}")
    size = pre.get("input_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 1 <= v <= 8192 for v in size)):
        raise bad(f"input_size must be [H, W] with 1..8192 pixels each, got {size!r}")
    for key, positive in (("mean", False), ("std", True)):
        v = pre.get(key)
        ok = isinstance(v, list) and len(v) == chans and all(_finite(x) for x in v)
        if not ok or (positive and not all(x > 0 for x in v)):
            need = "positive finite numbers" if positive else "finite numbers"
            raise bad(f"{key} must be {chans} {need} (one per channel), got {v!r}")


def _check_class_names(path: Path, manifest: dict) -> None:
    names = manifest["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ArtifactError(f"{path}: class_names must be a non-empty list of strings; re-export the model")
    try:
        classes = manifest["units"][1]["outputs"][0]["shape"][1]
    except (KeyError, IndexError, TypeError):
        return  # an artifact without recorded shapes: nothing to compare with
    if isinstance(classes, int) and classes != len(names):
        raise ArtifactError(
            f"{path}: {len(names)} class_names but the model has {classes} classes; re-export the model"
        )


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


MAX_FRAMES_BYTES = 2 << 30  # the stored file (compressed)
MAX_FRAMES_EXPANDED = 4 << 30  # what its members may expand to, at most (less: count x shape)


def _check_npz_members(path: Path, data: bytes, info: dict) -> None:
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
    allowed = {f"{k}.npy" for k in ("frames", "labels", "calibration", "verification")}
    count, shape = info.get("count"), info.get("shape")
    limit = MAX_FRAMES_EXPANDED
    if isinstance(count, int) and isinstance(shape, list) and all(isinstance(v, int) for v in shape):
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


def load_calibration_frames(manifest: dict) -> dict | None:
    """The held-out images `edgeexit export` stored in the artifact (numpy only; checked against the
    manifest's sha256): frames (N, H, W, C) uint8, labels, and the calibration/verification indices.
    None when the artifact has none."""
    import hashlib

    import numpy as np

    info = manifest.get("calibration_frames")
    if not info:
        return None
    path = artifact_file(manifest["_folder"], info.get("path"))
    from edgeexit.util import check_input_file

    try:
        check_input_file(path, "calibration frames", root=manifest["_folder"], max_bytes=MAX_FRAMES_BYTES)
    except ArtifactError:
        raise
    except Exception as e:  # UserError: a FIFO, a device, too large; say to re-export
        raise ArtifactError(f"{e}; re-export the model") from None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read ({e.strerror or e}): re-export the model") from None
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise ArtifactError(f"{path} does not match the sha256 in the manifest: re-export the model")
    import io

    _check_npz_members(path, data, info)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            out = {k: z[k] for k in ("frames", "labels", "calibration", "verification")}
    except (ValueError, KeyError, OSError, EOFError) as e:
        raise ArtifactError(f"{path} is not a calibration-frames file ({e}): re-export the model") from None
    except Exception as e:  # zipfile.BadZipFile, a truncated member (zlib.error) ...
        raise ArtifactError(
            f"{path} is not a calibration-frames file ({type(e).__name__}: {e}): re-export the model"
        ) from None
    _check_frames(manifest, path, out)
    return out


def _check_frames(manifest: dict, path, out: dict) -> None:
    """Stored frames must be what the model takes, labels its classes, the two splits disjoint."""
    import numpy as np

    n = len(out["frames"])
    if out["frames"].dtype != np.uint8 or len(out["labels"]) != n:
        raise ArtifactError(f"{path}: frames must be uint8 with one label each; re-export the model")
    frames, labels = out["frames"], out["labels"]
    pre = manifest["preprocessing"]
    want = (*pre["input_size"], pre["in_chans"])
    if frames.ndim != 4 or frames.shape[1:] != want:
        raise ArtifactError(
            f"{path}: frames are {list(frames.shape[1:])} (H, W, C) but the model takes {list(want)}: calibrating "
            "on resized frames would not be what runs; re-export the model"
        )
    classes = len(manifest["class_names"])
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


def num_exits(manifest: dict) -> int:
    return len(manifest["units"]) // 2


def write_manifest(artifact: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest`` into the artifact, atomically. A manifest read by `load_manifest` carries the
    content id of the export it came from: when the artifact on disk is another export now (an
    `export --force` replaced it while a calibrate ran), nothing is written and an ArtifactError says
    so, rather than writing the old model's calibration into the new artifact."""
    from edgeexit.util import atomic_write_json

    expected = manifest.get("_content_id")
    if expected is not None:
        from edgeexit.runtime.artifact import content_id, read_manifest_json

        folder = Path(artifact)
        try:
            now = content_id(folder, read_manifest_json(folder))
        except ArtifactError:
            now = None
        if now != expected:
            raise ArtifactError(
                f"{folder} was replaced by another export while this job ran (its units changed): nothing "
                "was written; run the job again on the new artifact"
            )
    clean = {k: v for k, v in manifest.items() if not k.startswith("_")}
    atomic_write_json(Path(artifact) / MANIFEST_NAME, clean)
