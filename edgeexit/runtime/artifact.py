"""The typed contract of a NAME.edgeexit artifact: one validated parse of manifest.json and of what
it says about every file it names, at load time (json, pathlib and numpy only; no torch).

``Artifact.load(folder)`` reads the manifest once and builds frozen dataclasses:

- ``model``: `ModelInfo` (exits, classes, width, in_chans, input_size, stem, method, the config);
- ``preprocessing``: `Preprocessing` (finite in float32: a std of 1e-50 or a mean of 1e39 is refused);
- ``units``: `Unit` per segment/head, in order, with their `TensorSpec` inputs and outputs checked
  as a chain (segment k takes segment k-1's outputs, head k segment k's last one; the first segment
  takes the preprocessed image, the heads give logits for every class and a confidence) and their
  files per precision (``files["fp32"]``, ``files["int8"]``, `Engine` per TensorRT plan);
- ``calibration``: `Calibration` (thresholds, policy, backend, the ladder of plans, the per-unit
  latency table), or None;
- ``calibration_frames``, ``weights``: where the stored frames and the torch weights are.

Every file the manifest names resolves inside the folder and is named once. Any problem is an
`ArtifactError` naming the field (the CLI turns it into exit 2). ``content_id`` identifies the
export (unit files and the manifest's export fields), so a writer can tell that the artifact was
replaced under it (`edgeexit.runtime.manifest.write_manifest`).

The same values are what is written: export builds `Unit`s and writes `Artifact.create(...).to_json()`;
calibrate and `edgeexit engines` write `with_calibration(...)` / `with_engines(...)`. Each typed value
has a ``to_json`` (keys it does not model kept in its ``extra``, written back as read), and
``Artifact.load(folder).to_json()`` is the manifest on disk.

The on-disk format is unchanged (schema_version 1): every artifact written by earlier versions of
schema 1 loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, TypeGuard, overload

from edgeexit.errors import ArtifactError
from edgeexit.runtime.plan import unit_names

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED = ("schema_version", "preprocessing", "class_names", "units", "model")
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 32
PRECISIONS = ("fp32", "fp16", "int8")
# A unit's ONNX file per precision, as the manifest's unit entry names it.
FILE_KEYS = {"fp32": "onnx", "int8": "onnx_int8", "int8_trt": "onnx_int8_trt", "fp16": "onnx_fp16"}
_UNIT_STATS = ("flops", "params", "parity_max_abs_diff")


def _relative(folder: Path, path: Path) -> str:
    """A file's name in the manifest: its path inside ``folder``, with forward slashes."""
    return path.relative_to(folder).as_posix()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]  # None: a dynamic dimension (the batch)
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Engine:
    path: Path
    precision: str
    info: Mapping = field(default_factory=dict, compare=False)  # the whole entry: TensorRT version, device, shapes
    max_batch: int | None = None  # the optimisation profile's largest batch (None: not recorded)

    def to_json(self, folder: Path) -> dict:
        """The manifest's entry of this plan (its path relative to the artifact ``folder``)."""
        return {**_thaw(self.info), "path": _relative(folder, self.path), "precision": self.precision}


@dataclass(frozen=True)
class Unit:
    name: str  # seg_01, head_01, ...
    kind: str  # segment | head
    position: int  # 0-based exit position
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: Mapping[str, Path]  # precision -> ONNX file: "fp32" always; "int8" (and "int8_trt", the
    # TensorRT flavour) after export --int8, "fp16" after export --half
    engines: tuple[Engine, ...] = ()
    flops: float | None = None  # from the checkpoint's cost count (None when it had none)
    params: int | None = None
    parity_max_abs_diff: float | None = None  # ONNX Runtime vs PyTorch, this unit alone
    # what export records beside (exit_index, tap, file sizes, export_s, macs), written back as read
    extra: Mapping = field(default_factory=dict, compare=False, repr=False)

    def to_json(self, folder: Path) -> dict:
        """The manifest's entry of this unit, file names relative to the artifact ``folder``."""
        out: dict = {"name": self.name, "kind": self.kind}
        out.update({FILE_KEYS[p]: _relative(folder, path) for p, path in self.files.items()})
        out["inputs"] = [t.to_json() for t in self.inputs]
        out["outputs"] = [t.to_json() for t in self.outputs]
        out["engines"] = [e.to_json(folder) for e in self.engines]
        out.update({key: getattr(self, key) for key in _UNIT_STATS})
        return {**out, **_thaw(self.extra)}

    def with_file(self, precision: str, path: Path, **extra) -> Unit:
        """This unit with ``path`` as its ``precision`` ONNX file (and ``extra`` recorded beside it)."""
        return replace(self, files=MappingProxyType({**self.files, precision: path}), extra={**self.extra, **extra})

    def file(self, precision: str = "fp32") -> Path:
        """The unit's ONNX file of ``precision`` (an ArtifactError naming the export flag when absent)."""
        path = self.files.get(precision)
        if path is None:
            flag = {"int8": "--int8", "int8_trt": "--int8", "fp16": "--half"}.get(precision, "")
            raise ArtifactError(
                f"the artifact has no {precision} units ({self.name}): export with `edgeexit export MODEL.pt {flag}`"
            )
        return path

    @property
    def exit_index(self) -> int:
        """The exit this unit belongs to, counted from 1 (as ``Prediction.exit_index``)."""
        return self.position + 1

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def values_per_sample(self) -> int:
        """Float values this unit outputs per sample (the dynamic batch dimension excluded)."""
        return sum(math.prod(d or 1 for d in t.shape[1:]) for t in self.outputs)


