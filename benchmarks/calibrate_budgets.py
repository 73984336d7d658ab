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

    from edgeexit.calibrate.run import run_calibration
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.bench import bench_cascade

    work = Path(tempfile.mkdtemp()) / "cal.edgeexit"
    shutil.copytree(args.artifact, work)
    cascade = Cascade.load(work, backend=args.backend)
    b = bench_cascade(cascade, repeats=500, num_images=0)
    full_cascade = b["full_cascade_ms"]
    cascade.close()
    print(f"full cascade (every unit, batch 1, predict path excluded): {full_cascade:.3f} ms; "
          f"backbone + final head through Cascade.predict: {b['backbone_and_final_head_ms']:.3f} ms\n")
    print("| budget | ms | predicted acc / ms | measured acc | measured mean ms | measured / budget | "
          "MSDNet acc / ms (measured) | exits evaluated |")
    print("|---|---|---|---|---|---|---|---|")
    iso = None
    for i, f in enumerate(args.fractions):
        r = run_calibration(work, budget_ms=f * full_cascade, backend=args.backend, iso_accuracy=i == 0)
        iso = iso or r["iso_accuracy"]
        m, p, base = r["measured"], r["predicted"], r["baseline_msdnet"]
        base_txt = f"{100 * base['accuracy']:.2f}% / {base['latency_ms']:.3f}" if base else "infeasible"
        print(f"| {100 * f:.0f}% | {r['budget_ms']:.3f} | {100 * p['accuracy']:.2f}% / {p['latency_ms']:.3f} | "
              f"{100 * m['accuracy']:.2f}% | {m['mean_ms']:.3f} | {m['mean_ms'] / r['budget_ms']:.2f} | {base_txt} | "
              f"{r['evaluated_exits']} |", flush=True)
    full = r["full_model"]["measured"]
    print(f"\nfull model on the verification half: {100 * full['accuracy']:.2f}% at {full['mean_ms']:.3f} ms mean")
    if iso:
        im = iso["measured"]
        print(f"iso-accuracy (within 0.5 pt of the final exit on the calibration half): measured "
              f"{100 * im['accuracy']:.2f}% at {im['mean_ms']:.3f} ms = {iso['latency_fraction_of_full']:.2f}× the full "
              f"model's mean latency (drop vs full model on verification: "
              f"{100 * iso['accuracy_drop_vs_full_measured']:.2f} pt)")


if __name__ == "__main__":
    main()
