"""Fusing the segments between two evaluated exits into one ONNX graph.

With calibrated thresholds, most heads are skipped, and the segments between two evaluated exits
always run back to back. Running them as separate ONNX Runtime sessions costs a call (and a copy
of the state) per unit; fusing them removes that splitting overhead (docs/results.md).

Fused graphs are cached as ``NAME.edgeexit/fused/seg_AA-BB.onnx``. Building one needs the ``onnx``
package (present wherever `edgeexit export` or `calibrate` ran); a runtime without it uses cached
files when they exist and otherwise runs the units one by one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from edgeexit.runtime.plan import group_name


def fused_path(folder: Path, first_pos: int, last_pos: int) -> Path:
    return Path(folder) / "fused" / f"{group_name(first_pos, last_pos)}.onnx"


def build_fused(folder: Path, manifest: dict, k0: int, k1: int) -> bytes:
    """Merge segments k0..k1 (0-based, inclusive) into one model; returns its serialised bytes."""
    import onnx
    from onnx import compose

    segments = [u for u in manifest["units"] if u["kind"] == "segment"]
    merged = None
    for k in range(k0, k1 + 1):
        unit = segments[k]
        model = onnx.load(str(Path(folder) / unit["onnx"]))
        # Internal names (initialisers, intermediate edges) get a per-unit prefix so they cannot
        # collide; graph inputs and outputs keep their contract names so the units connect.
        model = _prefix_internal_names(compose.add_prefix(model, f"u{k + 1:02d}_"), f"u{k + 1:02d}_")
        if merged is None:
            merged = model
        else:
            io_map = [(o["name"], i["name"]) for o, i in zip(segments[k - 1]["outputs"], unit["inputs"], strict=True)]
            merged = compose.merge_models(merged, model, io_map=io_map, name=group_name(k0, k1))
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def _prefix_internal_names(model, prefix: str):
    """add_prefix renames every edge; give the graph's inputs and outputs their names back."""
    graph = model.graph
    restore = {v.name: v.name[len(prefix) :] for v in (*graph.input, *graph.output) if v.name.startswith(prefix)}
    for v in (*graph.input, *graph.output):
        v.name = restore.get(v.name, v.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = restore.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = restore.get(name, name)
    return model


def load_or_build(folder: Path, manifest: dict, k0: int, k1: int) -> bytes | str | None:
    """A path to the cached fused model, freshly built bytes (cached when the folder is writable),
    or None when it is not cached and the onnx package is missing."""
    path = fused_path(folder, k0, k1)
    if path.is_file():
        return str(path)
    try:
        data = build_fused(folder, manifest, k0, k1)
    except ImportError:
        return None
    try:
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only artifact: use the bytes without caching
    return data
