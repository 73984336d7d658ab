"""Holding the budget while the device drifts: static thresholds vs the budget controller (issue 21).

    python benchmarks/drift.py runs/e1/model.edgeexit --png docs/drift.png --json runs/e1/drift.json

The artifact must be calibrated first (its calibrated plan, measured latency and ladder are used;
the benchmark does not recalibrate), e.g.

    edgeexit train --data fashion-mnist --method mlcsd --exits 8 --width 0.25 --epochs 1 \
        --train-images 10000 --out runs/e1
    edgeexit export runs/e1/model.pt --out runs/e1/model.edgeexit
    edgeexit calibrate runs/e1/model.edgeexit --budget 60% --backend onnxruntime

Grid: drift profiles × budgets, each cell streamed over Fashion-MNIST test frames (one at a time,
cycling the test set) by static calibrated thresholds and by ``Cascade.load(..., budget_ms=B)``,
interleaved in blocks of 150 frames (alternating which goes first) so both meet the same moments.
Drift happens in the middle third of the frames:

- ``steady``:  two CPU-bound busy processes run;
- ``bursty``:  the same two, 1 s on / 1 s off (this profile streams ``--bursty-frames`` frames so
  that its middle third spans several bursts);
- ``ramp``:    ``--ramp-hogs`` busy processes whose duty cycle rises from 0 to 100 % over the
  middle third (period 100 ms), as thermal throttling does; quiet again after;
- ``threads``: a second app thread calls ``predict`` on the same cascade.

The busy processes are pure-Python loops started once (bounded to 900 s) and paused/resumed
with SIGSTOP/SIGCONT, so every onset is sharp. Budgets: ``own`` (the calibrated plan's own
measured latency: calibrate's ``reference``, its verification and interleaved runs pooled), ``60``
and ``80`` (% of the full model's predicted latency, as `calibrate --budget 60%`). Before the grid,
the calibrated plan runs alone (``--wander-frames``) to show how quiet "quiet" is on this machine.
Per cell: the share of ``--window``-frame windows over 1.10·B (all windows, and during drift),
accuracy outside the drift (controller vs static; and in the windows at calibration conditions),
switches per 1,000 frames (outside the drift: the steady-state count; and overall), feasibility
(the cheapest plan's quiet latency × the slowdown the static run measured ≤ B), and an oracle: what
perfect foresight of every window's slowdown would give up outside the drift to stay under B, or
to meet the issue's target (≤ 10 % of windows over 1.1·B) — the accuracy no controller can keep.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

HOG = "import time\nt = time.time()\nwhile time.time() - t < 900:\n    pass\n"
PROFILES = ("steady", "bursty", "ramp", "threads")


class Hogs:
    """Busy processes, paused until asked for (SIGSTOP/SIGCONT)."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]
        self.on = True
        self.set(False)

    def set(self, on: bool) -> None:
        if on != self.on:
            for p in self.procs:
                os.kill(p.pid, signal.SIGCONT if on else signal.SIGSTOP)
            self.on = on

    def close(self) -> None:
        for p in self.procs:
            try:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
                p.wait(timeout=30)
            except ProcessLookupError:
                pass


