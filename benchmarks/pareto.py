"""The honest Pareto front: the calibrated MLCSD cascade vs static networks of the same latency.

    python benchmarks/pareto.py runs/quickstart/model.pt --png docs/pareto.png

1. Static baselines, trained with the same recipe as the cascade (Fashion-MNIST fast recipe,
   --epochs, --train-images) at several widths: a network used only at its final exit, trained with
   CE on that exit alone (method ce, γ = 0), exported FP32 and INT8.
2. The MLCSD model (the given checkpoint) exported FP32 and INT8 and calibrated on each precision
   (ONNX Runtime CPU, 1 thread): the --ladder (32) plans of the calibration ladder are its operating points.
3. Everything timed frame by frame (`Cascade.predict`, preprocessing included) on the same test
   images, in interleaved rounds (median latency), with accuracy on those images.
Prints a table and, at each static network's latency, the best cascade plan that is no slower.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def export(model_pt: Path, out: Path) -> Path:
    from edgeexit.export.exporter import export_checkpoint

    _, art = export_checkpoint(model_pt, out=out, force=True, int8=True, parity_images=64)
    return art


def train_static(width: float, out: Path, epochs: int, limit: int, reuse: bool = False) -> Path:
    from edgeexit.train.trainer import TrainConfig, train

    if reuse and (out / "model.pt").is_file():
        return out / "model.pt"
    cfg = TrainConfig.from_recipe(
        "fashion-mnist", "ce", out=str(out), epochs=epochs, width=width, train_images=limit, gamma=0.0, force=True
    )
    train(cfg, progress=False)
    return out / "model.pt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", help="the MLCSD model.pt (e.g. runs/quickstart/model.pt)")
    ap.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.1875, 0.25])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ladder", type=int, default=32, help="budgets in the calibration ladder (operating points)")
    ap.add_argument("--out", default="runs/pareto")
    ap.add_argument("--png", default=None)
    ap.add_argument("--reuse", action="store_true", help="keep static baselines already trained in --out")
    args = ap.parse_args()

    from edgeexit.calibrate.run import run_calibration
    from edgeexit.data import load_dataset
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan
    from edgeexit.runtime.profiling import verify

    out = Path(args.out)
    test = load_dataset("fashion-mnist", "test")
    frames = test.images[: args.images].permute(0, 2, 3, 1).numpy()
    labels = test.labels[: args.images].numpy()
    points = {}  # name -> (cascade, plan)
    for w in args.widths:
        art = export(
            train_static(w, out / f"static_{w}", args.epochs, args.train_images, args.reuse),
            out / f"static_{w}.edgeexit",
        )
        for prec in ("fp32", "int8"):
            c = Cascade.load(art, backend="onnxruntime", precision=prec)
            points[f"static w={w:g} {prec}"] = (c, CascadePlan.full_model(c.num_exits))
    mlcsd = export(Path(args.checkpoint), out / "mlcsd.edgeexit")
    for prec in ("fp32", "int8"):
        # the ladder (--ladder plans from the cheapest cascade up) does not depend on the budget
        cal = run_calibration(
            mlcsd,
            budget_fraction=0.9,
            backend="onnxruntime",
            precision=prec,
            iso_accuracy=False,
            ladder_steps=args.ladder,
        )
        c = Cascade.load(mlcsd, backend="onnxruntime", precision=prec)
        seen = set()
        for row in cal["ladder"]:
            key = tuple(row["thresholds"])
            if key not in seen:
                seen.add(key)
                points[f"cascade {prec} @{row['budget_ms']:.3f}ms"] = (
                    c,
                    CascadePlan.from_thresholds(row["thresholds"]),
                )
        points[f"MLCSD full model {prec}"] = (c, CascadePlan.full_model(c.num_exits))
    results = {name: {"ms": [], "accuracy": None} for name in points}
    for _ in range(args.rounds):  # interleaved: machine drift hits every point alike
        for name, (c, plan) in points.items():
            v = verify(c, frames, labels, plan)
            results[name]["ms"].append(v["mean_ms"])
            results[name]["accuracy"] = v["accuracy"]
    rows = sorted(
        ({"name": k, "ms": float(np.median(v["ms"])), "accuracy": v["accuracy"]} for k, v in results.items()),
        key=lambda r: r["ms"],
    )
    (out / "pareto.json").write_text(json.dumps(rows, indent=2))
    report(rows)
    if args.png:
        plot(rows, args.png)


def report(rows: list[dict]) -> None:
    print("| model | precision | accuracy | mean ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {'int8' if 'int8' in r['name'] else 'fp32'} | "
            f"{100 * r['accuracy']:.2f}% | {r['ms']:.3f} |"
        )
    print("\nAt each static network's latency, the best cascade plan of the same precision that is no slower:")
    for s in (r for r in rows if r["name"].startswith("static")):
        prec = "int8" if "int8" in s["name"] else "fp32"
        ours = [r for r in rows if r["name"].startswith((f"cascade {prec}", f"MLCSD full model {prec}"))]
        faster = [r for r in ours if r["ms"] <= s["ms"]]
        if not faster:
            print(f"- {s['name']} ({s['ms']:.3f} ms, {100 * s['accuracy']:.2f}%): no cascade plan is this fast")
            continue
        best = max(faster, key=lambda r: r["accuracy"])
        gap = 100 * (best["accuracy"] - s["accuracy"])
        print(
            f"- {s['name']} ({s['ms']:.3f} ms, {100 * s['accuracy']:.2f}%): cascade {best['ms']:.3f} ms, "
            f"{100 * best['accuracy']:.2f}% → {gap:+.2f} pt"
        )


def plot(rows: list[dict], path: str) -> None:
    from plotting import figure, finish

    fig, ax = figure((7, 4.2))
    for prefix, marker in (("cascade fp32", "o-"), ("cascade int8", "s-"), ("static", "^"), ("MLCSD full", "*")):
        for prec in ("fp32", "int8"):
            pts = [r for r in rows if r["name"].startswith(prefix) and prec in r["name"]]
            if prefix.startswith("cascade") and prec not in prefix:
                continue
            if pts:
                ax.plot(
                    [p["ms"] for p in pts],
                    [100 * p["accuracy"] for p in pts],
                    marker,
                    ms=6 if "*" not in marker else 11,
                    label=f"{prefix} {prec}" if not prefix.startswith("cascade") else prefix,
                    alpha=0.85,
                )
    finish(fig, ax, path, "mean latency per frame (ms, ORT CPU, 1 thread)", "test accuracy (%)")


if __name__ == "__main__":
    main()