@dataclass(frozen=True)
class Preprocessing:
    in_chans: int
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str | None = None
    resize: str | None = None
    extra: Mapping = field(default_factory=dict, compare=False, repr=False)  # other keys, written back as read

    def to_dict(self) -> dict:
        return {
            "in_chans": self.in_chans,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def to_json(self) -> dict:
        """The manifest's ``preprocessing`` block."""
        named = {"channel_order": self.channel_order, "resize": self.resize}
        return {**self.to_dict(), **{k: v for k, v in named.items() if v is not None}, **_thaw(self.extra)}


@dataclass(frozen=True)
class ModelInfo:
    num_exits: int
    num_classes: int
    config: Mapping  # the training config (MultiExitConfig.to_dict())
    width: float | None = None
    in_chans: int | None = None
    input_size: tuple[int, int] | None = None
    stem: str | None = None
    method: str | None = None
    extra: Mapping = field(default_factory=dict, compare=False, repr=False)  # checkpoint, metrics: as read

    def to_json(self) -> dict:
        """The manifest's ``model`` block."""
        return {"config": _thaw(self.config), "method": self.method, "num_exits": self.num_exits, **_thaw(self.extra)}


@dataclass(frozen=True)
class MeasuredLatency:
    """A latency calibrate measured on the device, what the budget controller compares against. Each
    figure is a finite number of ms or None (not measured, or not a number: never trusted)."""

    mean_ms: float | None
    p95_ms: float | None
    frames: int | None = None
    block_sd: float | None = None  # relative block-to-block sd of the slowdown: calibration's own noise
    block_frames: int | None = None  # frames per block of that sd

    def of(self, metric: str) -> float | None:
        """The figure the controller holds for ``metric`` (mean or p95)."""
        return self.p95_ms if metric == "p95" else self.mean_ms

    @property
    def complete(self) -> bool:
        return self.mean_ms is not None and self.p95_ms is not None


@dataclass(frozen=True)
class LadderRung:
    thresholds: tuple[float, ...]
    predicted_ms: float
    predicted_accuracy: float
    measured: MeasuredLatency | None = None  # run for real by calibrate (None: a prediction only)
    exit_ms: tuple[float | None, ...] | None = None  # mean latency per exit position taken (None: unseen)


@dataclass(frozen=True)
class FrameCost:
    """What calibrate --frame-size measured before the cascade: the camera frame's preprocessing."""

    size: tuple[int, ...]
    covers_frame: bool  # the budget covers the whole frame (preprocessing, then the cascade)
    preprocess: MeasuredLatency | None


@dataclass(frozen=True)
class Calibration:
    thresholds: tuple[float, ...] | None
    policy: str
    backend: str | None
    ladder: tuple[LadderRung, ...]
    latency_p95_ms: Mapping[str, float] | None  # unit name -> p95 ms, on ``backend``
    device: Mapping | None
    predicted: Mapping | None = None  # what calibrate predicted for the chosen plan (accuracy, mean_ms, ...)
    # the drift monitor's reference (runtime/monitor.py): None in calibrations made before it existed
    drift_reference: Mapping | None = None
    metric: str = "mean"  # what the budget holds: the mean or the p95 latency
    predicted_ms: float | None = None  # the calibrated plan's predicted mean latency
    predicted_accuracy: float | None = None
    full_model_ms: float | None = None  # the full model's predicted latency (`run --budget 50%`)
    measured: MeasuredLatency | None = None  # the calibrated plan's verification run
    reference: MeasuredLatency | None = None  # the same plan on the ladder's scale (measured interleaved)
    exit_ms: tuple[float | None, ...] | None = None  # its mean latency per exit taken, on that scale
    frame: FrameCost | None = None
    block: Mapping = field(default_factory=dict, compare=False, repr=False)  # the whole block, read-only

    def to_dict(self) -> dict:
        """The block as a fresh mutable dict (what the budget controller and reports read)."""
        return _thaw(self.block)

    def to_json(self) -> dict:
        """The manifest's ``calibration`` block. The typed fields above are what the runtime reads of
        it; the block also records calibrate's evidence (options, frontier, cross-fit, iso-accuracy,
        data, device, ...), which stays one mapping, written back whole."""
        return _thaw(self.block)


@dataclass(frozen=True)
class CalibrationFrames:
    path: Path
    sha256: str
    count: int | None
    shape: tuple[int, ...] | None
    extra: Mapping = field(default_factory=dict, compare=False, repr=False)  # the split sizes, source, bytes

    def to_json(self, folder: Path) -> dict:
        """The manifest's ``calibration_frames`` entry (its path relative to the artifact ``folder``)."""
        out: dict = {"path": _relative(folder, self.path), "sha256": self.sha256}
        if self.count is not None:
            out["count"] = self.count
        if self.shape is not None:
            out["shape"] = list(self.shape)
        return {**out, **_thaw(self.extra)}


@dataclass(frozen=True)
class Artifact:
    folder: Path
    schema_version: int
    model: ModelInfo
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    units: tuple[Unit, ...]
    calibration: Calibration | None
    calibration_frames: CalibrationFrames | None
    weights: Path | None
    content_id: str
    manifest: Mapping = field(repr=False, compare=False)  # the parsed JSON, read-only

    @property
    def num_exits(self) -> int:
        return len(self.units) // 2

    def segment(self, pos: int) -> Unit:
        return self.units[2 * pos]

    def head(self, pos: int) -> Unit:
        return self.units[2 * pos + 1]

    @property
    def segments(self) -> tuple[Unit, ...]:
        return self.units[0::2]

    @property
    def heads(self) -> tuple[Unit, ...]:
        return self.units[1::2]

    @property
    def engines(self) -> tuple[Engine, ...]:
        return tuple(e for u in self.units for e in u.engines)

    @property
    def parity(self) -> Mapping | None:
        """Export's ONNX Runtime vs PyTorch check (samples, per-exit differences, tolerance)."""
        return self.manifest.get("parity")

    @property
    def quantization(self) -> Mapping | None:
        """The INT8 settings and their parity (export --int8), or None."""
        return self.manifest.get("quantization")

    @property
    def split(self) -> Mapping | None:
        """The held-out split from the checkpoint (so calibrate can rebuild it with the dataset)."""
        return self.manifest.get("split")

    @property
    def created(self) -> str | None:
        return self.manifest.get("created")

    @property
    def dataset(self) -> str | None:
        return self.manifest.get("dataset")

    def to_json(self) -> dict:
        """manifest.json's content (a fresh dict: what export and `write_manifest` write and `info
        --json` prints): the typed fields serialised, and the blocks the runtime does not interpret
        (parity, quantization, fp16, engine_parity, export, split, dataset, created) as recorded.
        ``Artifact.load(folder).to_json()`` is the manifest on disk."""
        out = _thaw(self.manifest)
        typed = {
            "schema_version": self.schema_version,
            "model": self.model.to_json(),
            "preprocessing": self.preprocessing.to_json(),
            "class_names": list(self.class_names),
            "units": [u.to_json(self.folder) for u in self.units],
            "calibration": self.calibration.to_json() if self.calibration is not None else None,
            "calibration_frames": self.calibration_frames.to_json(self.folder) if self.calibration_frames else None,
            "weights": _relative(self.folder, self.weights) if self.weights is not None else None,
        }
        for key, value in typed.items():
            if value is not None or key in out:  # an absent optional block stays absent
                out[key] = value
        return json.loads(json.dumps(out))

    @classmethod
    def create(cls, folder: str | os.PathLike, units: Sequence[Unit], blocks: Mapping) -> Artifact:
        """A new artifact in ``folder`` from its typed ``units`` and the manifest's other ``blocks``
        (model, preprocessing, class_names, parity, export, ...), checked as `load` checks it: its
        `to_json` is the manifest.json export writes."""
        folder = Path(folder)
        m = {"schema_version": SCHEMA_VERSION, **_thaw(blocks), "units": [u.to_json(folder) for u in units]}
        return _build(folder, _as_written(m))

    def with_calibration(self, calibration: Calibration | Mapping | None) -> Artifact:
        """This artifact with ``calibration`` (a `Calibration` or its block; None: uncalibrated),
        checked as `load` checks it: what calibrate writes is what the next load reads."""
        block = calibration.to_json() if isinstance(calibration, Calibration) else calibration
        return self._rebuilt({**self.to_json(), "calibration": _thaw(block) if block is not None else None})

    def with_engines(self, precision: str, engines: Sequence[Engine | Mapping], engine_parity: Mapping) -> Artifact:
        """This artifact with ``engines`` (one TensorRT plan per unit, in unit order: an `Engine` or its
        manifest entry) as its ``precision`` engines, the other precisions' kept, and the gate they
        passed recorded as ``engine_parity``; checked as `load` checks it."""
        bad = _Bad(self.folder / MANIFEST_NAME)
        units = []
        for u, e in zip(self.units, engines, strict=True):
            engine = e if isinstance(e, Engine) else _engine(self.folder, _thaw(e), f"units[{u.name}].engines", bad)
            kept = tuple(old for old in u.engines if old.precision != precision)
            units.append(replace(u, engines=(*kept, engine)))
        m = self.to_json()
        m.update(units=[u.to_json(self.folder) for u in units], engine_parity=_thaw(engine_parity))
        return self._rebuilt(m)

    def _rebuilt(self, m: dict) -> Artifact:
        return _build(self.folder, _as_written(m))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Artifact:
        folder = Path(folder)
        raw = read_manifest_json(folder)
        return _build(folder, raw)

    @classmethod
    def in_memory(
        cls,
        num_exits: int,
        class_names: Sequence[str],
        preprocessing: Mapping,
        calibration: Mapping | None = None,
    ) -> Artifact:
        """An artifact without a folder or files: what a `Cascade` over a runner of your own reads
        (a simulated device, a test, a benchmark of the cascade itself). ``preprocessing`` and
        ``calibration`` are manifest blocks, checked as `load` checks them."""
        if not (_int(num_exits) and num_exits >= 1):
            raise ArtifactError(f"an artifact needs at least one exit, got {num_exits!r}")
        names = tuple(class_names)
        if not (names and all(isinstance(n, str) for n in names)):
            raise ArtifactError("class_names must be a non-empty list of strings")
        bad = _Bad("in-memory artifact")
        units = tuple(
            Unit(name, "segment" if name.startswith("seg_") else "head", i // 2, (), (), MappingProxyType({}))
            for i, name in enumerate(unit_names(num_exits))
        )
        raw = {
            "schema_version": SCHEMA_VERSION,
            "class_names": list(names),
            "preprocessing": _thaw(preprocessing),
            "units": [{"name": u.name, "kind": u.kind} for u in units],
            "calibration": _thaw(calibration),
        }
        return cls(
            folder=Path("."),
            schema_version=SCHEMA_VERSION,
            model=ModelInfo(num_exits=num_exits, num_classes=len(names), config=MappingProxyType({})),
            preprocessing=_preprocessing(raw["preprocessing"], bad),
            class_names=names,
            units=units,
            calibration=_calibration(raw["calibration"], num_exits, bad),
            calibration_frames=None,
            weights=None,
            content_id="",
            manifest=_freeze(raw),
        )


class _Bad:
    """The ArtifactError of one field, ``<where>: <field> <what>; <fix>``: every check below says
    where, which field, what is wrong and how to get a good one."""

    def __init__(self, where: str | Path) -> None:
        self.where = where

    def __call__(self, field_name: str, what: str, fix: str = "re-export the model") -> ArtifactError:
        return ArtifactError(f"{self.where}: {field_name} {what}; {fix}")


def parse_preprocessing(p: Mapping, where: str = "manifest") -> Preprocessing:
    """A preprocessing block (in_chans, input_size, mean, std) as `Preprocessing`."""
    return _preprocessing(_thaw(p), _Bad(where))


@overload
def parse_calibration(cal: Mapping, num_exits: int, where: str = ...) -> Calibration: ...
@overload
def parse_calibration(cal: None, num_exits: int, where: str = ...) -> None: ...
def parse_calibration(cal: Mapping | None, num_exits: int, where: str = "manifest") -> Calibration | None:
    """A calibration block as `Calibration` (None stays None), its values as the manifest writer
    stores them (numpy numbers as floats, NaN as null)."""
    return _calibration(_as_written(_thaw(cal)) if cal is not None else None, num_exits, _Bad(where))


def parse_units(folder: str | os.PathLike, units: Sequence[Unit | Mapping]) -> tuple[Unit, ...]:
    """Unit entries (the manifest's ``units``) as `Unit`s, files resolved inside ``folder``; a
    `Unit` (what export is writing) is taken as it is."""
    folder = Path(folder)
    bad = _Bad(folder)
    return tuple(u if isinstance(u, Unit) else _unit(folder, _thaw(u), pos, bad) for pos, u in enumerate(units))


# -- the build: each field checked where it becomes a field --------------------------------------
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


# -- parsing --------------------------------------------------------------------------------------
def read_manifest_json(folder: Path) -> dict:
    path = folder / MANIFEST_NAME
    if not folder.exists():
        raise ArtifactError(f"{folder} does not exist: create it with `edgeexit export MODEL.pt --out {folder}`")
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder: an artifact is a NAME.edgeexit folder")
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST_NAME}: it is not an edgeexit artifact "
            "(re-export with `edgeexit export MODEL.pt`)"
        )
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES}): re-export")
    try:
        text = path.read_text()
        _check_depth(path, text)
        manifest = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the model") from None
    except RecursionError:
        raise ArtifactError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels: not a manifest") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not an edgeexit manifest")
    return manifest


