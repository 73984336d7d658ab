"""`edgeexit bench`: per-unit and cumulative per-exit latency; full cascade vs early exit (a job,
like calibrate: it uses the runtime's profiling mode, its chain walk and only the `Runner` protocol)."""

from __future__ import annotations

import numpy as np

from edgeexit.runtime.chain import walk
from edgeexit.runtime.plan import CascadePlan, head_name, segment_name
from edgeexit.runtime.profiling import time_call, verify


def _heldout_frames(cascade, n: int, data_dir: str | None):
    """Real held-out frames for the early-exit latency: those stored in the artifact, else the
    dataset's when it is available here."""
    from edgeexit.runtime.manifest import load_calibration_frames

    stored = load_calibration_frames(cascade.artifact) if data_dir is None else None
    if stored is not None:
        idx = stored["verification"][:n]
        return (stored["frames"][idx], stored["labels"][idx]), None
    try:
        from edgeexit.data.frames import load_frames

        frames, labels, _ = load_frames(cascade.artifact, None, "heldout", data_dir)
    except Exception as e:  # no torch or no data on this device: report per-unit numbers only
        return None, f"{type(e).__name__}: {e}"
    idx = np.random.default_rng(0).permutation(len(frames))[:n]
    return (frames[idx], labels[idx]), None


def check_bench_options(cascade, batch: int, repeats: int, images: int) -> None:
    """Refuse what cannot run: batches beyond the runner's max batch or a quarter of free memory."""
    from edgeexit.errors import UserError

    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if images < 0:
        raise UserError(f"--images must be 0 or more, got {images}")
    limit = min(cascade.runner.info.max_batch or 1 << 30, _memory_batch_limit(cascade))
    if not 1 <= batch <= limit:
        raise UserError(f"--batch must be within 1..{limit} for this artifact and machine, got {batch}")


def _memory_batch_limit(cascade) -> int:
    """The largest batch that fits: every tensor the units produce for one sample (all of them: the
    runtime keeps a group's states, and ONNX Runtime's arena keeps the intermediates inside a unit,
    which the recorded outputs bound from below), as float32, x4 for the copies in flight and the
    arena's growth, within a quarter of the memory available now."""
    per_sample = sum(u.values_per_sample for u in cascade.artifact.units)
    per_sample = max(per_sample, int(np.prod(cascade.preprocessor.chw_shape))) * 4 * 4
    available = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(1, available // 4 // per_sample)


def bench_cascade(cascade, batch: int = 1, repeats: int = 200, images: int = 500, data_dir: str | None = None) -> dict:
    check_bench_options(cascade, batch, repeats, images)
    data, why = _heldout_frames(cascade, images, data_dir) if images > 0 else (None, "--images 0")
    frame = data[0][0] if data is not None else np.zeros((*cascade.preprocessor.chw_shape[1:], 3), np.uint8)
    prof = cascade.profile(cascade.preprocessor(frame), batch=batch, repeats=repeats)
    units = prof["units"]
    cum, per_exit = 0.0, []
    for pos in range(cascade.num_exits):
        cum += units[segment_name(pos)]["p50_ms"]
        per_exit.append({"exit": pos + 1, "cumulative_p50_ms": cum + units[head_name(pos)]["p50_ms"]})
        cum += units[head_name(pos)]["p50_ms"]
    info = cascade.runner.info
    result = {
        "backend": info.name,
        "precision": info.precision,
        "device": info.device,
        "batch": batch,
        "units": [{"name": n, **v} for n, v in units.items()],
        "exits": per_exit,
        "decision_ms": prof["decision"]["p50_ms"],
        "thresholds": cascade.plan.to_list(),
    }
    result.update(_cascade_latency(cascade, frame, repeats))
    if data is not None:
        ee = verify(cascade, *data, cascade.plan)
        result["early_exit_ms"] = ee["mean_ms"]
        result["early_exit"] = ee
    else:
        result["early_exit_ms"] = None
        result["early_exit_note"] = f"no held-out images here ({why}); per-unit numbers only"
    return result


def _cascade_latency(cascade, frame, repeats: int) -> dict:
    """Batch 1: every unit (a cascade where nothing exits) and the plain model (backbone + final head)."""
    runner, num_exits = cascade.runner, cascade.num_exits
    x1 = cascade.preprocessor(frame)[None]

    def every_unit():
        for _ in walk(runner, runner.from_host(x1), num_exits):
            pass

    full = time_call(every_unit, runner.synchronize, repeats, 1.0)
    plain_model = cascade.derive(CascadePlan.full_model(num_exits))
    plain = time_call(lambda: plain_model.predict(frame), runner.synchronize, repeats, 1.0)
    return {"full_cascade_ms": full["mean_ms"], "full_cascade": full, "backbone_and_final_head_ms": plain["mean_ms"]}


def bench_table(result: dict):
    from rich.table import Table

    t = Table(title=f"bench: {result['backend']} on {result['device']} (batch {result['batch']})")
    for col in ("unit", "p50 ms", "p95 ms", "p99 ms", "mean ms"):
        t.add_column(col, justify="left" if col == "unit" else "right")
    for u in result["units"]:
        t.add_row(u["name"], f"{u['p50_ms']:.4f}", f"{u['p95_ms']:.4f}", f"{u['p99_ms']:.4f}", f"{u['mean_ms']:.4f}")
    lines = [
        "cumulative to exit (p50): " + ", ".join(f"{e['exit']}: {e['cumulative_p50_ms']:.3f}" for e in result["exits"]),
        f"full cascade (every unit, batch 1): {result['full_cascade_ms']:.3f} ms; backbone + final head: "
        f"{result['backbone_and_final_head_ms']:.3f} ms",
    ]
    if result.get("early_exit_ms") is not None:
        ee = result["early_exit"]
        lines.append(
            f"early exit at current thresholds: mean {ee['mean_ms']:.3f} ms, p95 {ee['p95_ms']:.3f} ms, "
            f"accuracy {100 * ee['accuracy']:.2f}% on {ee['samples']} held-out images"
        )
    t.caption = "\n".join(lines)
    return t
