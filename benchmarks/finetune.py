"""Camera models at 224 px: fine-tuning from torchvision ResNet18 weights vs from scratch, and the
cost of every exit (FLOPs and ONNX Runtime CPU latency) at width 1 with the ImageNet stem.

    python benchmarks/finetune.py [--init ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth]

Data: the tests' ImageFolder of real photographs (tests/conftest.py: photo_folder; three classes
cut from the photographs matplotlib ships, 30 training + 4 test images each, any size → 224 px).
Weights: without --init, a torchvision `resnet18(weights=None)` built here with a fixed seed (no
download is possible here) — that exercises the whole mechanism, but random weights carry no
ImageNet knowledge, so do not read the accuracy gap as the benefit of pretraining.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default=None, help="a torchvision ResNet18 state_dict (default: a seeded random one)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-cost", action="store_true", help="skip the export + latency table")
    ap.add_argument("--out", default="runs/finetune")
    args = ap.parse_args()

    import torch
    import torchvision
    from conftest import photo_folder

    from edgeexit.train.evaluation import evaluate_checkpoint
    from edgeexit.train.trainer import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = photo_folder(out / "photos", train_per_class=30)
    init = args.init
    if init is None:
        torch.manual_seed(0)
        init = str(out / "resnet18-seeded.pth")
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), init)
    results = {}
    # from scratch: the same recipe, except that a random backbone learns at the heads' rate
    for name, extra in (("init", {"init": init}), ("scratch", {"stem": "imagenet", "backbone_lr_scale": 1.0})):
        cfg = TrainConfig.from_recipe(
            str(data), "mlcsd", out=str(out / name), epochs=args.epochs, batch_size=args.batch_size, force=True, **extra
        )
        r = train(cfg, progress=False)
        ev = evaluate_checkpoint(out / name / "model.pt")
        results[name] = {
            "test_accuracy_per_exit": [e["accuracy"] for e in ev["exits"]],
            "final_exit": ev["exits"][-1]["accuracy"],
            "average": ev["average_accuracy"],
            "images_per_s": r["images_per_s"],
            "recipe": {k: getattr(cfg.recipe, k) for k in ("lr", "backbone_lr_scale", "crop", "normalize", "epochs")},
        }
        print(name, json.dumps(results[name]), flush=True)
    results["cost"] = [] if args.no_cost else exit_costs(out / "init" / "model.pt", out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results)


def exit_costs(model_pt: Path, out: Path) -> list[dict]:
    """FLOPs (from the modules) and ORT CPU latency (edgeexit bench, batch 1) of every exit."""
    from edgeexit.bench import bench_cascade
    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.models import cumulative_exit_flops
    from edgeexit.runtime import Cascade
    from edgeexit.train.checkpoint import load_checkpoint

    manifest, art = export_checkpoint(model_pt, out=out / "model.edgeexit", force=True, parity_images=8)
    flops = cumulative_exit_flops(load_checkpoint(model_pt)["units"])
    b = bench_cascade(Cascade.load(art, backend="onnxruntime"), repeats=100, images=0)
    return [
        {"exit": e["exit"], "cumulative_gflops": flops[i] / 1e9, "cumulative_p50_ms": e["cumulative_p50_ms"]}
        for i, e in enumerate(b["exits"])
    ]


def print_tables(results: dict) -> None:
    print("\n| start | final exit | average over exits | per exit |")
    print("|---|---|---|---|")
    for name in ("init", "scratch"):
        r = results[name]
        per = " / ".join(f"{100 * a:.0f}" for a in r["test_accuracy_per_exit"])
        print(f"| {name} | {100 * r['final_exit']:.1f}% | {100 * r['average']:.1f}% | {per} |")
    print("\n| exit | cumulative GFLOPs | cumulative p50 ms (ORT CPU, batch 1) |")
    print("|---|---|---|")
    for c in results["cost"]:
        print(f"| {c['exit']} | {c['cumulative_gflops']:.3f} | {c['cumulative_p50_ms']:.2f} |")


if __name__ == "__main__":
    main()