def _check_depth(path: Path, text: str) -> None:
    """Bracket depth outside strings, without recursion (a 100,000-deep field never reaches json)."""
    depth = worst = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > worst:
                worst = depth
                if worst > MAX_JSON_DEPTH:
                    raise ArtifactError(f"{path} nests deeper than {MAX_JSON_DEPTH} levels: not a manifest")
        elif ch in "]}":
            depth -= 1


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _freeze(obj):
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _as_written(obj):
    """``obj`` as the manifest writer stores it (`edgeexit.util.strict_json`): a NaN or an infinity
    as null, numpy numbers as floats, so what is checked before writing is what the next load reads."""
    from edgeexit.util import _finite_tree

    return json.loads(json.dumps(_finite_tree(obj, "", [])))


def _thaw(obj):
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_thaw(v) for v in obj]
    return obj


def _int(x) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _build(folder: Path, m: dict) -> Artifact:
    """The typed artifact of the parsed manifest ``m``: every field checked once, where it becomes a
    field. A manifest is data from whoever made the artifact: every file it names must resolve inside
    the folder (symlinks resolved), and the preprocessing and class names must make sense for the
    model, so a tampered or careless manifest fails here rather than giving silent garbage."""
    bad = _Bad(folder / MANIFEST_NAME)
    _check_header(m, bad)
    units = _units(folder, m["units"], bad)
    k = len(units) // 2
    weights = artifact_file(folder, m["weights"]) if "weights" in m else None
    frames = _frames(folder, m.get("calibration_frames"), bad)
    pre = _preprocessing(m["preprocessing"], bad)
    names = _class_names(m["class_names"], units, bad)
    model = _model(m["model"], k, bad, lambda declared: _check_wiring(units, pre, declared, len(names), bad))
    _check_unique(folder, units, weights, frames)
    calibration = _calibration(m.get("calibration"), k, bad)
    return Artifact(
        folder=folder,
        schema_version=m["schema_version"],
        model=model,
        preprocessing=pre,
        class_names=names,
        units=units,
        calibration=calibration,
        calibration_frames=frames,
        weights=weights,
        content_id=content_id(folder, m),
        manifest=_freeze(m),
    )


