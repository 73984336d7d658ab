"""One ONNX file per unit (segment k, head k), with stable tensor names and a dynamic batch axis.

Names (contract, docs/contract.md §5): segment 1 takes ``image``; a segment whose state is one tensor
outputs ``feat_KK``; a segment that ends inside a residual block outputs ``skip_KK`` (the block
input, needed by the shortcut) and ``feat_KK`` (the activation the head reads). The tap is always
``feat_KK``. Segment k+1's inputs are segment k's outputs, in order. Head k reads ``feat_KK`` and
outputs ``logits`` and ``confidence`` (max softmax), so a GPU backend reads back one scalar per sample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from edgeexit.models import ExitHead, MultiExitNet, Segment
from edgeexit.runtime.artifact import TensorSpec, Unit, parse_units
from edgeexit.runtime.plan import head_name, segment_name


class SegmentUnit(nn.Module):
    def __init__(self, segment: Segment) -> None:
        super().__init__()
        self.segment = segment

    def forward(self, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.segment(*state))


class HeadUnit(nn.Module):
    def __init__(self, head: ExitHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, tap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.head(tap)
        return logits, torch.softmax(logits, dim=1).amax(dim=1)


def state_names(k: int, n: int) -> list[str]:
    return [f"feat_{k:02d}"] if n == 1 else [f"skip_{k:02d}", f"feat_{k:02d}"]


def _simplify(path: Path) -> None:
    import onnx
    import onnxslim

    slim = onnxslim.slim(str(path))
    onnx.checker.check_model(slim)
    onnx.save(slim, str(path))


def export_units(model: MultiExitNet, folder: Path, opset: int = 17, simplify: bool = True) -> list[Unit]:
    """Write seg_KK.onnx and head_KK.onnx into ``folder``; return their `Unit`s (the manifest's
    entries once serialised), FP32 files only."""
    model = model.eval().cpu()
    cfg = model.config
    example: tuple[torch.Tensor, ...] = (torch.zeros(2, cfg.in_chans, *cfg.input_size),)
    in_names = ["image"]
    units = []
    for pos, (segment, head) in enumerate(zip(model.segments, model.heads, strict=True)):
        with torch.no_grad():
            out_state = segment(*example)
        out_names = state_names(pos + 1, len(out_state))
        seg_path, head_path = folder / f"{segment_name(pos)}.onnx", folder / f"{head_name(pos)}.onnx"
        seg = _export_unit(SegmentUnit(segment).eval(), example, in_names, out_names, seg_path, opset, simplify)
        hd = _export_unit(
            HeadUnit(head).eval(),
            (out_state[-1],),
            [out_names[-1]],
            ["logits", "confidence"],
            head_path,
            opset,
            simplify,
        )
        units.append(_unit(segment_name(pos), "segment", pos, seg, tap=out_names[-1]))
        units.append(_unit(head_name(pos), "head", pos, hd))
        example, in_names = out_state, out_names
    if opset <= TRT86_MAX_OPSET:
        check_trt86_ops(folder, units)
    return units


# ONNX operators TensorRT 8.6's parser imports (opset <= 17): the "Y" rows of onnx-tensorrt's operator
# matrix for 8.6 (docs/operators.md on its release/8.6-GA branch). LayerNormalization is one (FP32 and
# FP16; 8.5 had none), so a ConvNeXt's LayerNorm exported at opset 17 builds. An operator outside the
# set would fail on the device, so the export names it instead.
TRT86_MAX_OPSET = 17
TRT86_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GroupNormalization GRU HardSwish HardSigmoid Identity If ImageScaler InstanceNormalization
    IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization
    LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)


def unsupported_ops(path: Path) -> list[str]:
    """The operators of one ONNX file that TensorRT 8.6 cannot import (sorted, each once)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted({n.op_type for n in graph.node if n.domain in ("", "ai.onnx") and n.op_type not in TRT86_OPS})


def check_trt86_ops(folder: Path, units: list[Unit]) -> None:
    """At export, not on the device: a unit using an operator TensorRT 8.6 does not import is a
    UserError naming the unit and the operators."""
    from edgeexit.errors import UserError

    bad = {u.file().name: ops for u in units if (ops := unsupported_ops(u.file()))}
    if bad:
        where = "; ".join(f"{name}: {', '.join(ops)}" for name, ops in bad.items())
        raise UserError(
            f"TensorRT 8.6 (opset <= {TRT86_MAX_OPSET}) cannot import these operators ({where}): "
            "export with --opset 18 or later for TensorRT 10, or choose another backbone"
        )


