"""Holding the budget while the device drifts: static thresholds vs the online controller.

    python benchmarks/drift.py runs/quickstart/model.edgeexit --png docs/drift.png

1. Calibrates the artifact at 60 % of the full model (ONNX Runtime CPU): the budget B is that
   calibration's budget, the static thresholds are its choice, and its ladder feeds the controller.
2. Streams 6,000 Fashion-MNIST test frames one at a time, twice: with the static thresholds and
   with `Cascade.load(..., budget_ms=B)`. During the middle third two CPU-bound background
   processes (pure-Python busy loops, started and stopped by this script, each bounded to 300 s)
   slow the device down.
3. In windows of 200 frames: mean latency, the share of windows above 1.10 × B (during contention
   and outside it), and accuracy outside and during contention.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

HOG = "import time\nt = time.time()\nwhile time.time() - t < 300:\n    pass\n"


def stream(cascade, frames, labels, third: int) -> dict:
    lat, correct, hogs = [], [], []
    try:
        for i, (f, y) in enumerate(zip(frames, labels, strict=True)):
            if i == third:
                hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
                time.sleep(0.5)
            if i == 2 * third:
                for h in hogs:
                    h.terminate()
                for h in hogs:
                    h.wait(timeout=30)
                hogs = []
            p = cascade.predict(f)
            lat.append(p.latency_ms)
            correct.append(p.label == y)
    finally:
        for h in hogs:
            h.terminate()
    return {"latency_ms": np.asarray(lat), "correct": np.asarray(correct)}


def summarise(run: dict, budget: float, third: int, window: int) -> dict:
    lat = run["latency_ms"]
    means = lat[: len(lat) // window * window].reshape(-1, window).mean(axis=1)
    starts = np.arange(len(means)) * window
    during = (starts >= third) & (starts < 2 * third)
    over = means > 1.10 * budget
    c = run["correct"]
    idx = np.arange(len(c))
    in_cont = (idx >= third) & (idx < 2 * third)
    return {
        "windows_over_during": float(over[during].mean()),
        "windows_over_outside": float(over[~during].mean()),
        "accuracy_outside": float(c[~in_cont].mean()),
        "accuracy_during": float(c[in_cont].mean()),
        "mean_ms_outside": float(lat[~in_cont].mean()),
        "mean_ms_during": float(lat[in_cont].mean()),
        "window_means": means.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--frames", type=int, default=6000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

    from edgeexit.calibrate.run import run_calibration
    from edgeexit.data import load_dataset
    from edgeexit.runtime import Cascade

    cal = run_calibration(args.artifact, budget_fraction=0.6, backend="onnxruntime", iso_accuracy=False)
    budget = cal["budget_ms"]
    print(
        f"budget B = {budget:.3f} ms (60 % of the full model); static thresholds measured "
        f"{cal['measured']['mean_ms']:.3f} ms, {100 * cal['measured']['accuracy']:.2f} % on verification"
    )
    from edgeexit.runtime.manifest import load_manifest

    test = load_dataset(load_manifest(args.artifact)["dataset"], "test")
    frames = test.images[: args.frames].permute(0, 2, 3, 1).numpy()
    labels = test.labels[: args.frames].numpy()
    third = args.frames // 3
    static = Cascade.load(args.artifact, backend="onnxruntime")
    controlled = Cascade.load(args.artifact, backend="onnxruntime", budget_ms=budget)
    for c in (static, controlled):  # warm-up
        for f in frames[:200]:
            c.predict(f)
    runs = {"static": stream(static, frames, labels, third), "controller": stream(controlled, frames, labels, third)}
    rows = {k: summarise(v, budget, third, args.window) for k, v in runs.items()}
    print(
        f"\n{args.frames} frames, windows of {args.window}; contention (2 busy processes) in frames "
        f"{third}..{2 * third}; controller: {controlled.controller.state()}"
    )
    print(
        "| thresholds | windows > 1.10·B during contention | outside | accuracy outside | accuracy during | "
        "mean ms outside | mean ms during |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(
            f"| {k} | {100 * r['windows_over_during']:.0f}% | {100 * r['windows_over_outside']:.0f}% | "
            f"{100 * r['accuracy_outside']:.2f}% | {100 * r['accuracy_during']:.2f}% | "
            f"{r['mean_ms_outside']:.3f} | {r['mean_ms_during']:.3f} |"
        )
    if args.png:
        plot(rows, budget, third, args.window, args.png)
        print(f"wrote {args.png}")


def plot(rows: dict, budget: float, third: int, window: int, path: str) -> None:
    from plotting import figure, finish

    fig, ax = figure((7, 3.6))
    for k, r in rows.items():
        x = (np.arange(len(r["window_means"])) + 0.5) * window
        ax.plot(x, r["window_means"], ".-", label=k)
    ax.axhline(budget, color="k", lw=1, label="budget B")
    ax.axhline(1.1 * budget, color="gray", lw=0.8, ls=":", label="1.10 · B")
    ax.axvspan(third, 2 * third, color="orange", alpha=0.15, label="2 busy processes")
    finish(fig, ax, path, "frame", f"mean latency per {window} frames (ms)")


if __name__ == "__main__":
    main()