def _check_header(m: dict, bad: _Bad) -> None:
    missing = [key for key in REQUIRED if key not in m]
    if missing:
        raise ArtifactError(f"{bad.where} lacks {', '.join(missing)}: re-export the model")
    version = m["schema_version"]
    if not _int(version) or version > SCHEMA_VERSION or version < 1:
        raise ArtifactError(
            f"{bad.where} has schema_version {version!r}; this edgeexit reads 1..{SCHEMA_VERSION}: "
            "upgrade edgeexit or re-export with this version"
        )
    if not isinstance(m["model"], dict):
        raise bad("model", "must be an object")


def _units(folder: Path, units, bad: _Bad) -> tuple[Unit, ...]:
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise bad("units", "must be a list of objects")
    names = [u.get("name") for u in units]
    if len(names) < 2 or names != unit_names(len(names) // 2):
        raise ArtifactError(f"{bad.where}: units must be seg_01, head_01, ... in order; found {names}")
    return tuple(_unit(folder, u, pos, bad) for pos, u in enumerate(units))


def _class_names(names, units: tuple[Unit, ...], bad: _Bad) -> tuple[str, ...]:
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise bad("class_names", "must be a non-empty list of strings")
    shape = units[1].outputs[0].shape
    classes = shape[1] if len(shape) > 1 else None  # a head without recorded classes: nothing to compare
    if classes is not None and classes != len(names):
        raise ArtifactError(
            f"{bad.where}: {len(names)} class_names but the model has {classes} classes; re-export the model"
        )
    return tuple(names)


def _preprocessing(p, bad: _Bad) -> Preprocessing:
    import numpy as np

    _check_preprocessing_fields(p, bad)
    mean = np.asarray(p["mean"], dtype=np.float64)
    std = np.asarray(p["std"], dtype=np.float64)
    with np.errstate(all="ignore"):
        m32, s32 = mean.astype(np.float32), std.astype(np.float32)
        # the runtime's table: (v/255 - mean) / std in float32 for the extreme bytes 0 and 255
        ends = (np.array([0.0, 1.0], dtype=np.float32)[None, :] - m32[:, None]) / s32[:, None]
    if not (np.isfinite(m32).all() and np.isfinite(s32).all() and (s32 > 0).all() and np.isfinite(ends).all()):
        raise bad(
            "preprocessing",
            f"mean {p['mean']} / std {p['std']} are not finite in float32 (normalised pixels would be inf or NaN)",
        )
    _check_normalised_range(mean, std, np.abs(ends).max(axis=1), bad)
    order = p.get("channel_order")
    resize = p.get("resize")
    for name, v in (("channel_order", order), ("resize", resize)):
        if v is not None and not isinstance(v, str):
            raise bad(f"preprocessing.{name}", f"must be a string, got {v!r}")
    return Preprocessing(
        in_chans=p["in_chans"],
        input_size=(p["input_size"][0], p["input_size"][1]),
        mean=tuple(float(v) for v in p["mean"]),
        std=tuple(float(v) for v in p["std"]),
        channel_order=order,
        resize=resize,
        extra=_freeze({k: v for k, v in p.items() if k not in _PREPROCESSING_KEYS}),
    )


_PREPROCESSING_KEYS = ("in_chans", "input_size", "mean", "std", "channel_order", "resize")


def _check_preprocessing_fields(p, bad: _Bad) -> None:
    if not isinstance(p, dict):
        raise bad("preprocessing", "is not an object")
    chans = p.get("in_chans")
    if chans not in (1, 3):
        raise bad("preprocessing", f"in_chans must be 1 or 3, got {chans!r}")
    size = p.get("input_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_int(v) and 1 <= v <= 8192 for v in size)):
        raise bad("preprocessing", f"input_size must be [H, W] with 1..8192 pixels each, got {size!r}")
    for key, positive in (("mean", False), ("std", True)):
        v = p.get(key)
        numbers = v if isinstance(v, list) and len(v) == chans and all(_finite(x) for x in v) else None
        if numbers is None or (positive and not all(x > 0 for x in numbers)):
            need = "positive finite numbers" if positive else "finite numbers"
            raise bad("preprocessing", f"{key} must be {chans} {need} (one per channel), got {v!r}")


# Largest |(pixel - mean) / std| for a pixel in [0, 1] that an artifact may imply. Training clamps a
# folder's std at 1e-3, so a real model has seen at most ~1e3; 1e4 leaves room and still refuses a
# std of 1e-30 (finite in float32, normalised pixels of 1e30) that makes every answer meaningless.
MAX_NORMALISED = 1e4


def _check_normalised_range(mean, std, reach, bad) -> None:
    for c, value in enumerate(reach):
        if value > MAX_NORMALISED:
            field_name, given = ("std", std[c]) if std[c] < 1e-3 else ("mean", mean[c])
            raise bad(
                f"preprocessing.{field_name}[{c}]",
                f"({float(given):.3g}) puts normalised pixels at up to {float(value):.3g}, beyond "
                f"±{MAX_NORMALISED:g}: no trained model sees such inputs",
            )


def _tensor(t: dict, where: str, bad) -> TensorSpec:
    shape = t["shape"]
    if not all(d is None or (_int(d) and d >= 1) for d in shape):
        raise bad(where, f"shape must list positive integers or null, got {shape!r}")
    if not shape or shape[0] is not None and not _int(shape[0]):
        raise bad(where, f"shape must start with the batch dimension, got {shape!r}")
    dtype = t.get("dtype", "float32")
    if not isinstance(dtype, str):
        raise bad(where, f"dtype must be a string, got {dtype!r}")
    return TensorSpec(t["name"], tuple(shape), dtype)


def _unit(folder: Path, u: dict, index: int, bad: _Bad) -> Unit:
    name = u["name"]
    kind = "segment" if name.startswith("seg_") else "head"
    if u.get("kind") != kind:
        raise bad(f"unit {name}", f"must have kind '{kind}'")
    for key in ("inputs", "outputs"):
        io = u.get(key)
        if not (isinstance(io, list) and io and all(_is_tensor_entry(t) for t in io)):
            raise bad(f"unit {name} {key}", "must list {name, shape} objects")
    inputs = tuple(_tensor(t, f"units[{name}].inputs[{i}]", bad) for i, t in enumerate(u["inputs"]))
    outputs = tuple(_tensor(t, f"units[{name}].outputs[{i}]", bad) for i, t in enumerate(u["outputs"]))
    files = {"fp32": artifact_file(folder, u.get("onnx"))}
    if not files["fp32"].is_file():
        raise ArtifactError(f"{files['fp32']} is missing: re-export the model")
    for precision, key in FILE_KEYS.items():
        # an onnx_int8 of null names a file and is refused; the other flavours' null is "none"
        if precision != "fp32" and (u.get(key) is not None or key == "onnx_int8" and key in u):
            files[precision] = artifact_file(folder, u[key])
    engines = u.get("engines") or []
    if not isinstance(engines, list):
        raise bad(f"unit {name} engines", "must be a list")
    parsed = []
    for i, e in enumerate(engines):
        parsed.append(_engine(folder, e, f"units[{name}].engines[{i}]", bad))
    stats: dict = {key: v if _finite(v := u.get(key)) else None for key in _UNIT_STATS}
    extra = _freeze({k: v for k, v in u.items() if k not in _UNIT_KEYS})
    return Unit(
        name, u["kind"], index // 2, inputs, outputs, MappingProxyType(files), tuple(parsed), **stats, extra=extra
    )


_UNIT_KEYS = frozenset(("name", "kind", "inputs", "outputs", "engines", *FILE_KEYS.values(), *_UNIT_STATS))


def _engine(folder: Path, e, where: str, bad: _Bad) -> Engine:
    rebuild = "rebuild the engines (edgeexit export --format engine)"
    path = artifact_file(folder, e.get("path") if isinstance(e, dict) else None)
    if e.get("precision") not in PRECISIONS:
        raise bad(f"{where}.precision", f"must be one of {', '.join(PRECISIONS)}, got {e.get('precision')!r}", rebuild)
    for key in ("trt_version", "device_name", "compute_capability"):  # compared and sorted as strings
        if e.get(key) is not None and not isinstance(e[key], str):
            raise bad(f"{where}.{key}", f"must be a string, got {e[key]!r}", rebuild)
    profile = e.get("batch_profile")
    top = profile.get("max") if isinstance(profile, dict) else None
    if profile is not None and not (_int(top) and top >= 1):
        raise bad(f"{where}.batch_profile.max", f"must be a positive batch size, got {_short(top)}", rebuild)
    return Engine(path, e["precision"], _freeze(e), top)


def _is_tensor_entry(t) -> bool:
    return isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)


def _model(model: dict, k: int, bad, wiring: Callable[[_DeclaredModel], int]) -> ModelInfo:
    """The model block, checked; ``wiring`` checks it against the units and returns the class count."""
    config = model.get("config")
    if not isinstance(config, dict):
        raise bad("model.config", f"must be an object (the training config), got {config!r}")
    exits = config.get("exits", model.get("num_exits"))
    for key, value in (("model.num_exits", model.get("num_exits")), ("model.config.exits", config.get("exits"))):
        if value is not None and not (_int(value) and value == k):
            raise bad(key, f"is {value!r} but the artifact has {k} exits (units)")
    classes = config.get("num_classes")
    if classes is not None and not (_int(classes) and classes >= 1):
        raise bad("model.config.num_classes", f"must be a positive integer, got {classes!r}")
    width = config.get("width")
    if width is not None and not (_finite(width) and 0 < width <= 16):
        raise bad("model.config.width", f"must be a number within (0, 16], got {width!r}")
    chans = config.get("in_chans")
    if chans is not None and chans not in (1, 3):
        raise bad("model.config.in_chans", f"must be 1 or 3, got {chans!r}")
    size = config.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(_int(v) and v >= 1 for v in size)):
        raise bad("model.config.input_size", f"must be [H, W], got {size!r}")
    for key in ("stem", "method"):
        v = config.get(key) if key == "stem" else model.get(key)
        if v is not None and not isinstance(v, str):
            raise bad(f"model.{'config.' if key == 'stem' else ''}{key}", f"must be a string, got {v!r}")
    input_size = (size[0], size[1]) if size else None
    return ModelInfo(
        num_exits=exits if _int(exits) else k,
        num_classes=wiring(_DeclaredModel(chans, input_size, classes)),
        config=_freeze(config),
        width=width,
        in_chans=chans,
        input_size=input_size,
        stem=config.get("stem"),
        method=model.get("method"),
        extra=_freeze({key: v for key, v in model.items() if key not in ("config", "method", "num_exits")}),
    )