def stream(cascades: dict, frames, labels, n: int, profile: str, hogs: Hogs | None, block: int = 150) -> dict:  # noqa: C901
    """``n`` frames one at a time through every cascade of ``cascades`` (name -> Cascade), interleaved
    in blocks of ``block`` frames (the order alternating per block), so that static and controlled
    cascades meet the same conditions at the same moments; the profile's drift in frames n/3 .. 2n/3.
    Returns name -> {latency_ms, correct, rung}."""
    names = list(cascades)
    runs = {k: {"latency_ms": np.zeros(n), "correct": np.zeros(n, bool), "rung": np.zeros(n, np.int64)} for k in names}
    a, b = n // 3, 2 * n // 3
    stop = threading.Event()
    target = {"c": cascades[names[0]]}  # the second app thread calls the cascade being measured
    helper = None
    t_mid = None

    def drift(i: int) -> None:
        if hogs is None:
            return
        if a <= i < b:
            t = time.perf_counter() - t_mid
            if profile == "steady":
                hogs.set(True)
            elif profile == "bursty":
                hogs.set(int(t) % 2 == 0)
            elif profile == "ramp":
                duty = (i - a) / (b - a)
                hogs.set((t % 0.1) < duty * 0.1)
        else:
            hogs.set(False)

    def other():
        k = 0
        while not stop.is_set():
            target["c"].predict(frames[(k * 7919) % len(frames)])
            k += 1

    try:
        for i0 in range(0, n, block):
            if t_mid is None and i0 + block > a:
                t_mid = time.perf_counter()
            order = names if (i0 // block) % 2 == 0 else names[::-1]
            for name in order:
                c, run = cascades[name], runs[name]
                ctl = c.controller
                target["c"] = c
                for i in range(i0, min(n, i0 + block)):
                    if profile == "threads" and i == a and helper is None:
                        helper = threading.Thread(target=other, daemon=True)
                        helper.start()
                    if profile == "threads" and i == b and helper is not None:
                        stop.set()
                        helper.join()
                    drift(i)
                    j = i % len(frames)
                    p = c.predict(frames[j])
                    run["latency_ms"][i], run["correct"][i] = p.latency_ms, p.label == labels[j]
                    run["rung"][i] = ctl.index if ctl is not None else -1
    finally:
        stop.set()
        if helper is not None:
            helper.join()
        if hogs is not None:
            hogs.set(False)
    return runs


def windows(lat: np.ndarray, window: int, metric: str) -> np.ndarray:
    w = lat[: len(lat) // window * window].reshape(-1, window)
    return w.mean(axis=1) if metric == "mean" else np.percentile(w, 95, axis=1)


def summarise(run: dict, budget: float, window: int, metric: str) -> dict:
    lat, c, n = run["latency_ms"], run["correct"], len(run["latency_ms"])
    a, b = n // 3, 2 * n // 3
    wm = windows(lat, window, metric)
    starts = np.arange(len(wm)) * window
    drift = (starts + window > a) & (starts < b)
    over = wm > 1.10 * budget
    idx = np.arange(n)
    quiet = (idx < a) | (idx >= b)
    changes = np.flatnonzero(np.diff(run["rung"]) != 0) + 1
    q_changes = changes[(changes < a) | (changes >= b)]
    return {
        "windows_over": float(over.mean()),
        "windows_over_drift": float(over[drift].mean()) if drift.any() else 0.0,
        "accuracy_quiet": float(c[quiet].mean()),
        "accuracy_drift": float(c[~quiet].mean()),
        "mean_ms_quiet": float(lat[quiet].mean()),
        "mean_ms_drift": float(lat[~quiet].mean()),
        "switches_per_1000_quiet": 1000 * len(q_changes) / max(1, quiet.sum()),
        "switches_per_1000": 1000 * len(changes) / n,
        "window_metric": wm.tolist(),
    }


def calibration_conditions(s_run: dict, c_run: dict, n: int, window: int, measured: float, metric: str) -> dict:
    """Windows outside the drift where the machine was as calibration found it: the calibrated plan
    (static) ran within 1.1x its calibrated latency in that window. On a shared or noisy machine the
    "quiet" thirds are not all quiet; there the controller should be back on the calibrated plan (or a
    more accurate one) and give the accuracy back. Both cascades ran the same frames in each window."""
    a, b = n // 3, 2 * n // 3
    ws = windows(s_run["latency_ms"], window, metric)
    starts = np.arange(len(ws)) * window
    outside = (starts + window <= a) | (starts >= b)
    calm = outside & (ws <= 1.1 * measured)

    def acc(run):
        c = run["correct"][: len(ws) * window].reshape(-1, window).mean(axis=1)
        return float(c[calm].mean()) if calm.any() else float("nan")

    rungs = c_run["rung"][: len(ws) * window].reshape(-1, window)
    return {
        "windows": int(calm.sum()),
        "outside_windows": int(outside.sum()),
        "static_accuracy": acc(s_run),
        "controller_accuracy": acc(c_run),
        "controller_rung_per_window": [int(np.bincount(r - r.min()).argmax() + r.min()) for r in rungs],
    }


def oracle(static_windows, n: int, window: int, own_ms: float, budget: float, ctl, allowance: float = 0.10) -> dict:
    """What a controller with perfect foresight would give up outside the drift: for every window, the
    static plan's latency over its reference says how slow the device was (x); the oracle runs the
    most accurate rung with ``q·x`` under the limit (``q``: the rung's measured quiet latency).
    ``fits_b``: under B in every window. ``meets_target``: under 1.1·B, except the ``allowance`` share
    of the slowest windows, which keep the calibrated plan (the issue's ≤ 10 % of windows over 1.1·B).
    Accuracy from calibration's prediction per rung; > 0: points below the static plan."""
    a, b = n // 3, 2 * n // 3
    w = np.asarray(static_windows)
    starts = np.arange(len(w)) * window
    outside = (starts + window <= a) | (starts >= b)
    x = w[outside] / own_ms
    acc = [r.predicted_accuracy for r in ctl.ladder]
    cal = ctl.anchor if ctl.anchor is not None else len(acc) - 1

    def best(limit: float, xi: float) -> int:
        fit = [i for i, q in enumerate(ctl.quiet_ms) if q * xi <= limit]
        return max(fit, key=lambda i: acc[i]) if fit else 0

    fits_b = [acc[cal] - acc[best(budget, xi)] for xi in x]
    spare = set(np.argsort(-x)[: int(allowance * len(x))].tolist())
    meets = [0.0 if k in spare else acc[cal] - acc[best(1.1 * budget, xi)] for k, xi in enumerate(x)]
    return {
        "windows": int(len(x)),
        "device_x_p50": float(np.median(x)) if len(x) else float("nan"),
        "fits_b_drop_pt": 100 * float(np.mean(fits_b)) if len(x) else float("nan"),
        "meets_target_drop_pt": 100 * float(np.mean(meets)) if len(x) else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--frames", type=int, default=4500, help="frames per run (steady, ramp, threads)")
    ap.add_argument("--bursty-frames", type=int, default=30000, help="frames per bursty run")
    ap.add_argument("--window", type=int, default=150, help="frames per reported window")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--budgets", default="own,60,80", help="own and/or percentages of the full model")
    ap.add_argument("--ramp-hogs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--wander-frames", type=int, default=6000, help="frames of the quiet probe before the grid")
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from edgeexit.data import load_dataset
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.plan import CascadePlan

    art = Artifact.load(args.artifact)
    cal = art.calibration.to_dict() if art.calibration is not None else {}
    if not cal.get("ladder"):
        sys.exit("drift.py: the artifact is not calibrated (run `edgeexit calibrate ... --budget 60%` first)")
    metric = cal.get("metric", "mean")
    field = "mean_ms" if metric == "mean" else "p95_ms"
    # the plan's own measured latency: the controller's quiet reference (calibrate's verification and
    # interleaved runs pooled) when calibrate measured one, else the verification run
    ref = cal["measured"].get("reference") or cal["measured"]
    own_ms = float(ref[field])
    budgets = {}
    for b in args.budgets.split(","):
        if b == "own":
            budgets["own"] = own_ms
        else:
            budgets[f"{b}%"] = float(b) / 100 * float(cal["full_model"]["predicted_ms"])
    test = load_dataset(art.dataset, "test")
    frames = test.images.permute(0, 2, 3, 1).numpy()
    labels = test.labels.numpy()

    static = Cascade.load(args.artifact, backend="onnxruntime")
    # the cheapest rung by what calibrate measured for it (by the prediction for older calibrations)
    cheapest = min(cal["ladder"], key=lambda r: (r.get("measured") or {}).get(field, r["predicted_ms"]))
    cheapest_th = cheapest["thresholds"]
    cheap = static.derive(CascadePlan.from_thresholds(cheapest_th, static.num_exits))
    for c in (static, cheap):
        for f in frames[: args.warmup]:
            c.predict(f)
    cheap_ms = float(np.mean([cheap.predict(f).latency_ms for f in frames[:1000]]))
    print(f"metric {metric}; budgets (ms): {budgets}; cheapest plan quiet {cheap_ms:.3f} ms")
    # how quiet is "quiet" here: the calibrated plan alone, nothing else running, in windows
    wander = windows(np.array([static.predict(frames[i % len(frames)]).latency_ms
                               for i in range(args.wander_frames)]), args.window, metric) / own_ms  # fmt: skip
    q = np.percentile(wander, [5, 25, 50, 75, 95]).round(2).tolist() if len(wander) else []
    over = float((wander > 1.1).mean()) if len(wander) else float("nan")
    print(
        f"quiet machine: the calibrated plan alone, {len(wander)} windows / its calibrated latency: "
        f"p5/p25/p50/p75/p95 {q}; windows over 1.1x: {100 * over:.0f}%"
    )
    hogs = Hogs(2)
    ramp_hogs = hogs if args.ramp_hogs == 2 else Hogs(args.ramp_hogs)
    rows = []
    try:
        for name, budget in budgets.items():
            ctl_cascade = Cascade.load(args.artifact, backend="onnxruntime", budget_ms=budget)
            for f in frames[: args.warmup]:
                ctl_cascade.predict(f)
            for profile in args.profiles.split(","):
                n = args.bursty_frames if profile == "bursty" else args.frames
                h = {"threads": None, "ramp": ramp_hogs}.get(profile, hogs)
                t0 = time.perf_counter()
                runs = stream({"static": static, "controller": ctl_cascade}, frames, labels, n, profile, h)
                s_run, c_run = runs["static"], runs["controller"]
                s, c = summarise(s_run, budget, args.window, metric), summarise(c_run, budget, args.window, metric)
                slowdown = s["mean_ms_drift"] / s["mean_ms_quiet"]
                calm = calibration_conditions(s_run, c_run, n, args.window, own_ms, metric)
                row = {
                    "budget": name,
                    "budget_ms": budget,
                    "profile": profile,
                    "frames": n,
                    "static": s,
                    "controller": c,
                    "slowdown": slowdown,
                    "feasible": bool(cheap_ms * slowdown <= budget),
                    # > 1: the "quiet" thirds ran slower than calibration measured (a shared or noisy machine)
                    "quiet_vs_calibration": s["mean_ms_quiet"] / float(ref["mean_ms"]),
                    "calibration_conditions": calm,
                    "oracle": oracle(s["window_metric"], n, args.window, own_ms, budget, ctl_cascade.controller),
                    "controller_state": ctl_cascade.controller.state(),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                print(
                    f"| {name} ({budget:.3f} ms) | {profile} | {'yes' if row['feasible'] else 'no'} "
                    f"(×{slowdown:.2f}) | {100 * s['windows_over']:.0f}% / {100 * s['windows_over_drift']:.0f}% | "
                    f"{100 * c['windows_over']:.0f}% / {100 * c['windows_over_drift']:.0f}% | "
                    f"{100 * s['accuracy_quiet']:.2f}% | {100 * c['accuracy_quiet']:.2f}% | "
                    f"{c['switches_per_1000_quiet']:.1f} / {c['switches_per_1000']:.1f} | "
                    f"{s['mean_ms_drift']:.3f} | {c['mean_ms_drift']:.3f} | {row['quiet_vs_calibration']:.2f} | "
                    f"{calm['windows']} | {100 * calm['static_accuracy']:.2f}% | "
                    f"{100 * calm['controller_accuracy']:.2f}% | {row['oracle']['device_x_p50']:.2f} | "
                    f"{row['oracle']['fits_b_drop_pt']:+.2f} / {row['oracle']['meets_target_drop_pt']:+.2f} |",
                    flush=True,
                )
            ctl_cascade.close()
    finally:
        hogs.close()
        if ramp_hogs is not hogs:
            ramp_hogs.close()
    print(
        "columns: budget | profile | feasible (slowdown) | static windows > 1.1·B all / drift | controller same | "
        "static acc. quiet | controller acc. quiet | controller switches /1000 quiet / all | "
        "static mean ms drift | controller mean ms drift | static quiet mean / calibrated measured | "
        "windows at calibration conditions (outside the drift, static within 1.1x its calibrated latency) | "
        "static acc. there | controller acc. there | device slowdown outside the drift (median window, x the "
        "reference) | oracle's accuracy loss vs static outside the drift, pt: under B in every window / meeting "
        "the target (<= 10 % of windows over 1.1·B)"
    )
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "metric": metric,
                    "cheapest_ms": cheap_ms,
                    "window": args.window,
                    "own_ms": own_ms,
                    "calibration_measured": cal["measured"],
                    "quiet_wander": wander.tolist(),
                    "rows": rows,
                },
                f,
            )
        os.replace(tmp, args.json)
    if args.png:
        plot(rows, args.window, args.png)
        print(f"wrote {args.png}")


def plot(rows: list[dict], window: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    fig, axes = plt.subplots(
        len(budgets), len(profiles), figsize=(3.2 * len(profiles), 2.4 * len(budgets)), dpi=110, squeeze=False
    )
    for r in rows:
        ax = axes[budgets.index(r["budget"])][profiles.index(r["profile"])]
        for k in ("static", "controller"):
            y = r[k]["window_metric"]
            ax.plot((np.arange(len(y)) + 0.5) * window, y, ".-" if len(y) < 80 else "-", lw=0.8, ms=2, label=k)
        b, n = r["budget_ms"], r["frames"]
        ax.axhline(b, color="k", lw=0.8, label="B")
        ax.axhline(1.1 * b, color="gray", lw=0.8, ls=":", label="1.1·B")
        ax.axvspan(n // 3, 2 * n // 3, color="orange", alpha=0.15)
        ax.set_title(f"{r['profile']}, B={r['budget']} ({b:.3f} ms)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("frame (drift in the shaded middle third)", fontsize=8)
    fig.supylabel(f"latency per {window}-frame window (ms)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
