"""TensorRT engine building: one raw plan per unit, one timing cache shared by all units.

Written against TensorRT's Python API, 8.6 to 11.x (name-based tensors, optimisation profiles,
``build_serialized_network``). On >= 10 networks are built strongly typed (the flag's value is
read from the enum: 1 on 10.x, 0 on 11) and precision comes from the ONNX file: ``onnx`` (fp32),
``onnx_fp16`` (--half), ``onnx_int8_trt`` (--int8: symmetric INT8 Q/DQ, the rest FP32). On 8.6
(no strong typing) the FP32 file is built with the FP16 / INT8 builder flags.
This layer is kept thin: everything that does not need TensorRT
(profile shapes, manifest entries, compatibility checks) lives in plain functions that are tested
without it. Plans are written raw (no header), so trtexec and DeepStream read them too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgeexit.errors import UserError
from edgeexit.runtime.backends.tensorrt import import_tensorrt, trt_major

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
    units: list[dict],
    *,
    half: bool,
    max_batch: int,
    workspace_gib: float,
    opt_batch: int = 1,
    timing_cache: Path | None = None,
    int8: bool = False,
) -> None:
    """Build ``folder/<unit>.<precision>.engine`` for every unit and add its entry to ``unit['engines']``.

    One timing cache serves every unit; it starts from ``timing_cache`` (a previous export's, e.g.
    the artifact being replaced) when given, and is written to ``folder/timing.cache`` for the next."""
    trt = import_tensorrt()
    device = gpu_fingerprint()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    precision = "int8" if int8 else ("fp16" if half else "fp32")
    typed = trt_major(trt.__version__) >= 10
    key = source_key(precision, typed)
    missing = [u["name"] for u in units if key not in u]
    if missing:
        raise UserError(f"{', '.join(missing)} have no {key} file for a {precision} engine")
    cache_bytes = _seed_cache(timing_cache, trt.__version__, device)
    for unit in units:
        network, parser = _parse(trt, builder, logger, folder / unit[key], typed)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if not typed:  # 8.6: weak typing, precision from the builder flags
            if half or int8:
                config.set_flag(trt.BuilderFlag.FP16)  # layers outside Q/DQ pairs may run in FP16
            if int8:
                config.set_flag(trt.BuilderFlag.INT8)
        cache = config.create_timing_cache(cache_bytes)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            # D3: a cache from another TensorRT or GPU; rebuilding from scratch is the recovery path
            log.warning("TensorRT refused the previous timing cache (another TensorRT or GPU?): starting empty")
            cache_bytes = b""
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                raise RuntimeError("TensorRT refused an empty timing cache")
        profile = builder.create_optimization_profile()
        shapes = profile_shapes(unit["inputs"], max_batch, opt_batch)
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build {unit['name']}")
        path = folder / engine_filename(unit["name"], precision)
        path.write_bytes(bytes(plan))
        cache_bytes = bytes(config.get_timing_cache().serialize())
        unit["engines"].append(engine_entry(path.name, precision, trt.__version__, device, shapes))
    (folder / "timing.cache").write_bytes(cache_bytes)
    (folder / CACHE_META).write_text(
        json.dumps({"trt_version": trt.__version__, "compute_capability": device["compute_capability"]})
    )


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
    """The previous export's timing cache, only when it was built by this TensorRT on this GPU
    architecture (D3: TensorRT refuses any other, and re-export is the documented recovery path)."""
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


def engine_parity(folder: Path, units: list[dict], images, labels, precision: str, tolerance: float) -> dict:
    """D12: the built engines RUN before they are published: every exit's logits from the
    TensorRT backend vs the FP32 ONNX units in ONNX Runtime (CPU) on held-out images: max |Δlogit|,
    prediction agreement and accuracy drop per exit; ``passed`` when no exit's accuracy drops by
    more than ``tolerance`` (a fraction)."""
    import numpy as np

    from edgeexit.runtime.artifact import parse_units
    from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgeexit.runtime.backends.tensorrt import TensorRTBackend

    parsed = parse_units(folder, units)
    backend = TensorRTBackend.for_units(folder, parsed, precision=precision, cuda_graphs=False)
    try:  # the FP32 units on the CPU, through the runtime's own runner (no sessions of our own)
        reference = OnnxRuntimeBackend.for_units(folder, parsed, "fp32")
    except BaseException:
        backend.close()
        raise
    k = len(units) // 2
    ours, ref = [[] for _ in range(k)], [[] for _ in range(k)]
    step = backend.max_batch
    try:
        for s in range(0, len(images), step):
            x = np.ascontiguousarray(images[s : s + step], dtype=np.float32)
            state, host = backend.from_host(x), reference.from_host(x)
            for pos in range(k):
                state = backend.run_segment(pos, state)
                ours[pos].append(backend.run_head(pos, state[-1]).logits())
                host = reference.run_segment(pos, host)
                ref[pos].append(reference.run_head(pos, host[-1]).logits())
    finally:
        backend.close()
        reference.close()
    exits = []
    for pos in range(k):
        a, b = np.concatenate(ref[pos]), np.concatenate(ours[pos])
        drop = float((a.argmax(1) == labels).mean() - (b.argmax(1) == labels).mean())
        exits.append(
            {
                "exit": pos + 1,
                "max_abs_logit_diff": float(np.abs(a - b).max()),
                "prediction_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                "accuracy_drop_pt": 100 * drop,
            }
        )
    worst = max(e["accuracy_drop_pt"] for e in exits)
    return {
        "precision": precision,
        "images": int(len(images)),
        "reference": "onnxruntime-cpu fp32",
        "exits": exits,
        "max_accuracy_drop_pt": worst,
        "tolerance_pt": 100 * tolerance,
        "passed": worst <= 100 * tolerance + 1e-9,
    }