class _DeclaredModel(NamedTuple):
    """What the training config declares about the model's input and output, where it says so."""

    in_chans: int | None
    input_size: tuple[int, int] | None
    num_classes: int | None


def _check_wiring(units, pre: Preprocessing, model: _DeclaredModel, n_names: int, bad) -> int:  # noqa: C901
    """The chain the runtime relies on, checked on the recorded shapes; returns the class count."""
    image = units[0].inputs
    want = (pre.in_chans, *pre.input_size)
    if len(image) != 1 or len(image[0].shape) != 4 or tuple(image[0].shape[1:]) != want:
        raise bad(
            "preprocessing",
            f"gives (N, {', '.join(map(str, want))}) images but seg_01 takes {[list(t.shape) for t in image]}",
        )
    if model.in_chans is not None and model.in_chans != pre.in_chans:
        raise bad("model.config.in_chans", f"is {model.in_chans} but preprocessing.in_chans is {pre.in_chans}")
    if model.input_size is not None and tuple(model.input_size) != pre.input_size:
        raise bad(
            "model.config.input_size",
            f"is {list(model.input_size)} but preprocessing.input_size is {list(pre.input_size)}",
        )
    classes = None
    for pos in range(len(units) // 2):
        seg, head = units[2 * pos], units[2 * pos + 1]
        if pos > 0:
            prev = units[2 * pos - 2].outputs
            if [(t.name, t.shape) for t in seg.inputs] != [(t.name, t.shape) for t in prev]:
                raise bad(
                    f"units[{seg.name}].inputs",
                    f"{[t.name for t in seg.inputs]} are not {units[2 * pos - 2].name}'s outputs "
                    f"{[t.name for t in prev]} in order",
                )
        last = seg.outputs[-1]
        if [(t.name, t.shape) for t in head.inputs] != [(last.name, last.shape)]:
            raise bad(f"units[{head.name}].inputs", f"must be {seg.name}'s last output {last.name!r} only")
        names = [t.name for t in head.outputs]
        if names != ["logits", "confidence"]:
            raise bad(f"units[{head.name}].outputs", f"must be [logits, confidence], got {names}")
        logits, conf = head.outputs
        if len(logits.shape) != 2 or len(conf.shape) != 1:
            raise bad(f"units[{head.name}].outputs", "must be logits (N, classes) and confidence (N,)")
        c = logits.shape[1]
        if c is None:
            raise bad(f"units[{head.name}].outputs[0].shape", "must give the number of classes")
        if classes is not None and c != classes:
            raise bad(f"units[{head.name}].outputs[0].shape", f"gives {c} classes, earlier heads {classes}")
        classes = c
    if model.num_classes is not None and model.num_classes != classes:
        raise bad("model.config.num_classes", f"is {model.num_classes} but the heads give {classes} classes")
    if classes != n_names:
        raise bad("class_names", f"has {n_names} names but the model has {classes} classes")
    return classes


def _frames(folder: Path, info, bad: _Bad) -> CalibrationFrames | None:
    if info is None:
        return None
    if not isinstance(info, dict):
        raise bad("calibration_frames", "must be an object")
    path = artifact_file(folder, info.get("path"))
    sha = info.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64):
        raise bad("calibration_frames.sha256", f"must be a sha256 hex digest, got {sha!r}")
    count = info.get("count")
    if count is not None and not (_int(count) and count >= 0):
        raise bad("calibration_frames.count", f"must be a count, got {count!r}")
    shape = info.get("shape")
    if shape is not None and not (isinstance(shape, list) and all(_int(v) and v >= 1 for v in shape)):
        raise bad("calibration_frames.shape", f"must list positive integers, got {shape!r}")
    extra = {k: v for k, v in info.items() if k not in ("path", "sha256", "count", "shape")}
    return CalibrationFrames(path, sha, count, tuple(shape) if shape else None, _freeze(extra))


