"""CE vs SD vs MLCSD (and optionally BYOT) on Fashion-MNIST with one recipe and several seeds.

    python benchmarks/train_methods.py --epochs 2 --train-images 20000 --seeds 0 1 --out runs/bench_methods

Prints a markdown table (per-exit test accuracy and the average over exits, mean over seeds) and
writes the raw numbers to OUT/results.json. Model selection uses the held-out split only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["ce", "sd", "mlcsd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--out", default="runs/bench_methods")
    args = ap.parse_args()

    from edgeexit.data import load_dataset
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgeexit.train.evaluation import anytime_accuracy, exit_outputs
    from edgeexit.train.trainer import TrainConfig, train

    test = load_dataset("fashion-mnist", "test")
    rows = {}
    for method in args.methods:
        for seed in args.seeds:
            out = Path(args.out) / f"{method}_s{seed}"
            cfg = TrainConfig.from_recipe(
                "fashion-mnist",
                method,
                out=str(out),
                seed=seed,
                epochs=args.epochs,
                train_images=args.train_images,
                width=args.width,
                exits=8,
                force=True,
            )
            t0 = time.perf_counter()
            r = train(cfg, progress=False)
            model = model_from_checkpoint(load_checkpoint(out / "model.pt"))
            acc = anytime_accuracy(exit_outputs(model, test)["correct"])
            rows.setdefault(method, []).append(
                {
                    "seed": seed,
                    "exit_accuracy": acc,
                    "average": float(np.mean(acc)),
                    "train_s": time.perf_counter() - t0,
                    "images_per_s": r["images_per_s"],
                }
            )
            print(f"{method} seed {seed}: avg {np.mean(acc):.4f} final {acc[-1]:.4f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    k = len(next(iter(rows.values()))[0]["exit_accuracy"])
    print("\n| method | " + " | ".join(f"exit {i + 1}" for i in range(k)) + " | average |")
    print("|---" * (k + 2) + "|")
    for method, runs in rows.items():
        accs = np.array([r["exit_accuracy"] for r in runs])
        avgs = np.array([r["average"] for r in runs])
        cells = [f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in zip(accs.mean(0), accs.std(0), strict=True)]
        print(f"| {method} | " + " | ".join(cells) + f" | **{100 * avgs.mean():.2f} ± {100 * avgs.std():.2f}** |")


if __name__ == "__main__":
    main()
