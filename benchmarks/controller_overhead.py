"""What the budget controller costs per frame (issue 21; target ≤ 2 µs over a static cascade).

    python benchmarks/controller_overhead.py runs/e1/model.edgeexit --frames 20000

1. ``BudgetController.observe`` alone on a synthetic ladder (no model): ns per call, windows and
   the per-window decision included (it is amortised over the window's frames).
2. ``Cascade.predict`` static vs ``budget_ms=`` a large budget with the controller trimmed to
   the calibrated plan alone (every decision runs, the plan cannot move: both run the same plan),
   in rounds of 500 frames each, the order random per round, median of the rounds' per-frame
   difference with a bootstrap interval, beside an A/A difference (a second static cascade) that
   shows this machine's noise floor in the same run (artifact given).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np


def observe_ns(frames: int) -> float:
    from edgeexit.runtime.controller import BudgetController, Rung

    ladder = [Rung(i, 0.1 * (i + 1), 0.5 + 0.01 * i, calibrated=(i == 10)) for i in range(16)]
    ctl = BudgetController(ladder, 1.1, measured_ms=1.1, noise=0.03)
    rng = random.Random(0)
    lat = [1.0 + 0.05 * rng.random() for _ in range(frames)]
    ex = [1 + rng.randrange(8) for _ in range(frames)]
    obs = ctl.observe
    t0 = time.perf_counter_ns()
    for v, e in zip(lat, ex, strict=True):
        obs(v, e)
    loop = time.perf_counter_ns() - t0
    t0 = time.perf_counter_ns()
    for _v, _e in zip(lat, ex, strict=True):  # the bare loop, subtracted
        pass
    return (loop - (time.perf_counter_ns() - t0)) / frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--frames", type=int, default=20000)
    args = ap.parse_args()
    print(f"BudgetController.observe: {observe_ns(args.frames * 10):.0f} ns per frame (median of 1 run)")
    if not args.artifact:
        return
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.artifact import Artifact

    cal = Artifact.load(args.artifact).calibration.to_dict()
    frame = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    static = Cascade.load(args.artifact, backend="onnxruntime")
    big = 100 * float(cal["full_model"]["predicted_ms"])  # the calibrated plan fits; nothing moves
    ctl = Cascade.load(args.artifact, backend="onnxruntime", budget_ms=big)
    k = ctl.controller  # one rung (the calibrated plan): every decision runs, the plan cannot move
    a = k.anchor if k.anchor is not None else k.index
    k.ladder, k.quiet_ms, k._learned, k._seen = [k.ladder[a]], [k.quiet_ms[a]], [True], [0]
    k._fixed, k._tables = [True], [k._tables[a]]
    k.anchor = k.index = 0
    k._expect = k._tables[0]
    k._set_trip()
    ctl.plan = k.plan
    static.set_thresholds(ctl.plan)
    twin = Cascade.load(args.artifact, backend="onnxruntime", thresholds=list(ctl.plan.thresholds))  # A/A
    cascades = {"static": static, "twin": twin, "controller": ctl}
    for c in cascades.values():
        for _ in range(500):
            c.predict(frame)
    rng = np.random.default_rng(1)
    ab, aa = [], []
    for _ in range(max(1, args.frames // 500)):
        per = {}
        for name in rng.permutation(list(cascades)):  # a fresh order every round: no position bias
            c = cascades[name]
            t0 = time.perf_counter()
            for _ in range(500):
                c.predict(frame)
            per[name] = (time.perf_counter() - t0) / 500
        ab.append(per["controller"] - per["static"])
        aa.append(per["twin"] - per["static"])

    def ci(d: list) -> str:
        d = np.asarray(d) * 1e6
        boot = np.median(rng.choice(d, (2000, len(d))), axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return f"median {np.median(d):+.2f} µs [95 % bootstrap {lo:+.2f}, {hi:+.2f}]"

    print(
        f"Cascade.predict, {len(ab)} rounds of 500 frames in a random order (static {1e3 * per['static']:.3f} "
        f"ms/frame): controller − static {ci(ab)}; the A/A noise floor, a second static cascade − static, "
        f"{ci(aa)}; switches {ctl.controller.switches}"
    )


if __name__ == "__main__":
    main()
