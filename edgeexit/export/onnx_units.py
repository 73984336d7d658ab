"""One ONNX file per unit (segment k, head k), with stable tensor names and a dynamic batch axis.

Names (contract, ARCHITECTURE §5): segment 1 takes ``image``; a segment whose state is one tensor
outputs ``feat_KK``; a segment that ends inside a residual block outputs ``skip_KK`` (the block
input, needed by the shortcut) and ``feat_KK`` (the activation the head reads). The tap is always
``feat_KK``. Segment k+1's inputs are segment k's outputs, in order. Head k reads ``feat_KK`` and
outputs ``logits`` and ``confidence`` (max softmax), so a GPU backend reads back one scalar per sample.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from edgeexit.models import ExitHead, MultiExitNet, Segment


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


def export_units(
    model: MultiExitNet, folder: Path, opset: int = 17, simplify: bool = True, progress=None
) -> list[dict]:
    """Write seg_KK.onnx and head_KK.onnx into ``folder``; return the manifest's unit entries."""
    import onnx

    model = model.eval().cpu()
    cfg = model.config
    h, w = cfg.input_size
    example: tuple[torch.Tensor, ...] = (torch.zeros(2, cfg.in_chans, h, w),)
    in_names = ["image"]
    units = []
    for k, (segment, head) in enumerate(zip(model.segments, model.heads, strict=True), 1):
        with torch.no_grad():
            out_state = segment(*example)
        out_names = state_names(k, len(out_state))
        for name, kind, module, args, inputs, outputs in (
            (f"seg_{k:02d}", "segment", SegmentUnit(segment).eval(), example, in_names, out_names),
            (
                f"head_{k:02d}",
                "head",
                HeadUnit(head).eval(),
                (out_state[-1],),
                [out_names[-1]],
                ["logits", "confidence"],
            ),
        ):
            t0 = time.perf_counter()
            path = folder / f"{name}.onnx"
            dynamic = {n: {0: "batch"} for n in (*inputs, *outputs)}
            # The TorchScript-based exporter: stable names, dynamic_axes, no onnxscript dependency.
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=dynamic,
                opset_version=opset,
                do_constant_folding=True,
            )
            if simplify:
                _simplify(path)
            onnx.checker.check_model(str(path))
            shapes_in = [[None, *a.shape[1:]] for a in args]
            with torch.no_grad():
                res = module(*args)
            shapes_out = [[None, *r.shape[1:]] for r in res]
            entry = {
                "name": name,
                "kind": kind,
                "exit_index": k,
                "onnx": path.name,
                "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in zip(inputs, shapes_in, strict=True)],
                "outputs": [
                    {"name": n, "shape": s, "dtype": "float32"} for n, s in zip(outputs, shapes_out, strict=True)
                ],
                "onnx_bytes": path.stat().st_size,
                "export_s": round(time.perf_counter() - t0, 3),
                "engines": [],
            }
            if kind == "segment":
                entry["tap"] = out_names[-1]
            units.append(entry)
            if progress is not None:
                progress(name)
        example, in_names = out_state, out_names
    return units
