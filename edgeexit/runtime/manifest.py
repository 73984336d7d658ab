"""Reading and validating NAME.edgeexit/manifest.json (json + pathlib only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgeexit.errors import ArtifactError
from edgeexit.runtime.plan import unit_names

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED = ("schema_version", "preprocessing", "class_names", "units", "model")


def load_manifest(artifact: str | os.PathLike) -> dict:
    """Load and check a manifest; every problem is an ArtifactError saying what to rebuild."""
    folder = Path(artifact)
    path = folder / MANIFEST_NAME
    if not folder.exists():
        raise ArtifactError(f"{folder} does not exist: create it with `edgeexit export MODEL.pt --out {folder}`")
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST_NAME}: it is not an edgeexit artifact "
            "(re-export with `edgeexit export MODEL.pt`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the model") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not an edgeexit manifest")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}: re-export the model")
    version = manifest["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise ArtifactError(
            f"{path} has schema_version {version!r}; this edgeexit reads 1..{SCHEMA_VERSION}: "
            "upgrade edgeexit or re-export with this version"
        )
    names = [u.get("name") for u in manifest["units"]]
    k = len(names) // 2
    expected = unit_names(k)
    if k == 0 or names != expected:
        raise ArtifactError(f"{path}: units must be seg_01, head_01, ... in order; found {names}")
    for u in manifest["units"]:
        onnx_path = folder / u["onnx"]
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path} is missing: re-export the model")
    manifest["_folder"] = str(folder)
    return manifest


def num_exits(manifest: dict) -> int:
    return len(manifest["units"]) // 2


def write_manifest(artifact: str | os.PathLike, manifest: dict) -> None:
    from edgeexit.util import atomic_write_json

    clean = {k: v for k, v in manifest.items() if not k.startswith("_")}
    atomic_write_json(Path(artifact) / MANIFEST_NAME, clean)