def _check_unique(folder: Path, units, weights, frames) -> None:
    """Every file belongs to one unit (or to the weights, or the frames); a unit may name one file for
    several precisions (an INT8 export keeps the heads FP32: ``onnx_int8`` is ``onnx``)."""
    seen: dict[Path, tuple[str, str]] = {}
    named = [(u.name, f"units[{u.name}].files.{p}", path) for u in units for p, path in u.files.items()]
    named += [(u.name, f"units[{u.name}].engines[{i}]", e.path) for u in units for i, e in enumerate(u.engines)]
    if weights is not None:
        named.append(("weights", "weights", weights))
    if frames is not None:
        named.append(("frames", "calibration_frames.path", frames.path))
    for owner, what, path in named:
        key = path.resolve()
        if key in seen and seen[key][0] != owner:
            raise ArtifactError(
                f"{folder / MANIFEST_NAME}: {what} names {path.name}, which {seen[key][1]} names too: "
                "every unit has its own file; re-export the model"
            )
        seen.setdefault(key, (owner, what))


def _calibration(cal, k: int, bad: _Bad) -> Calibration | None:
    """The calibration block, typed; a block the runtime would trip over later is refused now."""
    if cal is None:
        return None
    fix = "run `edgeexit calibrate` again"
    policy = _check_plans(cal, k, bad, fix)
    backend = cal.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise bad("calibration.backend", f"must be a string, got {backend!r}", fix)
    ladder = cal.get("ladder")
    rungs = tuple(_rung(r) for r in ladder or [])
    latency = cal.get("latency")
    if latency is not None and not isinstance(latency, dict):
        raise bad("calibration.latency", f"must be an object, got {type(latency).__name__}", fix)
    table = (latency or {}).get("units")
    p95 = None
    if table is not None:
        if not (
            isinstance(table, dict)
            and all(isinstance(table.get(n), dict) and _finite(table[n].get("p95_ms")) for n in unit_names(k))
        ):
            raise bad("calibration", "latency.units must give p95_ms for every unit", fix)
        p95 = MappingProxyType({n: float(table[n]["p95_ms"]) for n in unit_names(k)})
    device = cal.get("device")
    if device is not None and not isinstance(device, dict):
        raise bad("calibration.device", f"must be an object, got {type(device).__name__}", fix)
    _check_calibration_numbers(cal, bad, fix)
    th = cal.get("thresholds")
    predicted = cal.get("predicted")
    drift = cal.get("drift_reference")
    if drift is not None:
        from edgeexit.runtime.monitor import parse_reference

        try:
            parse_reference(drift, k)
        except ValueError as e:
            raise bad("calibration.drift_reference", f"is malformed ({e})", fix) from None
    measured = cal.get("measured") or {}
    metric = "p95" if cal.get("metric") == "p95" else "mean"
    return Calibration(
        thresholds=tuple(float(t) for t in th) if th is not None else None,
        policy=policy,
        backend=backend,
        ladder=rungs,
        latency_p95_ms=p95,
        device=_freeze(device) if device is not None else None,
        predicted=_freeze(predicted) if isinstance(predicted, dict) else None,
        drift_reference=_freeze(drift) if drift is not None else None,
        metric=metric,
        predicted_ms=_positive_or_none((predicted or {}).get("mean_ms")),
        predicted_accuracy=float(acc) if _finite(acc := (predicted or {}).get("accuracy")) else 0.0,
        full_model_ms=_positive_or_none((cal.get("full_model") or {}).get("predicted_ms")),
        measured=_measured_latency(measured),
        reference=_measured_latency(measured.get("reference")),
        exit_ms=_exit_ms(measured.get("exit_ms")),
        frame=_frame_cost(cal.get("frame"), metric, bad, fix),
        block=_freeze(cal),
    )