def _unit(name: str, kind: str, pos: int, exported: dict, **extra) -> Unit:
    """The `Unit` of one exported file (``exported``: `_export_unit`'s description)."""
    return Unit(
        name,
        kind,
        pos,
        inputs=exported["inputs"],
        outputs=exported["outputs"],
        files=MappingProxyType({"fp32": exported["path"]}),
        extra={"exit_index": pos + 1, "onnx_bytes": exported["onnx_bytes"], "export_s": exported["export_s"], **extra},
    )


def _export_unit(module, args, inputs, outputs, path: Path, opset: int, simplify: bool) -> dict:
    """One unit to ONNX (dynamic batch), simplified and checked; its file, tensors, size and time."""
    import onnx

    t0 = time.perf_counter()
    # The TorchScript-based exporter: stable names, dynamic_axes, no onnxscript dependency.
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=False,
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes={n: {0: "batch"} for n in (*inputs, *outputs)},
        opset_version=opset,
        do_constant_folding=True,
    )
    if simplify:
        _simplify(path)
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        res = module(*args)
    return {
        "path": path,
        "inputs": tuple(TensorSpec(n, (None, *a.shape[1:])) for n, a in zip(inputs, args, strict=True)),
        "outputs": tuple(TensorSpec(n, (None, *r.shape[1:])) for n, r in zip(outputs, res, strict=True)),
        "onnx_bytes": path.stat().st_size,
        "export_s": round(time.perf_counter() - t0, 3),
    }


def write_fp16_units(folder: Path, units: Sequence[Unit | Mapping]) -> list[Unit]:
    """``<segment>.fp16.onnx`` beside every segment; returns the units with it as their ``fp16``
    file (``onnx_fp16``): weights and activations FP16 inside, FP32 at the unit's boundary (a Cast
    after each input and before each output), so the runtime moves FP32 between units unchanged.
    Heads stay FP32 whole (their softmax/confidence and logits: thresholds live near 1.0, where FP16
    has 2^-11 spacing). A strongly typed TensorRT (>= 10) builds `--half` engines from these files.
    ``units``: `Unit`s or their manifest entries."""
    out = []
    for u in parse_units(folder, units):
        if u.kind == "head":
            out.append(u.with_file("fp16", u.file()))
            continue
        path = folder / f"{u.name}.fp16.onnx"
        convert_to_fp16(u.file(), path)
        out.append(u.with_file("fp16", path))
    return out


def convert_to_fp16(src: Path, dst: Path) -> None:  # noqa: C901
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16

    def half(t):
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)

    for t in g.initializer:
        if t.data_type == f32:
            t.CopyFrom(half(t))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f32:
                a.t.CopyFrom(half(a.t))
            if n.op_type == "Cast" and a.name == "to" and a.i == f32:
                a.i = f16
    casts_in, casts_out = [], []
    for x in g.input:
        if x.type.tensor_type.elem_type != f32:
            continue
        inner = f"{x.name}__fp16"
        for n in g.node:
            n.input[:] = [inner if i == x.name else i for i in n.input]
        casts_in.append(helper.make_node("Cast", [x.name], [inner], to=f16, name=f"cast_in_{x.name}"))
    for y in g.output:
        if y.type.tensor_type.elem_type != f32:
            continue
        inner = f"{y.name}__fp16"
        for n in g.node:
            n.input[:] = [inner if i == y.name else i for i in n.input]
            n.output[:] = [inner if o == y.name else o for o in n.output]
        casts_out.append(helper.make_node("Cast", [inner], [y.name], to=f32, name=f"cast_out_{y.name}"))
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def fp16_parity(folder: Path, units: list[Unit], images, labels=None) -> dict:
    """The FP16 chain vs the FP32 chain in ONNX Runtime (CPU): the comparison's record
    (`edgeexit.runtime.compare.ExitComparison.to_json`, with accuracies given ``labels``), judged
    under the fp16 tolerance the engine gate applies, and recorded, not enforced: ONNX Runtime's
    CPU FP16 kernels are not the device's. Below `MIN_FRAMES` images agreement is not judged."""
    from dataclasses import replace

    from edgeexit.export.parity import cpu_runner
    from edgeexit.runtime.compare import MIN_FRAMES, TOLERANCES, compare_exits

    tol = TOLERANCES["fp16"]
    if len(images) < MIN_FRAMES:
        tol = replace(tol, max_disagreement=None)
    reference = cpu_runner(folder, units, "fp32")
    try:
        candidate = cpu_runner(folder, units, "fp16")
        try:
            result = compare_exits(reference, candidate, images, labels, num_exits=len(units) // 2, tolerance=tol)
        finally:
            candidate.close()
    finally:
        reference.close()
    return {**result.to_json(), "images": int(len(images)), "runtime": "onnxruntime-cpu"}
