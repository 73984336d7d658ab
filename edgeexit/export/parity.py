"""ONNX Runtime (CPU) vs PyTorch on real images: every unit alone, and the chained cascade.

Both run the units through the runtime's own runner (`OnnxRuntimeBackend.for_units` over export's
temporary folder) and its chain walk (`edgeexit.runtime.chain`), so what is checked is what runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeexit.models import MultiExitNet
from edgeexit.runtime.artifact import parse_units
from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgeexit.runtime.chain import walk
from edgeexit.runtime.plan import unit_names


def cpu_runner(folder: Path, units: list[dict], precision: str = "fp32") -> OnnxRuntimeBackend:
    """The CPU runner over units export is writing (``units``: their manifest entries)."""
    return OnnxRuntimeBackend.for_units(folder, parse_units(folder, units), precision)


def _torch_chain(model: MultiExitNet, x: np.ndarray) -> list[tuple[tuple, tuple, torch.Tensor, torch.Tensor]]:
    """PyTorch's (segment inputs, segment outputs, logits, confidence) for every exit of one batch."""
    out, state = [], (torch.from_numpy(x),)
    with torch.no_grad():
        for seg, head in zip(model.segments, model.heads, strict=True):
            nxt = seg(*state)
            logits, _ = head(nxt[-1])
            out.append((state, nxt, logits, torch.softmax(logits, 1).amax(1)))
            state = nxt
    return out


def _unit_diffs(runner, reference, unit_diff: np.ndarray) -> None:
    """Each unit alone, fed PyTorch's inputs: max |ONNX - PyTorch| of its outputs (in place)."""
    for pos, (t_in, t_out, t_logits, _) in enumerate(reference):
        iso = runner.run_segment(pos, tuple(t.numpy() for t in t_in))
        d = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(iso, t_out, strict=True))
        unit_diff[2 * pos] = max(unit_diff[2 * pos], d)
        head = runner.run_head(pos, t_out[-1].numpy())
        unit_diff[2 * pos + 1] = max(unit_diff[2 * pos + 1], float(np.abs(head.logits() - t_logits.numpy()).max()))


def check_parity(
    model: MultiExitNet, folder: Path, units: list[dict], images: np.ndarray, batch_size: int = 64
) -> dict:
    """``images``: normalised float32 (N, C, H, W). Returns per-unit and per-exit differences."""
    runner = cpu_runner(folder, units)
    k = model.num_exits
    unit_diff, logit_diff, conf_diff, agree = np.zeros(2 * k), np.zeros(k), np.zeros(k), np.zeros(k)
    model = model.eval().cpu()
    try:
        for start in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[start : start + batch_size])
            reference = _torch_chain(model, x)
            _unit_diffs(runner, reference, unit_diff)
            for pos, _, _, head in walk(runner, runner.from_host(x), k):  # ONNX Runtime all the way
                t_logits, t_conf = reference[pos][2].numpy(), reference[pos][3].numpy()
                logit_diff[pos] = max(logit_diff[pos], float(np.abs(head.logits() - t_logits).max()))
                conf_diff[pos] = max(conf_diff[pos], float(np.abs(head.confidence - t_conf).max()))
                agree[pos] += float((head.logits().argmax(1) == t_logits.argmax(1)).sum())
    finally:
        runner.close()
    n = len(images)
    return {
        "samples": int(n),
        "units": [{"name": name, "max_abs_diff": float(d)} for name, d in zip(unit_names(k), unit_diff, strict=True)],
        "exits": [
            {
                "exit": pos + 1,
                "max_abs_logit_diff": float(logit_diff[pos]),
                "max_abs_confidence_diff": float(conf_diff[pos]),
                "prediction_agreement": float(agree[pos] / n),
            }
            for pos in range(k)
        ],
        "max_abs_logit_diff": float(logit_diff.max()),
    }
