"""Fusing the segments between two evaluated exits into one ONNX graph.

With calibrated thresholds, most heads are skipped, and the segments between two evaluated exits
always run back to back. Running them as separate ONNX Runtime sessions costs a call (and a copy
of the state) per unit; fusing them removes that splitting overhead (docs/results.md).

Fused graphs are cached as ``NAME.edgeexit/fused/seg_AA-BB.<hash>.onnx``, keyed by the content of
the units they were built from; a ``fused`` that is a symlink or leads outside the artifact is
neither read nor written. Building one needs the ``onnx``
package (present wherever `edgeexit export` or `calibrate` ran); a runtime without it uses cached
files when they exist and otherwise runs the units one by one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgeexit.runtime.manifest import artifact_file
from edgeexit.runtime.plan import exit_group_name, group_name
from edgeexit.util import atomic_write, remove_stale_temps


def _units(manifest: dict, first_pos: int, last_pos: int, head: bool) -> list[dict]:
    """The units a fused graph is made of: segments first..last, then head ``last`` if asked."""
    segments = [u for u in manifest["units"] if u["kind"] == "segment"]
    heads = [u for u in manifest["units"] if u["kind"] == "head"]
    return segments[first_pos : last_pos + 1] + ([heads[last_pos]] if head else [])


def units_digest(
    folder: Path, manifest: dict, first_pos: int, last_pos: int, key: str = "onnx", head: bool = False
) -> str:
    """sha256 (12 hex digits) of the unit files a fused graph is built from: the cache key, so a
    fused graph is never used with units other than its own (a new export copied over an old one)."""
    h = hashlib.sha256()
    for unit in _units(manifest, first_pos, last_pos, head):
        h.update(artifact_file(folder, unit[key]).read_bytes())
    return h.hexdigest()[:12]


def fused_dir(folder: Path) -> Path | None:
    """``folder/fused``, or None when it is a symlink or leads outside the artifact (then nothing is
    read from it or written into it)."""
    d = Path(folder) / "fused"
    if d.is_symlink() or (d.exists() and not (d.is_dir() and d.resolve().is_relative_to(Path(folder).resolve()))):
        return None
    return d


def fused_path(
    folder: Path, manifest: dict, first_pos: int, last_pos: int, key: str = "onnx", head: bool = False
) -> Path | None:
    d = fused_dir(folder)
    if d is None:
        return None
    name = exit_group_name(first_pos, last_pos) if head else group_name(first_pos, last_pos)
    return d / f"{name}.{units_digest(folder, manifest, first_pos, last_pos, key, head)}.onnx"


def build_fused(folder: Path, manifest: dict, k0: int, k1: int, key: str = "onnx", head: bool = False) -> bytes:
    """Merge segments k0..k1 (0-based, inclusive), and head k1 when ``head``, into one model whose
    outputs are segment k1's outputs, then the head's; returns its serialised bytes."""
    import onnx
    from onnx import compose

    units = _units(manifest, k0, k1, head)
    merged = None
    for n, unit in enumerate(units):
        model = onnx.load(str(artifact_file(folder, unit[key])))
        # Internal names (initialisers, intermediate edges) get a per-unit prefix so they cannot
        # collide; graph inputs and outputs keep their contract names so the units connect.
        model = _prefix_internal_names(compose.add_prefix(model, f"u{n:02d}_"), f"u{n:02d}_")
        if merged is None:
            merged = model
            continue
        previous = units[n - 1]["outputs"]
        if unit["kind"] == "head":  # the head reads the tap (the last output) and the state stays an output
            io_map = [(previous[-1]["name"], unit["inputs"][0]["name"])]
            outputs = [o["name"] for o in (*previous, *unit["outputs"])]
        else:
            io_map = [(o["name"], i["name"]) for o, i in zip(previous, unit["inputs"], strict=True)]
            outputs = None
        merged = compose.merge_models(merged, model, io_map=io_map, outputs=outputs, name=group_name(k0, k1))
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


def load_or_build(
    folder: Path,
    manifest: dict,
    first_pos: int,
    last_pos: int,
    key: str = "onnx",
    head: bool = False,
    cache: bool = True,
) -> bytes | str | None:
    """A path to the cached fused model, freshly built bytes (cached when ``cache`` and the artifact
    is writable), or None when it is not cached and the onnx package is missing."""
    path = fused_path(folder, manifest, first_pos, last_pos, key, head)
    if path is not None and path.is_file() and not path.is_symlink():
        return str(path)
    try:
        data = build_fused(folder, manifest, first_pos, last_pos, key, head)
    except ImportError:
        return None
    if path is not None and cache:
        try:
            path.parent.mkdir(exist_ok=True)
            remove_stale_temps(path.parent)
            atomic_write(path, lambda f: f.write(data))
        except OSError:
            pass  # read-only artifact: use the bytes without caching
    return data
