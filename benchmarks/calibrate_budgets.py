"""Calibration at budgets of 40/60/80% of the full-cascade latency (every unit run, batch 1).

    python benchmarks/calibrate_budgets.py runs/quickstart/model.edgeexit --fractions 0.4 0.6 0.8

For each budget: the chosen thresholds' predicted and measured (verification half, real cascade)
accuracy and mean latency, the MSDNet geometric thresholds at the same budget, and the iso-accuracy
speed-up (mean latency within 0.5 pt of the final exit / full model latency).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()

    from edgeexit.bench import bench_cascade
    from edgeexit.calibrate.run import run_calibration
    from edgeexit.runtime import Cascade

    work = Path(tempfile.mkdtemp()) / "cal.edgeexit"
    shutil.copytree(args.artifact, work)
    cascade = Cascade.load(work, backend=args.backend)
    b = bench_cascade(cascade, repeats=500, images=0)
    full_cascade = b["full_cascade_ms"]
    cascade.close()
    print(
        f"full cascade (every unit, batch 1, predict path excluded): {full_cascade:.3f} ms; "
        f"backbone + final head through Cascade.predict: {b['backbone_and_final_head_ms']:.3f} ms\n"
    )
    print(
        "| budget | ms | predicted acc / ms | measured acc | measured mean ms | measured / budget | "
        "MSDNet acc / ms (measured) | exits evaluated |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for f in args.fractions:
        r = run_calibration(work, budget_ms=f * full_cascade, backend=args.backend, iso_accuracy=False)
        m, p, base = r["measured"], r["predicted"], r["baseline_msdnet"]
        base_txt = f"{100 * base['accuracy']:.2f}% / {base['latency_ms']:.3f}" if base else "infeasible"
        print(
            f"| {100 * f:.0f}% | {r['budget_ms']:.3f} | {100 * p['accuracy']:.2f}% / {p['latency_ms']:.3f} | "
            f"{100 * m['accuracy']:.2f}% | {m['mean_ms']:.3f} | {m['mean_ms'] / r['budget_ms']:.2f} | {base_txt} | "
            f"{r['evaluated_exits']} |",
            flush=True,
        )
    full = r["full_model"]["measured"]
    print(f"\nfull model on the verification half: {100 * full['accuracy']:.2f}% at {full['mean_ms']:.3f} ms mean")
    iso_sweep(work, args.backend, full)


def iso_sweep(work: Path, backend: str, full: dict) -> None:
    """Cheapest budget whose thresholds (always chosen on the calibration half) keep the *measured*
    verification accuracy within 0.5 pt of the full model's measured verification accuracy."""
    import numpy as np

    from edgeexit.calibrate.optimizer import CostModel, evaluate, optimize
    from edgeexit.data import split_calibration
    from edgeexit.data.frames import load_frames
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan, head_name, segment_name
    from edgeexit.runtime.profiling import verify

    cascade = Cascade.load(work, backend=backend)
    cal = cascade.artifact.calibration.to_dict()
    frames, labels, _ = load_frames(cascade.artifact, None, "heldout", None)
    c, v = split_calibration(np.arange(len(labels)), 0)
    sc = cascade.exit_statistics(cascade.preprocessor.batch(frames[c]))
    sv = cascade.exit_statistics(cascade.preprocessor.batch(frames[v]))
    cc, cv = sc["prediction"] == labels[c][:, None], sv["prediction"] == labels[v][:, None]
    u, k = cal["latency"]["units"], cascade.num_exits
    cost = CostModel(
        [u[segment_name(i)]["mean_ms"] for i in range(k)],
        [u[head_name(i)]["mean_ms"] for i in range(k)],
        cal["latency"]["decision_ms"],
        cal["latency"]["frame_overhead_ms"],
    )
    target = full["accuracy"] - 0.005
    print("\n| budget / full model (predicted) | calibration acc | verification acc (exact, from exit statistics) |")
    print("|---|---|---|")
    chosen = None
    for f in np.arange(0.30, 1.001, 0.05):
        if f * cost.full_ms() < cost.min_ms():
            continue  # below the cheapest cascade
        sol, _ = optimize(sc["confidence"], cc, cost, f * cost.full_ms())
        acc_v = evaluate(sv["confidence"], cv, cost, sol.thresholds).accuracy
        print(f"| {f:.2f} | {100 * sol.accuracy:.2f}% | {100 * acc_v:.2f}% |")
        if chosen is None and acc_v >= target:
            chosen = (f, sol)
    if chosen is None:
        print("no budget keeps the verification accuracy within 0.5 pt of the full model")
        return
    # Interleaved rounds, medians: the full model and the iso point see the same machine state.
    skip_all = CascadePlan.full_model(k)
    rounds = [
        (verify(cascade, frames[v], labels[v], skip_all), verify(cascade, frames[v], labels[v], chosen[1].thresholds))
        for _ in range(3)
    ]
    full_ms = float(np.median([f["mean_ms"] for f, _ in rounds]))
    iso_ms = float(np.median([m["mean_ms"] for _, m in rounds]))
    full_acc, iso_acc = rounds[0][0]["accuracy"], rounds[0][1]["accuracy"]
    print(
        f"\niso-accuracy: budget {chosen[0]:.2f}× the full model (thresholds chosen on the calibration half); "
        f"measured on the verification half with the real cascade, median of 3 interleaved rounds: "
        f"{100 * iso_acc:.2f}% (full model {100 * full_acc:.2f}%) at {iso_ms:.3f} ms mean = "
        f"{iso_ms / full_ms:.2f}× the full model's {full_ms:.3f} ms"
    )


if __name__ == "__main__":
    main()
