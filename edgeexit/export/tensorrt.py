"""TensorRT engine building: one raw plan per unit, one timing cache shared by all units.

Written against TensorRT's Python API, 8.6 to 11.x (name-based tensors, optimisation profiles,
``build_serialized_network``). On >= 10 networks are built strongly typed (the flag's value is
read from the enum: 1 on 10.x, 0 on 11) and precision comes from the ONNX file: ``onnx`` (fp32),
``onnx_fp16`` (--half), ``onnx_int8_trt`` (--int8: symmetric INT8 Q/DQ, the rest FP32). On 8.6
(no strong typing) segments are built from the FP32 file (INT8: the Q/DQ file) with the FP16 / INT8
builder flags, and heads without any: their softmax confidence stays FP32, as on >= 10 where the
head's file is FP32 and strong typing keeps it so (thresholds live near 1.0, where FP16's spacing
is 2^-11). `build_artifact_engines` is `edgeexit engines`: plans built on the device from the
artifact's own ONNX flavours, gated, then published into the artifact; it imports no torch, onnx
or dataset code.
This layer is kept thin: everything that does not need TensorRT
(profile shapes, manifest entries, compatibility checks) lives in plain functions that are tested
without it. Plans are written raw (no header), so trtexec and DeepStream read them too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from edgeexit.errors import UserError
from edgeexit.runtime.artifact import FILE_KEYS, Engine, Unit, parse_units
from edgeexit.runtime.backends.tensorrt import check_tensorrt_runs, import_tensorrt, trt_major

log = logging.getLogger(__name__)


def profile_shapes(inputs: list[dict], max_batch: int, opt_batch: int = 1) -> dict[str, list[list[int]]]:
    """min/opt/max shapes per input: batch 1 .. max_batch, tuned for ``opt_batch`` (1: the camera
    path runs one frame at a time; `--batch-opt` for batch work)."""
    if max_batch < 1:
        raise UserError(f"--batch must be at least 1, got {max_batch}")
    opt = opt_batch
    if not 1 <= opt <= max_batch:
        raise UserError(f"opt batch {opt} is outside 1..{max_batch}")
    shapes = {}
    for i in inputs:
        rest = [int(d) for d in i["shape"][1:]]
        shapes[i["name"]] = [[1, *rest], [opt, *rest], [max_batch, *rest]]
    return shapes


def engine_filename(unit_name: str, precision: str) -> str:
    return f"{unit_name}.{precision}.engine"


def gpu_fingerprint() -> dict:
    """Name and compute capability of GPU 0, through cuda-python (no torch needed)."""
    from edgeexit.runtime.backends.cuda import cuda_device_info

    return cuda_device_info()


def build_engines(
    folder: Path,
    units: Sequence[Unit | Mapping],
    *,
    half: bool,
    max_batch: int,
    workspace_gib: float,
    opt_batch: int = 1,
    timing_cache: Path | None = None,
    int8: bool = False,
    out: Path | None = None,
) -> list[Unit]:
    """Build ``<out>/<unit>.<precision>.engine`` for every unit (a `Unit` or its manifest entry) from
    its ONNX file in ``folder``; returns the units with that `Engine` added to their ``engines``
    (``out`` defaults to ``folder``, and must be inside it).

    One timing cache serves every unit; it starts from ``timing_cache`` (a previous export's, e.g.
    the artifact being replaced) when given, and is written to ``out/timing.cache`` for the next."""
    trt = import_tensorrt()
    device = gpu_fingerprint()
    check_tensorrt_runs(trt)  # a wheel for another CUDA major: a named fix, not a pybind TypeError
    out = folder if out is None else out
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    precision = "int8" if int8 else ("fp16" if half else "fp32")
    typed = trt_major(trt.__version__) >= 10
    parsed, source = _sources(folder, units, precision, typed)
    cache_bytes = _seed_cache(timing_cache, trt.__version__, device)
    built = []
    for unit in parsed:
        network, parser = _parse(trt, builder, logger, unit.file(source), typed)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if not typed and unit.kind != "head":  # 8.6: weak typing, precision from the builder flags
            if half or int8:
                config.set_flag(trt.BuilderFlag.FP16)  # layers outside Q/DQ pairs may run in FP16
            if int8:
                config.set_flag(trt.BuilderFlag.INT8)
        cache_bytes = _attach_timing_cache(config, cache_bytes)
        profile = builder.create_optimization_profile()
        shapes = profile_shapes([t.to_json() for t in unit.inputs], max_batch, opt_batch)
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build {unit.name}")
        path = out / engine_filename(unit.name, precision)
        path.write_bytes(bytes(plan))
        cache_bytes = bytes(config.get_timing_cache().serialize())
        entry = engine_entry(path.relative_to(folder).as_posix(), precision, trt.__version__, device, shapes)
        engine = Engine(path, precision, entry, entry["batch_profile"]["max"])
        built.append(replace(unit, engines=(*unit.engines, engine)))
    (out / "timing.cache").write_bytes(cache_bytes)
    (out / CACHE_META).write_text(
        json.dumps({"trt_version": trt.__version__, "compute_capability": device["compute_capability"]})
    )
    return built


_FILE_PRECISION = {key: precision for precision, key in FILE_KEYS.items()}  # onnx_fp16 -> fp16


def _sources(
    folder: Path, units: Sequence[Unit | Mapping], precision: str, typed: bool
) -> tuple[tuple[Unit, ...], str]:
    """The units as `Unit`s, and which of their files a ``precision`` engine is built from (every
    unit must have it)."""
    key = source_key(precision, typed)
    parsed = parse_units(folder, units)
    missing = [u.name for u in parsed if _FILE_PRECISION[key] not in u.files]
    if missing:
        raise UserError(f"{', '.join(missing)} have no {key} file for a {precision} engine")
    return parsed, _FILE_PRECISION[key]


def _attach_timing_cache(config, cache_bytes: bytes) -> bytes:
    """Give ``config`` the shared timing cache; returns the bytes it started from (empty after a refusal)."""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a timing cache from another TensorRT or GPU; rebuilding from scratch is the recovery path
        log.warning("TensorRT refused the previous timing cache (another TensorRT or GPU?): starting empty")
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError("TensorRT refused an empty timing cache")
        return b""
    return cache_bytes


CACHE_META = "timing.cache.json"


def source_key(precision: str, typed: bool) -> str:
    """The unit file an engine of ``precision`` is built from (strongly typed: the file's types are
    the engine's; 8.6: the FP32 file plus builder flags, except INT8, which needs the TensorRT Q/DQ)."""
    if precision == "int8":
        return "onnx_int8_trt"
    if precision == "fp16" and typed:
        return "onnx_fp16"
    return "onnx"


def _seed_cache(timing_cache: Path | None, version: str, device: dict) -> bytes:
    """The previous build's timing cache, only when it was built by this TensorRT on this GPU
    architecture (TensorRT refuses any other; an empty cache is the recovery path)."""
    if timing_cache is None or not timing_cache.is_file():
        return b""
    try:
        meta = json.loads((timing_cache.parent / CACHE_META).read_text())
    except (OSError, ValueError):
        return b""
    if meta.get("trt_version") != version or meta.get("compute_capability") != device["compute_capability"]:
        return b""
    return timing_cache.read_bytes()


def network_flags(trt, typed: bool) -> int:
    """EXPLICIT_BATCH below 10 (implied from 10 on, gone in 11); STRONGLY_TYPED from 10 on, its bit
    read from the enum (1 on 10.x, 0 on 11.x: never hard-coded)."""
    if typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse(trt, builder, logger, onnx_path: Path, typed: bool):
    flags = network_flags(trt, typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    return network, parser


def engine_entry(path: str, precision: str, trt_version: str, device: dict, shapes: dict) -> dict:
    """The manifest's record of one plan (docs/contract.md §5)."""
    return {
        "path": path,
        "precision": precision,
        "trt_version": trt_version,
        "device_name": device["name"],
        "compute_capability": device["compute_capability"],
        "batch_profile": {
            "min": 1,
            "opt": next(iter(shapes.values()))[1][0] if shapes else 1,
            "max": next(iter(shapes.values()))[2][0] if shapes else 1,
        },
    }


ENGINE_GATE_FRAMES = 5000  # at most this many stored calibration frames judge the engines


def engine_gate(
    folder: Path, units: Sequence[Unit | Mapping], images, labels, precision: str, max_frames: int = ENGINE_GATE_FRAMES
) -> dict:
    """The built engines RUN before they are published: every exit of the TensorRT backend against
    the FP32 ONNX units in ONNX Runtime (CPU), with `edgeexit.runtime.compare.compare_exits` (max
    |Δconfidence| and prediction agreement with a binomial bound, tolerances per precision), once
    with CUDA graphs off and once with them on (the path calibrate and run use). ``images``:
    preprocessed float32 (N, C, H, W), up to ``max_frames`` of them are used."""
    from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgeexit.runtime.backends.tensorrt import TensorRTBackend
    from edgeexit.runtime.compare import TOLERANCES, compare_exits

    images, labels = images[:max_frames], None if labels is None else labels[:max_frames]
    parsed = parse_units(folder, units)
    k = len(units) // 2
    runs = {}
    reference = OnnxRuntimeBackend.for_units(folder, parsed, "fp32")
    try:
        for graphs in (False, True):
            backend = TensorRTBackend.for_units(folder, parsed, precision=precision, cuda_graphs=graphs)
            try:
                runs["graphs" if graphs else "plain"] = compare_exits(
                    reference, backend, images, labels, num_exits=k, tolerance=precision
                )
            finally:
                backend.close()
    finally:
        reference.close()
    failures = [f"{name}: {line}" for name, c in runs.items() for line in c.failures]
    return {
        "precision": precision,
        "frames": int(len(images)),
        "reference": "onnxruntime-cpu fp32",
        "tolerance": TOLERANCES[precision].to_json(),
        "runs": {name: c.to_json() for name, c in runs.items()},
        "max_abs_confidence_diff": max(c.max_abs_confidence_diff for c in runs.values()),
        "min_prediction_agreement": min(c.min_prediction_agreement for c in runs.values()),
        "failures": failures,
        "passed": not failures,
    }


def gate_summary(gate: dict) -> str:
    """One line: what the gate measured, on how many frames, and against which tolerance."""
    tol = gate["tolerance"]
    return (
        f"engines vs ONNX Runtime FP32 on {gate['frames']} stored frames, CUDA graphs off and on: max "
        f"|Δconfidence| {gate['max_abs_confidence_diff']:.2e} (≤ {tol['max_abs_confidence']:g}), predictions agree "
        f"≥ {gate['min_prediction_agreement']:.4f} (disagreement ≤ {100 * tol['max_disagreement']:g} % at 95 %)"
    )


def build_artifact_engines(
    artifact,
    *,
    half: bool = False,
    int8: bool = False,
    max_batch: int = 64,
    opt_batch: int = 1,
    workspace_gib: float = 2.0,
    force: bool = False,
    console=None,
) -> dict:
    """`edgeexit engines ARTIFACT`: build this device's TensorRT plans from the artifact's own ONNX
    flavours (``onnx``, ``onnx_fp16`` with ``half``, ``onnx_int8_trt`` with ``int8``), gate them on
    the stored calibration frames (`engine_gate`), then publish them into the artifact: plans are
    built in a temporary folder inside it and renamed into place, and the manifest is rewritten
    atomically last, so an interrupted or failed build leaves the artifact as it was. Needs numpy,
    onnxruntime, TensorRT and cuda-python only. Returns the gate's report."""
    import shutil
    import tempfile
    import time

    from edgeexit.runtime.artifact import Artifact

    _check_options(half, int8, max_batch, opt_batch, workspace_gib)
    precision = "int8" if int8 else ("fp16" if half else "fp32")
    art = Artifact.load(artifact)
    folder = art.folder
    trt = import_tensorrt()
    device = gpu_fingerprint()
    units = art.units
    key = source_key(precision, trt_major(trt.__version__) >= 10)
    _require_flavour(units, key, precision)
    if not force:
        _refuse_current(folder, units, precision, trt.__version__, device)
    images, labels = _gate_frames(art)
    tmp = Path(tempfile.mkdtemp(prefix=".engines-", suffix=".partial", dir=folder))
    try:
        t0 = time.perf_counter()
        bare = [replace(u, engines=()) for u in units]
        new_units = build_engines(folder, bare, half=half, int8=int8, max_batch=max_batch, opt_batch=opt_batch,
                      workspace_gib=workspace_gib, timing_cache=_artifact_timing_cache(folder), out=tmp)  # fmt: skip
        if console is not None:
            console.print(
                f"  {len(units)} TensorRT {trt.__version__} plans ({precision}, batch 1..{max_batch}) for "
                f"{device['name']} (sm {device['compute_capability']}) [dim]({time.perf_counter() - t0:.1f}s)[/]"
            )
        t0 = time.perf_counter()
        gate = engine_gate(folder, new_units, images, labels, precision)
        if console is not None:
            console.print(f"  {gate_summary(gate)} [dim]({time.perf_counter() - t0:.1f}s)[/]")
        if not gate["passed"]:
            more = len(gate["failures"]) - 1
            raise RuntimeError(f"TensorRT {precision} engines differ from FP32 beyond tolerance: {gate['failures'][0]}"
                               f"{f' (and {more} more)' if more else ''}: not published")  # fmt: skip
        _publish(art, tmp, new_units, precision, gate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return gate


def _gate_frames(art) -> tuple:
    """The stored calibration frames (up to ENGINE_GATE_FRAMES) as the network sees them, and labels."""
    from edgeexit.runtime.manifest import load_calibration_frames
    from edgeexit.runtime.preprocessing import Preprocessor

    frames = load_calibration_frames(art)
    if frames is None or len(frames["frames"]) == 0:
        raise UserError(
            f"{art.folder} stores no calibration frames to check the engines on: re-export it with --calib-images N"
        )
    images = Preprocessor(art.preprocessing).batch(frames["frames"][:ENGINE_GATE_FRAMES])
    return images, frames["labels"][:ENGINE_GATE_FRAMES]


def _require_flavour(units: Sequence[Unit], key: str, precision: str) -> None:
    """Every unit has the ONNX flavour a ``precision`` engine is built from, or a one-line refusal."""
    missing = [u.name for u in units if _FILE_PRECISION[key] not in u.files]
    if missing:
        flag = {"fp16": "--half", "int8": "--int8"}.get(precision, "")
        raise UserError(
            f"the artifact has no {key} files for {precision} engines ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): export it with `edgeexit export MODEL.pt {flag}` on a desktop "
            "(it writes every ONNX flavour; no TensorRT needed there), then copy it here"
        )


def _publish(art, tmp: Path, new_units: list[Unit], precision: str, gate: dict) -> None:
    """Gated plans renamed from ``tmp`` into the artifact ``art``, then the manifest rewritten
    (atomically, last): other precisions' engines are kept."""
    import os

    from edgeexit.runtime.manifest import write_manifest

    folder = art.folder
    engines = []
    for new in new_units:
        (engine,) = new.engines
        final = folder / engine.path.name
        os.replace(engine.path, final)
        engines.append(replace(engine, path=final, info={**engine.info, "path": final.name}))
    for name in ("timing.cache", CACHE_META):
        os.replace(tmp / name, folder / name)
    write_manifest(art, art.with_engines(precision, engines, gate).to_json())


def _check_options(half: bool, int8: bool, max_batch: int, opt_batch: int, workspace_gib: float) -> None:
    if half and int8:
        raise UserError("--half and --int8 build one precision each: run `edgeexit engines` once per precision")
    if not 1 <= max_batch <= 4096:
        raise UserError(f"--max-batch must be within 1..4096, got {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"--batch-opt must be within 1..--max-batch ({max_batch}), got {opt_batch}")
    if not (workspace_gib > 0 and workspace_gib < float("inf")):
        raise UserError(f"--workspace must be a positive number of GiB, got {workspace_gib}")


def _refuse_current(folder: Path, units: Sequence[Unit], precision: str, version: str, device: dict) -> None:
    """Engines of ``precision`` that already run here are rebuilt only with --force; stale ones
    (another TensorRT or GPU) are what this command is for."""
    from edgeexit.runtime.backends.tensorrt import check_engine_compatible

    current = [e.info for u in units for e in u.engines if e.precision == precision]
    if not current:
        return
    try:
        for e in current:
            check_engine_compatible(e, version, device)
    except UserError:
        return
    raise UserError(f"{folder} already has {precision} engines built for this TensorRT and GPU: pass --force")


def _artifact_timing_cache(folder: Path) -> Path | None:
    path = folder / "timing.cache"
    return path if path.is_file() and not path.is_symlink() else None


def trt_int8_parity(folder: Path, units: Sequence[Unit], images, labels, tolerance: float) -> dict:
    """The TensorRT INT8 flavour (``onnx_int8_trt``: symmetric S8S8 Q/DQ, what `engines --int8`
    builds from) run by ONNX Runtime on the CPU against the FP32 units, exit by exit: an artifact
    never ships a TensorRT flavour nobody ran. Judged under the rule the ONNX Runtime INT8 units
    pass (each exit's accuracy within ``tolerance`` of FP32: ``passed``), with the engine gate's
    int8 agreement verdict recorded beside it (``agreement_passed``): a briefly trained, unsure
    model flips predictions without losing accuracy. ONNX Runtime is not TensorRT (other kernels,
    other fusions): on the device the engine gate compares the built engines again."""
    from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgeexit.runtime.compare import MIN_FRAMES, Tolerance, compare_exits

    if len(images) < MIN_FRAMES:
        why = f"{len(images)} held-out images, fewer than the {MIN_FRAMES} a comparison needs"
        return {"checked": False, "why": why}
    parsed = parse_units(folder, units)
    tol = Tolerance(max_accuracy_drop=tolerance)
    reference = OnnxRuntimeBackend.for_units(folder, parsed, "fp32")
    try:
        candidate = OnnxRuntimeBackend.for_units(folder, parsed, "int8_trt")
        try:
            result = compare_exits(reference, candidate, images, labels, num_exits=len(units) // 2, tolerance=tol)
        finally:
            candidate.close()
    finally:
        reference.close()
    agreement = result.judged("int8")
    return {
        "checked": True,
        "flavour": "onnx_int8_trt",
        "runtime": "onnxruntime-cpu",
        **result.to_json(),
        "agreement_passed": agreement.passed,
        "agreement_failures": list(agreement.failures),
    }
