"""ONNX Runtime (CPU) vs PyTorch on real images, for every unit alone and for the chained cascade."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeexit.models import MultiExitNet
from edgeexit.runtime.plan import head_name, segment_name


def ort_sessions(folder: Path, units: list[dict]) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return {
        u["name"]: ort.InferenceSession(str(folder / u["onnx"]), opts, providers=["CPUExecutionProvider"])
        for u in units
    }


def check_parity(
    model: MultiExitNet, folder: Path, units: list[dict], images: np.ndarray, batch_size: int = 64
) -> dict:
    """``images``: normalised float32 (N, C, H, W). Returns per-unit and per-exit differences."""
    sessions = ort_sessions(folder, units)
    by_name = {u["name"]: u for u in units}
    k_exits = model.num_exits
    unit_diff = {u["name"]: 0.0 for u in units}
    logit_diff = np.zeros(k_exits)
    conf_diff = np.zeros(k_exits)
    agree = np.zeros(k_exits)
    model = model.eval().cpu()
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        t_state: tuple = (torch.from_numpy(x),)
        o_state: list[np.ndarray] = [x]
        for k in range(1, k_exits + 1):
            seg, head = by_name[segment_name(k - 1)], by_name[head_name(k - 1)]
            with torch.no_grad():
                t_next = model.segments[k - 1](*t_state)
                t_logits, _ = model.heads[k - 1](t_next[-1])
                t_conf = torch.softmax(t_logits, 1).amax(1)
            t_next_np = [t.numpy() for t in t_next]
            # Unit alone: the same (PyTorch) inputs into both.
            iso = sessions[seg["name"]].run(
                None, {i["name"]: t.numpy() for i, t in zip(seg["inputs"], t_state, strict=True)}
            )
            unit_diff[seg["name"]] = max(
                unit_diff[seg["name"]], max(float(np.abs(a - b).max()) for a, b in zip(iso, t_next_np, strict=True))
            )
            iso_head = sessions[head["name"]].run(None, {head["inputs"][0]["name"]: t_next_np[-1]})
            unit_diff[head["name"]] = max(unit_diff[head["name"]], float(np.abs(iso_head[0] - t_logits.numpy()).max()))
            # Chained: ONNX Runtime all the way, as the cascade runs it.
            o_state = sessions[seg["name"]].run(
                None, {i["name"]: a for i, a in zip(seg["inputs"], o_state, strict=True)}
            )
            o_logits, o_conf = sessions[head["name"]].run(None, {head["inputs"][0]["name"]: o_state[-1]})
            logit_diff[k - 1] = max(logit_diff[k - 1], float(np.abs(o_logits - t_logits.numpy()).max()))
            conf_diff[k - 1] = max(conf_diff[k - 1], float(np.abs(o_conf - t_conf.numpy()).max()))
            agree[k - 1] += float((o_logits.argmax(1) == t_logits.numpy().argmax(1)).sum())
            t_state = t_next
    n = len(images)
    return {
        "samples": int(n),
        "units": [{"name": name, "max_abs_diff": d} for name, d in unit_diff.items()],
        "exits": [
            {
                "exit": k + 1,
                "max_abs_logit_diff": float(logit_diff[k]),
                "max_abs_confidence_diff": float(conf_diff[k]),
                "prediction_agreement": float(agree[k] / n),
            }
            for k in range(k_exits)
        ],
        "max_abs_logit_diff": float(logit_diff.max()),
    }
