"""INT8 units: static Q/DQ quantization of every unit, calibrated on held-out images.

Q/DQ ONNX is what ONNX Runtime's INT8 kernels and TensorRT's explicit quantization both consume.
Weights: per output channel, symmetric INT8. Activations: INT8, ranges calibrated by the chosen
method on the real inputs each unit sees (held-out images pushed through the FP32 units before it).
Segments are quantized, all but convs reading <= 4 channels (see ``narrow_input_convs``); exit
heads stay FP32 (measured faster on the CPU, and the confidence keeps its full resolution near the
thresholds).

Parity for INT8 is accuracy, not 1e-3: the chained INT8 cascade's per-exit accuracy (and agreement
with FP32) on held-out images, failing the export beyond a stated tolerance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeexit.runtime.artifact import Unit, parse_units
from edgeexit.runtime.chain import walk
from edgeexit.runtime.plan import segment_name

METHODS = ("minmax", "entropy", "percentile")


def _chain_inputs(folder: Path, units: list[Unit], images: np.ndarray) -> dict[str, list]:
    """Every segment's inputs (name -> array feeds) for ``images`` in batches of 32, from the FP32
    chain (heads stay FP32, so their inputs are not collected)."""
    from edgeexit.export.parity import cpu_runner

    runner = cpu_runner(folder, units)
    k = len(runner.units) // 2
    feeds: dict[str, list] = {segment_name(pos): [] for pos in range(k)}
    try:
        for start in range(0, len(images), 32):
            state = runner.from_host(np.ascontiguousarray(images[start : start + 32]))
            for pos, inputs, _, _ in walk(runner, state, k):
                seg = runner.units[2 * pos]
                feeds[seg.name].append(dict(zip(seg.input_names, inputs, strict=True)))
    finally:
        runner.close()
    return feeds


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds: list[dict]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # the protocol's optional method; a fresh reader is made per unit
        pass


def quantize_units(
    folder: Path, units: Sequence[Unit | Mapping], images: np.ndarray, method: str = "minmax"
) -> tuple[list[Unit], dict]:
    """Write ``<unit>.int8.onnx`` and ``<unit>.int8trt.onnx`` beside every segment; returns the units
    (given as `Unit`s or manifest entries) with them as their ``int8`` and ``int8_trt`` files, and the
    quantization's settings."""
    from onnxruntime.quantization import CalibrationMethod

    calib = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    t0 = time.perf_counter()
    typed = list(parse_units(folder, units))
    feeds = _chain_inputs(folder, typed, images)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # quantize_static's advice about pre-processing, once per unit
    try:
        typed = _quantize_each(folder, typed, feeds, calib)
        typed = _quantize_each(folder, typed, feeds, calib, flavour="trt")
    finally:
        logging.disable(previous)
    return typed, {
        "format": "QDQ",
        "weights": "int8, per output channel, symmetric",
        "activations": "uint8, asymmetric (U8S8)",
        "tensorrt_flavour": "units[].onnx_int8_trt: int8 activations and weights, symmetric, zero points 0, "
        "bias not quantized (TensorRT's ONNX parser takes only this)",
        "method": method,
        "images": int(len(images)),
        "units": {
            "segments": "int8 (every op with an INT8 kernel; convs reading <= 4 channels stay fp32)",
            "heads": "fp32 (measured faster)",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }


NARROW_INPUT_CHANNELS = 4


def narrow_input_convs(path: Path) -> list[str]:
    """Convs that read at most ``NARROW_INPUT_CHANNELS`` channels (the stem on a gray or RGB image,
    the first stage of a very narrow model): they stay FP32. An INT8 GEMM over a reduction of 9-36
    values cannot use its wide dot-product instructions; measured (ORT 1.32 CPU, 1 thread, one
    3x3 conv + ReLU at 28x28, Q+conv+DQ vs FP32): 1->16 channels 28.3 vs 9.2 us, 3->16 30.1 vs 13.7,
    4->8 28.2 vs 15.8, 8->8 32.2 vs 25.5, 8->16 21.5 vs 25.8, 16->16 25.9 vs 42.3. Inside the
    quickstart's segment 1 the INT8 stem took 24.5 us against 5.3 us in FP32 (ORT profiler)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if weights[node.input[1]][1] * group <= NARROW_INPUT_CHANNELS:
            names.append(node.name)
    return names


def _quantize_each(folder: Path, units: list[Unit], feeds: dict, calib, flavour: str = "ort") -> list[Unit]:
    """``flavour`` "ort": U8S8 (ONNX Runtime's fast x86 path), recorded as ``onnx_int8``. "trt": the
    Q/DQ TensorRT's ONNX parser accepts (onnx-tensorrt asserts zero point 0 and INT8; no INT32 bias
    DequantizeLinear): int8 symmetric activations and weights, bias left float; ``onnx_int8_trt``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    trt = flavour == "trt"
    precision, suffix = ("int8_trt", "int8trt") if trt else ("int8", "int8")
    done = []
    for u in units:
        if u.kind == "head":
            # Heads stay FP32: measured on the quickstart model (ORT CPU, batch 1), an INT8 head 1
            # took 0.029 ms against 0.020 ms in FP32 (tiny depthwise convs gain nothing from INT8,
            # and the Q/DQ pairs cost), and a float head keeps the confidence's full resolution.
            done.append(u.with_file(precision, u.file()))
            continue
        out = folder / f"{u.name}.{suffix}.onnx"
        keep_fp32 = narrow_input_convs(u.file())
        quantize_static(
            str(u.file()),
            str(out),
            _Reader(feeds[u.name]),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=None,  # every op with an INT8 kernel: activations stay INT8 between convs
            per_channel=True,
            # U8S8: the fast INT8 path of x86 (VNNI) CPUs; S8S8 symmetric for TensorRT
            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calib,
            nodes_to_exclude=keep_fp32,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": trt, "QuantizeBias": not trt},
        )
        done.append(u.with_file(precision, out, **{f"{precision}_bytes": out.stat().st_size}))
    return done


def int8_parity(folder: Path, units: list[Unit], images: np.ndarray, labels: np.ndarray, tolerance: float) -> dict:
    """The chained INT8 units vs the FP32 ones on the same held-out images: the comparison's record
    (`edgeexit.runtime.compare.ExitComparison.to_json`), judged on each exit's accuracy drop
    (``tolerance``, a fraction), with ``images`` and ``tolerance_pt`` added."""
    from edgeexit.export.parity import cpu_runner
    from edgeexit.runtime.compare import Tolerance, compare_exits

    tol, k = Tolerance(max_accuracy_drop=tolerance), len(units) // 2
    reference = cpu_runner(folder, units, "fp32")
    try:
        candidate = cpu_runner(folder, units, "int8")
        try:
            result = compare_exits(reference, candidate, images, labels, num_exits=k, tolerance=tol)
        finally:
            candidate.close()
    finally:
        reference.close()
    return {**result.to_json(), "images": int(len(images)), "tolerance_pt": 100 * tolerance}
