"""Fusing the segments between two evaluated exits, and the head they end at, into one ONNX graph.

With calibrated thresholds, most heads are skipped, and the segments between two evaluated exits
always run back to back. Running them as separate ONNX Runtime sessions costs a call (and a copy
of the state) per unit; fusing them removes that splitting overhead (docs/lab-notebook.md §3).

Fused graphs are cached as ``NAME.edgeexit/fused/<exit group name>.<hash>.onnx``, keyed by the content of
the units they were built from; a ``fused`` that is a symlink or leads outside the artifact is
neither read nor written. Building one needs the ``onnx``
package (present wherever `edgeexit export` or `calibrate` ran); a runtime without it uses cached
files when they exist and otherwise runs the units one by one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from edgeexit.runtime.artifact import Unit
from edgeexit.runtime.plan import exit_group_name
from edgeexit.util import atomic_write, remove_stale_temps


def _units(units: Sequence[Unit], first_pos: int, last_pos: int) -> list[Unit]:
    """The units a fused graph is made of: segments first..last, then head ``last``."""
    return [*units[2 * first_pos : 2 * last_pos + 1 : 2], units[2 * last_pos + 1]]


def units_digest(units: Sequence[Unit], first_pos: int, last_pos: int, precision: str = "fp32") -> str:
    """sha256 (12 hex digits) of the unit files a fused graph is built from: the cache key, so a
    fused graph is never used with units other than its own (a new export copied over an old one)."""
    h = hashlib.sha256()
    for unit in _units(units, first_pos, last_pos):
        h.update(unit.file(precision).read_bytes())
    return h.hexdigest()[:12]


def fused_dir(folder: Path) -> Path | None:
    """``folder/fused``, or None when it is a symlink or leads outside the artifact (then nothing is
    read from it or written into it)."""
    d = Path(folder) / "fused"
    if d.is_symlink() or (d.exists() and not (d.is_dir() and d.resolve().is_relative_to(Path(folder).resolve()))):
        return None
    return d


def fused_path(
    folder: Path, units: Sequence[Unit], first_pos: int, last_pos: int, precision: str = "fp32"
) -> Path | None:
    d = fused_dir(folder)
    if d is None:
        return None
    return d / f"{exit_group_name(first_pos, last_pos)}.{units_digest(units, first_pos, last_pos, precision)}.onnx"


def build_fused(units: Sequence[Unit], k0: int, k1: int, precision: str = "fp32") -> bytes:
    """Merge segments k0..k1 (0-based, inclusive) and head k1 into one model whose outputs are
    segment k1's outputs, then the head's; returns its serialised bytes."""
    import onnx
    from onnx import compose

    def load(n: int, unit: Unit) -> onnx.ModelProto:
        model = onnx.load(str(unit.file(precision)))
        # Internal names (initialisers, intermediate edges) get a per-unit prefix so they cannot
        # collide; graph inputs and outputs keep their contract names so the units connect.
        return _prefix_internal_names(compose.add_prefix(model, f"u{n:02d}_"), f"u{n:02d}_")

    parts = _units(units, k0, k1)  # at least one segment and the head
    merged = load(0, parts[0])
    for n, unit in enumerate(parts[1:], start=1):
        model = load(n, unit)
        previous = parts[n - 1].output_names
        if unit.kind == "head":  # the head reads the tap (the last output) and the state stays an output
            io_map = [(previous[-1], unit.input_names[0])]
            outputs = [*previous, *unit.output_names]
        else:
            io_map = list(zip(previous, unit.input_names, strict=True))
            outputs = None
        merged = compose.merge_models(merged, model, io_map=io_map, outputs=outputs, name=exit_group_name(k0, k1))
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
    folder: Path, units: Sequence[Unit], first_pos: int, last_pos: int, precision: str = "fp32", cache: bool = True
) -> bytes | str | None:
    """A path to the cached fused model, freshly built bytes (cached when ``cache`` and the artifact
    is writable), or None when it is not cached and the onnx package is missing."""
    path = fused_path(folder, units, first_pos, last_pos, precision)
    if path is not None and path.is_file() and not path.is_symlink():
        return str(path)
    try:
        data = build_fused(units, first_pos, last_pos, precision)
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