def _positive_or_none(x) -> float | None:
    return float(x) if _finite(x) and x > 0 else None


def _measured_latency(m) -> MeasuredLatency | None:
    """A measured latency block; figures that are not positive finite numbers read as not measured
    (a manifest is an input: a NaN or a string never reaches the controller)."""
    if not isinstance(m, dict):
        return None
    frames, block = m.get("frames"), m.get("block_frames")
    return MeasuredLatency(
        mean_ms=_positive_or_none(m.get("mean_ms")),
        p95_ms=_positive_or_none(m.get("p95_ms")),
        frames=frames if _int(frames) and frames > 0 else None,
        block_sd=_positive_or_none(m.get("block_sd")),
        block_frames=block if _int(block) and block > 0 else None,
    )


def _exit_ms(values) -> tuple[float | None, ...] | None:
    if not (isinstance(values, list) and values):
        return None
    return tuple(_positive_or_none(v) for v in values)


def _rung(r: dict) -> LadderRung:
    measured = _measured_latency(r.get("measured"))
    if measured is not None and not measured.complete:
        measured = None  # a rung is measured with both figures, or it is a prediction
    return LadderRung(
        tuple(float(t) for t in r["thresholds"]),
        float(r["predicted_ms"]),
        float(r["predicted_accuracy"]),
        measured,
        _exit_ms(r.get("exit_ms")) if measured is not None else None,
    )


