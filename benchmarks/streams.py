"""Many live streams on one device (issue 27): one cascade call per frame vs one batch per tick.

    python benchmarks/streams.py --artifact runs/quickstart/model.edgeexit \\
        --overload-artifact runs/w1/model.edgeexit --seconds 20 --overload-seconds 60

Inputs: N = 1, 2, 4, 8 live streams, each a lossless (FFV1) video of its own Fashion-MNIST test
frames, played with ``--realtime`` at ``--fps`` (30) by `edgeexit.runtime.Streams` (one reader
thread per stream, newest frame only). For every N:

- (a) ``sequential``: each tick runs the frames it took one by one (`Cascade.predict`): one cascade
  call per stream and frame, what N one-camera apps sharing the device do at best;
- (b) ``batched``: each tick runs them as one `predict_batch` with early-exit compaction.

Reported per cell: aggregate frames/s, per-stream p95 capture-to-result latency (worst stream),
drop rate, accuracy against the labels, the tick's inference time (p95), the target
p95 <= 2 x (frame interval + one tick's inference), and whether (a) and (b) gave the same
predictions on the frames both processed. Then one overload run (``--overload-streams`` streams on
``--overload-artifact``, e.g. a width-1 model, for ``--overload-seconds``): capture-to-result
latency per second, first vs last 10 s (target: within 20%, no growth).

Writes --out (JSON) and two plots (--plot, --overload-plot). Smoke run (seconds, not for timing):
    python benchmarks/streams.py --artifact A --streams 1,2 --seconds 2 --overload-seconds 4 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_videos(folder: Path, n_streams: int, frames_per_stream: int, fps: float):
    """One FFV1 (lossless) video per stream, of consecutive test images; returns paths and labels."""
    import cv2

    from edgeexit.data import load_dataset

    ds = load_dataset("fashion-mnist", "test")
    images = ds.images[:, 0].numpy()
    labels = ds.labels.numpy()
    paths, stream_labels = [], []
    for s in range(n_streams):
        idx = (np.arange(frames_per_stream) + s * (len(images) // max(n_streams, 1))) % len(images)
        path = folder / f"stream{s}.mkv"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (28, 28))
        if not w.isOpened():
            raise SystemExit("OpenCV cannot write FFV1 video here")
        for i in idx:
            w.write(cv2.cvtColor(images[i], cv2.COLOR_GRAY2BGR))
        w.release()
        paths.append(str(path))
        stream_labels.append(labels[idx])
    return paths, stream_labels


def run_cell(cascade, paths, labels, fps, seconds, batched, keep_timeline=False, window_ms=0.0) -> dict:
    from edgeexit.runtime import Streams

    preds: dict[tuple[int, int], int] = {}
    ticks: dict[float, list[float]] = {}
    timeline = []
    window = window_ms if batched else 0.0
    with Streams(cascade, paths, realtime=True, fps=fps, batch=batched, batch_window_ms=window) as st:
        for r in st.results(duration_s=seconds):
            preds[(r.stream, r.frame_id)] = r.prediction.label
            ticks.setdefault(r.result_time, []).append(r.prediction.latency_ms)
            if keep_timeline:
                timeline.append((r.result_time - st.t_start, r.e2e_ms))
    summary = st.summary()
    # one tick's inference: the batch's slowest frame (batched) or the sum of its frames (sequential)
    tick_ms = np.asarray([max(v) if batched else sum(v) for v in ticks.values()]) if ticks else np.zeros(1)
    correct = sum(int(labels[s][f] == y) for (s, f), y in preds.items())
    captured = sum(s["captured"] for s in summary["streams"])
    p95s = [s["e2e_latency_ms"]["p95"] or 0.0 for s in summary["streams"]]
    tick_p95 = float(np.percentile(tick_ms, 95))
    bound = 2 * (1000.0 / fps + tick_p95)
    out = {
        "mode": "batched" if batched else "sequential",
        "streams": len(paths),
        "frames": summary["frames"],
        "frames_per_s": summary["frames"] / summary["wall_s"],
        "e2e_p95_ms_worst_stream": max(p95s),
        "e2e_p95_ms_per_stream": p95s,
        "drop_rate": summary["dropped"] / captured if captured else 0.0,
        "accuracy": correct / len(preds) if preds else float("nan"),
        "tick_inference_p95_ms": tick_p95,
        "mean_batch": summary["mean_batch"],
        "batch_window_ms": window,
        "target_ms": bound,
        "target_met": max(p95s) <= bound,
        "exit_histogram": summary["exit_histogram"],
        "_preds": preds,
    }
    if keep_timeline:
        out["_timeline"] = timeline
    return out


def overload(cascade, paths, fps: float, seconds: float, window_ms: float) -> dict:
    dummy = [np.zeros(10**6, dtype=np.int64)] * len(paths)
    cell = run_cell(cascade, paths, dummy, fps, seconds, True, True, window_ms)
    t = np.asarray([x[0] for x in cell["_timeline"]])
    e2e = np.asarray([x[1] for x in cell["_timeline"]])
    per_s = []
    for sec in range(int(np.ceil(t.max())) if len(t) else 0):
        sel = e2e[(t >= sec) & (t < sec + 1)]
        if len(sel):
            per_s.append({"t_s": sec, "p50": float(np.median(sel)), "p95": float(np.percentile(sel, 95))})
    window = min(10.0, seconds / 3)
    first, last = e2e[t < window], e2e[t >= t.max() - window]
    f95, l95 = float(np.percentile(first, 95)), float(np.percentile(last, 95))
    return {
        "streams": len(paths),
        "seconds": seconds,
        "frames_per_s": cell["frames_per_s"],
        "drop_rate": cell["drop_rate"],
        "tick_inference_p95_ms": cell["tick_inference_p95_ms"],
        "mean_batch": cell["mean_batch"],
        "window_s": window,
        "first_p95_ms": f95,
        "last_p95_ms": l95,
        "first_p50_ms": float(np.median(first)),
        "last_p50_ms": float(np.median(last)),
        "growth": l95 / f95 - 1,
        "target_met": abs(l95 / f95 - 1) <= 0.2,
        "per_second": per_s,
    }


def plot(cells: list[dict], path: str) -> None:
    from plotting import figure, finish

    fig, ax = figure((7.5, 3.2))
    ax.remove()
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for mode, style in (("sequential", "o--"), ("batched", "s-")):
        rows = [c for c in cells if c["mode"] == mode]
        n = [c["streams"] for c in rows]
        ax1.plot(n, [c["frames_per_s"] for c in rows], style, label=mode)
        ax2.plot(n, [c["e2e_p95_ms_worst_stream"] for c in rows], style, label=mode)
    demand = sorted({c["streams"] for c in cells})
    ax1.plot(demand, [30 * n for n in demand], ":", color="gray", label="demand (30 fps each)")
    ax1.set_title("aggregate frames/s", fontsize=9)
    ax2.set_title("capture-to-result p95 (worst stream)", fontsize=9)
    ax1.set_xlabel("streams")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    finish(fig, ax2, path, "streams", "ms")


def plot_overload(run: dict, path: str) -> None:
    from plotting import figure, finish

    fig, ax = figure((6, 3))
    t = [r["t_s"] for r in run["per_second"]]
    ax.plot(t, [r["p95"] for r in run["per_second"]], "-", label="p95 per second")
    ax.plot(t, [r["p50"] for r in run["per_second"]], "--", label="p50 per second")
    ax.set_title(f"overload: {run['streams']} streams, {run['frames_per_s']:.0f} frames/s served", fontsize=9)
    finish(fig, ax, path, "time (s)", "capture-to-result (ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="runs/quickstart/model.edgeexit", help="calibrated artifact (cells)")
    ap.add_argument("--overload-artifact", default=None, help="a slow (width-1) artifact; default: --artifact")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=20.0, help="per cell")
    ap.add_argument("--batch-window-ms", type=float, default=0.0, help="Streams batch_window_ms for (b)")
    ap.add_argument("--overload-streams", type=int, default=8)
    ap.add_argument("--overload-seconds", type=float, default=60.0, help="0: skip the overload run")
    ap.add_argument("--out", default="docs/streams.json")
    ap.add_argument("--plot", default="docs/streams.png")
    ap.add_argument("--overload-plot", default="docs/streams_overload.png")
    args = ap.parse_args()

    from edgeexit.runtime import Cascade

    counts = [int(n) for n in args.streams.split(",")]
    longest = max(args.seconds, args.overload_seconds)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        n_max = max(counts + [args.overload_streams])
        paths, labels = make_videos(Path(tmp), n_max, int(args.fps * (longest + 5)), args.fps)
        cascade = Cascade.load(args.artifact, backend=args.backend)
        print(f"backend {cascade.runner.info.name}; {cascade.backend_info['why']}", flush=True)
        for n in counts:
            pair = []
            for batched in (False, True):
                cell = run_cell(
                    cascade, paths[:n], labels[:n], args.fps, args.seconds, batched, False, args.batch_window_ms
                )
                pair.append(cell)
                print(
                    f"N={n} {cell['mode']:10s} {cell['frames_per_s']:7.1f} frames/s  "
                    f"p95 {cell['e2e_p95_ms_worst_stream']:7.2f} ms (target {cell['target_ms']:.1f})  "
                    f"drop {100 * cell['drop_rate']:5.1f}%  acc {cell['accuracy']:.4f}  "
                    f"batch {cell['mean_batch']:.2f}",
                    flush=True,
                )
            a, b = (c.pop("_preds") for c in pair)
            both = set(a) & set(b)
            pair[1]["same_predictions_on_common_frames"] = sum(a[k] == b[k] for k in both) / max(1, len(both))
            pair[1]["common_frames"] = len(both)
            pair[1]["speedup_vs_sequential"] = pair[1]["frames_per_s"] / max(1e-9, pair[0]["frames_per_s"])
            cells += pair
        cascade.close()
        result = {"fps_per_stream": args.fps, "seconds_per_cell": args.seconds, "cells": cells}
        if args.overload_seconds > 0:
            heavy = Cascade.load(args.overload_artifact or args.artifact, backend=args.backend)
            over = overload(
                heavy, paths[: args.overload_streams], args.fps, args.overload_seconds, args.batch_window_ms
            )
            heavy.close()
            result["overload"] = over
            print(
                f"overload {over['streams']} streams {args.overload_seconds:.0f} s: {over['frames_per_s']:.1f} "
                f"frames/s, drop {100 * over['drop_rate']:.1f}%, p95 first {over['window_s']:.0f} s "
                f"{over['first_p95_ms']:.1f} ms, last {over['last_p95_ms']:.1f} ms ({100 * over['growth']:+.1f}%)",
                flush=True,
            )
    result["machine"] = {"cpu_threads": __import__("os").cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC")}
    from edgeexit.util import atomic_write_text

    atomic_write_text(args.out, json.dumps(result, indent=2, default=float))
    plot(cells, args.plot)
    if "overload" in result:
        plot_overload(result["overload"], args.overload_plot)
    print(f"wrote {args.out}, {args.plot}" + (f", {args.overload_plot}" if "overload" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
