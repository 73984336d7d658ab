"""How often does "at most X pt below the full model" hold on images the choice never saw?

    python benchmarks/accuracy_promise.py runs/quickstart/model.edgeexit --resplits 20

On a calibrated artifact (its latency table gives the cost model): every exit's confidence and
correctness on the whole held-out split (5,000 images for the quickstart model) through the real
ONNX Runtime units, then for each of N random calibration/verification re-splits and each target:
the candidate plans (the optimiser's best at 16 budgets, as `calibrate --max-drop` builds them),
the plan chosen with the guard and the plain "cheapest whose calibration drop is within the
target", and each one's drop measured on the verification half (exact: the runtime applies the
same rule, tested). Reports the share of re-splits where the verified drop exceeds the target,
and the mean predicted latency as a fraction of the full model's.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--resplits", type=int, default=20)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="in percentage points")
    ap.add_argument("--confidence", type=float, default=0.95)
    args = ap.parse_args()

    from edgeexit.calibrate.optimizer import CostModel, evaluate
    from edgeexit.calibrate.promise import candidate_plans, choose_within_drop
    from edgeexit.calibrate.run import load_frames
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan, head_name, segment_name

    cascade = Cascade.load(args.artifact, backend="onnxruntime")
    cal = cascade.manifest.get("calibration")
    if not cal:
        raise SystemExit("calibrate the artifact first (its latency table is the cost model)")
    frames, labels, _ = load_frames(cascade.manifest, None, "heldout", None)
    stats = cascade.exit_statistics(cascade.preprocess.batch(frames))
    conf, correct = stats["confidence"], stats["prediction"] == labels[:, None]
    k, units = cascade.num_exits, cal["latency"]["units"]
    cost = CostModel(
        [units[segment_name(p)]["mean_ms"] for p in range(k)],
        [units[head_name(p)]["mean_ms"] for p in range(k)],
        cal["latency"]["decision_ms"],
        cal["latency"]["frame_overhead_ms"],
    )
    full_plan = CascadePlan.full_model(k)
    rows = {(t, g): {"violations": 0, "ratio": [], "verified": []} for t in args.targets for g in (True, False)}
    n = len(labels)
    for r in range(args.resplits):
        perm = np.random.default_rng(1000 + r).permutation(n)
        c_idx, v_idx = perm[: n // 2], perm[n // 2 :]
        cc, vc = conf[c_idx], conf[v_idx]
        ccor, vcor = correct[c_idx], correct[v_idx]
        candidates = candidate_plans(cc, ccor, cost, cost.full_ms())
        plans = [c.plan for c in candidates]
        on_cal = [ccor[np.arange(len(c_idx)), p.exit_positions(cc)] for p in plans]
        is_full = [p.to_list() == full_plan.to_list() for p in plans]
        for t in args.targets:
            for guard in (True, False):
                choice = choose_within_drop(
                    ccor[:, -1],
                    on_cal,
                    [c.latency_ms for c in candidates],
                    t / 100,
                    args.confidence,
                    n_new=len(v_idx),
                    guard=guard,
                    is_full_model=is_full,
                )
                plan = plans[choice.index]
                verified = vcor[:, -1].mean() - vcor[np.arange(len(v_idx)), plan.exit_positions(vc)].mean()
                row = rows[(t, guard)]
                row["violations"] += verified > t / 100 + 1e-12
                row["verified"].append(100 * verified)
                row["ratio"].append(evaluate(vc, vcor, cost, plan.thresholds).mean_ms / cost.full_ms())
        print(f"re-split {r + 1}/{args.resplits} done", flush=True)
    print(
        f"\n{args.resplits} re-splits of {n} held-out images ({n // 2} calibration / {n - n // 2} verification), "
        f"confidence {args.confidence}"
    )
    print("| target | choice | verified drop > target | mean verified drop (pt) | mean latency / full model |")
    print("|---|---|---|---|---|")
    for t in args.targets:
        for guard in (True, False):
            row = rows[(t, guard)]
            print(
                f"| {t:.2f} pt | {'guard' if guard else 'plain (calibration drop ≤ target)'} | "
                f"{row['violations']}/{args.resplits} = {100 * row['violations'] / args.resplits:.0f}% | "
                f"{np.mean(row['verified']):.2f} | {np.mean(row['ratio']):.3f} |"
            )


if __name__ == "__main__":
    main()