def _frame_cost(frame, metric: str, bad: _Bad, fix: str) -> FrameCost | None:
    """calibrate --frame-size's record: the frame size and its measured preprocessing (what `run
    --budget` takes from the budget before the cascade: a number of ms >= 0 when the budget covers the
    frame)."""
    if not isinstance(frame, dict):
        return None
    covers = frame.get("covers") == "frame"
    pre = frame.get("preprocess")
    pre = pre if isinstance(pre, dict) else {}
    key = "p95_ms" if metric == "p95" else "mean_ms"
    if covers and not (_finite(pre.get(key)) and pre[key] >= 0):
        raise bad(
            f"calibration.frame.preprocess.{key}", f"must be a number of ms >= 0, got {_short(pre.get(key))}", fix
        )
    size = frame.get("size")
    size = tuple(size) if isinstance(size, list) and all(_int(v) and v > 0 for v in size) else ()
    mean, p95 = (float(v) if _finite(v := pre.get(k)) and v >= 0 else None for k in ("mean_ms", "p95_ms"))
    return FrameCost(size, covers, MeasuredLatency(mean, p95) if covers else None)


def _check_plans(cal, k: int, bad: _Bad, fix: str) -> str:
    """The calibrated thresholds, the ladder of plans and the policy; returns the policy."""
    from edgeexit.runtime.policies import POLICIES

    if not isinstance(cal, dict):
        raise bad("calibration", "is not an object", fix)
    th = cal.get("thresholds")
    if th is not None and not (isinstance(th, list) and len(th) == k and all(_finite(t) for t in th)):
        raise bad("calibration", f"thresholds must be {k} finite numbers, got {th!r}", fix)
    ladder = cal.get("ladder")
    if ladder is not None and not (isinstance(ladder, list) and all(_is_rung(r, k) for r in ladder)):
        raise bad(
            "calibration",
            f"ladder must list {{thresholds ({k} numbers), predicted_ms, predicted_accuracy}} objects",
            fix,
        )
    policy = cal.get("policy", "max_softmax")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise bad("calibration", f"policy {cal.get('policy')!r} is not one of {', '.join(POLICIES)}", fix)
    return policy


def _is_rung(r, k: int) -> bool:
    return (
        isinstance(r, dict)
        and isinstance(r.get("thresholds"), list)
        and len(r["thresholds"]) == k
        and all(_finite(t) for t in r["thresholds"])
        and _finite(r.get("predicted_ms"))
        and _finite(r.get("predicted_accuracy"))
    )


_MS_FIELDS = ("mean_ms", "p95_ms", "latency_ms")


def _object(cal: dict, name: str, bad, fix: str) -> dict:
    value = cal.get(name.rsplit(".", 1)[-1])
    if value is not None and not isinstance(value, dict):
        raise bad(f"calibration.{name}", f"must be an object, got {type(value).__name__} {_short(value)}", fix)
    return value or {}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _check_numbers(block: dict, name: str, bad, fix: str) -> None:
    """Latencies in ``block`` positive finite numbers, an accuracy within [0, 1] (None: not recorded)."""
    for key in (*_MS_FIELDS, "accuracy"):
        v = block.get(key)
        if v is None:
            continue
        ok = type(v) in (int, float) and math.isfinite(v) and (0 <= v <= 1 if key == "accuracy" else v > 0)
        if not ok:
            want = "a number within [0, 1]" if key == "accuracy" else "a positive finite number of milliseconds"
            raise bad(f"calibration.{name}.{key}", f"must be {want}, got {_short(v)}", fix)


def _check_calibration_numbers(cal: dict, bad, fix: str) -> None:
    """The calibration block's predicted and measured figures, typed all the way: what the budget
    controller, `run --budget 50%` and doctor read from them is a number or absent, never a string
    or a list that fails later as a raw exception."""
    for name in ("predicted", "measured"):
        _check_numbers(_object(cal, name, bad, fix), name, bad, fix)
    exit_ms = _object(cal, "measured", bad, fix).get("exit_ms")
    if exit_ms is not None and not (isinstance(exit_ms, list) and all(v is None or _finite(v) for v in exit_ms)):
        raise bad("calibration.measured.exit_ms", f"must list a number (or null) per exit, got {_short(exit_ms)}", fix)
    full = _object(cal, "full_model", bad, fix)
    predicted_ms = full.get("predicted_ms")
    if predicted_ms is not None and not (_finite(predicted_ms) and predicted_ms > 0):
        got = _short(predicted_ms)
        raise bad("calibration.full_model.predicted_ms", f"must be a positive finite number, got {got}", fix)
    _check_numbers(_object(full, "full_model.measured", bad, fix), "full_model.measured", bad, fix)


def content_id(folder: Path, m: dict) -> str:
    """What identifies one export: its unit files (name, size, modification time) and the manifest's
    export fields; calibration is not part of it (calibrating does not change the export)."""
    h = hashlib.sha256()
    ident = {key: m.get(key) for key in ("created", "edgeexit_version", "export", "parity", "weights")}
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    for u in m["units"]:
        for key in ("onnx", "onnx_int8"):
            name = u.get(key)
            if isinstance(name, str):
                try:
                    st = (folder / name).stat()
                    h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
                except OSError:
                    h.update(f"{name}:missing;".encode())
    return h.hexdigest()[:16]


def check_weights_config(expected_config: Mapping, blob, where: Path) -> None:
    """``weights.pt`` (the torch backend's) must hold the model the manifest describes
    (``expected_config``: `ModelInfo.config`): a config asking for width 20 while the manifest says
    0.25 would build a model hundreds of times larger."""
    config = blob.get("config") if isinstance(blob, dict) else None
    if not isinstance(config, dict) or not isinstance(blob.get("state_dict"), dict):
        raise ArtifactError(f"{where} is not an edgeexit weights file (config and state_dict); re-export the model")
    expected = _thaw(expected_config)
    diff = [key for key in sorted(set(expected) | set(config), key=str) if expected.get(key) != config.get(key)]
    if diff:
        key = diff[0]
        raise ArtifactError(
            f"{where}: config {key} is {config.get(key)!r} but the manifest's model.config.{key} is "
            f"{expected.get(key)!r}; re-export the model"
        )
