"""`edgeexit bench`: per-unit and cumulative per-exit latency; full cascade vs early exit (numpy only)."""

from __future__ import annotations

import numpy as np

from edgeexit.calibrate.profiler import time_call


def _heldout_frames(cascade, n: int, data_dir: str | None):
    """Real held-out frames for the early-exit latency, when the dataset is available here."""
    try:
        from edgeexit.calibrate.run import load_frames

        frames, labels, _ = load_frames(cascade.manifest, None, "heldout", data_dir)
    except Exception as e:  # no torch or no data on this device: report per-unit numbers only
        return None, f"{type(e).__name__}: {e}"
    idx = np.random.default_rng(0).permutation(len(frames))[:n]
    return (frames[idx], labels[idx]), None


def bench_cascade(
    cascade, batch: int = 1, repeats: int = 200, num_images: int = 500, data_dir: str | None = None, console=None
) -> dict:
    from edgeexit.calibrate.profiler import profile_units

    data, why = _heldout_frames(cascade, num_images, data_dir) if num_images > 0 else (None, "--images 0")
    if data is not None:
        image = cascade.preprocess(data[0][0])
    else:
        image = np.zeros(cascade.preprocess.chw_shape, dtype=np.float32)
    prof = profile_units(cascade, image, batch=batch, repeats=repeats)
    units = [{"name": n, **v} for n, v in prof["units"].items()]
    cum, per_exit = 0.0, []
    for k in range(cascade.num_exits):
        cum += prof["units"][f"seg_{k + 1:02d}"]["p50_ms"]
        per_exit.append({"exit": k + 1, "cumulative_p50_ms": cum + prof["units"][f"head_{k + 1:02d}"]["p50_ms"]})
        cum += prof["units"][f"head_{k + 1:02d}"]["p50_ms"]
    result = {
        "backend": cascade.backend_name,
        "device": getattr(cascade.backend, "device_name", None) or str(getattr(cascade.backend, "device", "")),
        "batch": batch,
        "units": units,
        "exits": per_exit,
        "decision_ms": prof["decision"]["p50_ms"],
        "thresholds": [float(t) for t in cascade.thresholds],
    }
    frame = data[0][0] if data is not None else np.zeros((*cascade.preprocess.chw_shape[1:], 3), np.uint8)
    be = cascade.backend
    x1 = cascade.preprocess(frame)[None]

    def every_unit():  # batch 1, every segment and every head, as a cascade where nothing exits
        state = be.from_host(x1)
        for k in range(cascade.num_exits):
            state = be.run_segment(k, state)
            be.run_head(k, state[-1])

    full = time_call(every_unit, be.synchronize, repeats, 1.0)
    saved = cascade.thresholds.copy()
    cascade.set_thresholds([2.0] * (cascade.num_exits - 1) + [0.0])  # plain model: backbone + final head
    plain = time_call(lambda: cascade.predict(frame), be.synchronize, repeats, 1.0)
    cascade.set_thresholds(saved)
    result["full_cascade_ms"] = full["mean_ms"]
    result["full_cascade"] = full
    result["backbone_and_final_head_ms"] = plain["mean_ms"]
    if data is not None:
        from edgeexit.calibrate.run import verify

        ee = verify(cascade, *data, cascade.thresholds)
        result["early_exit_ms"] = ee["mean_ms"]
        result["early_exit"] = ee
    else:
        result["early_exit_ms"] = None
        result["early_exit_note"] = f"no held-out images here ({why}); per-unit numbers only"
    return result


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
