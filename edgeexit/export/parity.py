"""ONNX Runtime (CPU) vs PyTorch on real images: every unit alone, and the chained cascade.

The exits are compared by the one comparator (`edgeexit.runtime.compare.compare_exits`), with the
units run by the runtime's own runner (`OnnxRuntimeBackend.for_units` over export's temporary
folder) and the model by `ModelRunner`, so what is checked is what runs. Each unit is also run
alone on PyTorch's inputs: a unit that is wrong by itself is named even when a later one hides it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from edgeexit.models import MultiExitNet
from edgeexit.runtime.artifact import Unit, parse_units
from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgeexit.runtime.compare import Tolerance, compare_exits
from edgeexit.runtime.plan import unit_names


def cpu_runner(folder: Path, units: Sequence[Unit | Mapping], precision: str = "fp32") -> OnnxRuntimeBackend:
    """The CPU runner over units export is writing (`Unit`s, or their manifest entries)."""
    return OnnxRuntimeBackend.for_units(folder, parse_units(folder, units), precision)


class ModelRunner(Runner):
    """The in-memory PyTorch model as a `Runner` (CPU, eager, numpy in and out): the reference
    export compares its ONNX units with, before any artifact exists."""

    def __init__(self, model: MultiExitNet) -> None:
        self.model = model.eval().cpu()
        self.info = RunnerInfo(name="torch-cpu", version=torch.__version__, device="cpu")
        self.thread_safe = True

    def from_host(self, x: np.ndarray) -> tuple:
        return (x,)

    def run_segment(self, pos: int, state: tuple) -> tuple:
        with torch.no_grad():
            out = self.model.segments[pos](*(torch.from_numpy(np.ascontiguousarray(s)) for s in state))
        return tuple(t.numpy() for t in out)

    def run_head(self, pos: int, tap) -> HeadOutput:
        with torch.no_grad():
            logits, _ = self.model.heads[pos](torch.from_numpy(tap))
        z = logits.numpy()
        return HeadOutput(torch.softmax(logits, 1).amax(1).numpy(), z)

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        return tuple(s[rows] for s in state)

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class UnitByUnit(Runner):
    """The reference runner, with every unit also run alone by ``candidate`` on the reference's
    inputs: ``diff`` keeps max |candidate - reference| of each unit's outputs (seg_01, head_01, ...).
    One walk gives the chained comparison's reference side and the per-unit check."""

    def __init__(self, reference: Runner, candidate: Runner, num_exits: int) -> None:
        self.reference, self.candidate = reference, candidate
        self.info, self.thread_safe = reference.info, False
        self.diff = np.zeros(2 * num_exits)

    def from_host(self, x: np.ndarray) -> tuple:
        return self.reference.from_host(x)

    def run_segment(self, pos: int, state: tuple) -> tuple:
        out = self.reference.run_segment(pos, state)
        alone = self.candidate.run_segment(pos, state)
        d = max(float(np.abs(a - b).max()) for a, b in zip(alone, out, strict=True))
        self.diff[2 * pos] = max(self.diff[2 * pos], d)
        return out

    def run_head(self, pos: int, tap) -> HeadOutput:
        head = self.reference.run_head(pos, tap)
        d = float(np.abs(self.candidate.run_head(pos, tap).logits() - head.logits()).max())
        self.diff[2 * pos + 1] = max(self.diff[2 * pos + 1], d)
        return head

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        return self.reference.take(state, rows)

    def synchronize(self) -> None:
        self.reference.synchronize()

    def close(self) -> None:
        pass  # the runners it wraps belong to the caller


def check_parity(
    model: MultiExitNet, folder: Path, units: list[Unit], images: np.ndarray, tolerance: float, batch_size: int = 64
) -> dict:
    """``images``: normalised float32 (N, C, H, W). The comparison's record (`ExitComparison.to_json`,
    judged on |Δlogit| <= ``tolerance``) with ``samples``, ``tolerance`` (the number) and ``units``
    (each unit alone) added."""
    k = model.num_exits
    tol = Tolerance(max_abs_logit=tolerance)
    candidate = cpu_runner(folder, units)
    reference = UnitByUnit(ModelRunner(model), candidate, k)
    try:
        result = compare_exits(reference, candidate, images, num_exits=k, tolerance=tol, batch_size=batch_size)
    finally:
        candidate.close()
    return {
        **result.to_json(),
        "samples": int(len(images)),
        "tolerance": tolerance,
        "units": [
            {"name": name, "max_abs_diff": float(d)} for name, d in zip(unit_names(k), reference.diff, strict=True)
        ],
    }
