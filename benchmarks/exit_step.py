"""Does the cost model predict plans that evaluate many exits? Each rung of a calibration's ladder is
run for real by `calibrate` (interleaved with the chosen plan and the full model, on one scale), so
for every rung we have its measured mean latency beside two predictions from the same profile: the
cost model without the per-evaluated-exit step (`latency.exit_step_ms` = 0, as before it existed)
and with it. A model that misses per-exit work predicts the rungs that evaluate many exits too cheap:
its measured/predicted ratio rises with the exits a frame passes through. Flat is right.

    python benchmarks/exit_step.py ARTIFACT [--budget 50%] [--json out.json]

Runs `edgeexit calibrate` on ARTIFACT (a copy is calibrated; the artifact itself is not changed),
then reads the ladder, the profile and the cached exit statistics of the deciding frames.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgeexit.calibrate.optimizer import CostModel
from edgeexit.calibrate.run import run_calibration
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.plan import evaluated_mask, exit_positions


def _cost(cal: dict, k: int, step: float) -> CostModel:
    return CostModel.from_latency_block({**cal["latency"], "exit_step_ms": step}, k)


def _predicted(cost: CostModel, conf: np.ndarray, th) -> tuple[float, float]:
    """Mean predicted latency of ``th`` over the frames, and the mean number of exits a frame passes
    through (evaluated exits up to and including the one it leaves at)."""
    th = np.asarray(th, dtype=np.float64)
    ev = evaluated_mask(th)
    pos = exit_positions(conf, th)
    passed = np.cumsum(ev)[pos]
    return float(cost.exit_costs(ev)[pos].mean()), float(passed.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--budget", type=float, default=0.5, help="share of the full model (0.5 = 50%%)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--verify-images", type=int, default=300)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / args.artifact.name
        shutil.copytree(args.artifact, art)
        run_calibration(art, budget_fraction=args.budget, backend="onnxruntime", images=args.images,
                        verify_images=args.verify_images, accept_load=True)  # fmt: skip
        cal = Artifact.load(art).to_json()["calibration"]
        stats = sorted(art.glob("calibration_stats.*.npz"))
        with np.load(stats[-1]) as z:
            conf = z["confidence"]
    k = conf.shape[1]
    step = cal["latency"].get("exit_step_ms") or 0.0
    before, after = _cost(cal, k, 0.0), _cost(cal, k, step)
    rows = []
    for rung in cal["ladder"]:
        old, passed = _predicted(before, conf, rung["thresholds"])
        new, _ = _predicted(after, conf, rung["thresholds"])
        measured = rung["measured"]["mean_ms"]
        rows.append({"exits_passed": passed, "measured_ms": measured, "ratio_before": measured / old,
                     "ratio_after": measured / new})  # fmt: skip
    rows.sort(key=lambda r: r["exits_passed"])
    print(f"exit step {step * 1000:.1f} µs per evaluated exit; {k} exits; {len(rows)} rungs")
    print("exits passed  measured ms  measured/predicted before  after")
    for r in rows:
        print(
            f"{r['exits_passed']:12.2f}  {r['measured_ms']:11.3f}  {r['ratio_before']:25.3f}  {r['ratio_after']:5.3f}"
        )
    for name in ("ratio_before", "ratio_after"):
        x = np.array([r["exits_passed"] for r in rows])
        y = np.array([r[name] for r in rows])
        slope = float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else 0.0
        print(f"{name}: spread {y.max() / y.min():.3f}x (max/min), slope {slope:+.4f} per exit passed")
    if args.json:
        args.json.write_text(json.dumps({"exit_step_ms": step, "rungs": rows}, indent=1))


if __name__ == "__main__":
    main()
