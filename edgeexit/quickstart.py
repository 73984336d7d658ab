"""`edgeexit quickstart`: train → eval → export → calibrate → run, on Fashion-MNIST, on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path


def run_quickstart(
    out: Path,
    budget_ms: float | None = None,
    budget_fraction: float | None = 0.5,
    epochs: int = 2,
    limit_train: int | None = 20000,
    width: float = 0.25,
    data_dir: str | None = None,
    console=None,
    out_console=None,
    run_images: int = 1000,
) -> dict:
    from rich.panel import Panel

    from edgeexit.calibrate.report import calibration_table
    from edgeexit.calibrate.run import run_calibration, verify
    from edgeexit.data import load_dataset
    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.export.report import info_table
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgeexit.train.evaluation import evaluate
    from edgeexit.train.report import budgeted_plot, eval_table
    from edgeexit.train.trainer import TrainConfig, train
    from edgeexit.util import atomic_write_json

    out = Path(out)
    show = out_console.print if out_console is not None else print
    say = console.print if console is not None else print
    load_dataset("fashion-mnist", "test", data_dir)  # fail early, with the install hint, if the data is missing
    t0 = time.perf_counter()
    timings = {}

    say(
        f"[bold cyan]1/5 train[/] MLCSD, 8 exits, width {width}, {epochs} epoch(s) on "
        f"{limit_train or 'all'} Fashion-MNIST images"
    )
    cfg = TrainConfig.from_recipe(
        "fashion-mnist",
        "mlcsd",
        out=str(out),
        data_dir=data_dir,
        epochs=epochs,
        width=width,
        exits=8,
        limit_train=limit_train,
    )
    train(cfg, console=console)
    timings["train_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    say("[bold cyan]2/5 eval[/] anytime accuracy and the budgeted-batch curve on the test split")
    ckpt = load_checkpoint(out / "model.pt")
    from edgeexit.data.datasets import load_heldout

    test = load_dataset("fashion-mnist", "test", data_dir)
    ev = evaluate(model_from_checkpoint(ckpt), test, load_heldout(ckpt["split"], data_dir, "fashion-mnist"))
    ev["dataset"] = "fashion-mnist"
    show(eval_table(ev))
    budgeted_plot(ev, out / "budgeted.png")
    atomic_write_json(out / "eval.json", ev)
    timings["eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[bold cyan]3/5 export[/] one ONNX file per unit, parity against PyTorch")
    manifest, artifact = export_checkpoint(
        out / "model.pt", out=out / "model.edgeexit", force=True, data_dir=data_dir, console=console
    )
    show(info_table(manifest, artifact))
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[bold cyan]4/5 calibrate[/] latency measured on this CPU with ONNX Runtime; thresholds for the budget")
    cal = run_calibration(
        artifact,
        budget_ms=budget_ms,
        budget_fraction=None if budget_ms else budget_fraction,
        backend="onnxruntime",
        data_dir=data_dir,
        console=console,
    )
    show(calibration_table(cal))
    atomic_write_json(out / "calibration.json", {k: v for k, v in cal.items()})
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"[bold cyan]5/5 run[/] the calibrated cascade on {run_images} test images, one frame at a time")
    cascade = Cascade.load(artifact, backend="onnxruntime")
    frames = test.images[:run_images].permute(0, 2, 3, 1).numpy()
    labels = test.labels[:run_images].numpy()
    calibrated = verify(cascade, frames, labels, cascade.plan)
    full = verify(cascade, frames, labels, CascadePlan.full_model(cascade.num_exits))
    cascade.close()
    timings["run_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    summary = {
        "artifact": str(artifact),
        "budget_ms": cal["budget_ms"],
        "thresholds": cal["thresholds"],
        "evaluated_exits": cal["evaluated_exits"],
        "test": {
            "images": run_images,
            "accuracy": calibrated["accuracy"],
            "mean_ms": calibrated["mean_ms"],
            "p95_ms": calibrated["p95_ms"],
            "exit_histogram": calibrated["exit_histogram"],
        },
        "full_model_test": {"accuracy": full["accuracy"], "mean_ms": full["mean_ms"]},
        "speedup": full["mean_ms"] / calibrated["mean_ms"],
        "calibration": {
            "predicted": cal["predicted"],
            "measured": cal["measured"],
            "baseline_msdnet": cal["baseline_msdnet"],
            "iso_accuracy": cal["iso_accuracy"],
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "quickstart.json", summary)
    th = ", ".join("skip" if x > 1 else f"{x:.3f}" for x in cal["thresholds"][:-1]) + ", accept"
    show(
        Panel.fit(
            f"budget [bold]{cal['budget_ms']:.3f} ms[/] per image (mean, ONNX Runtime on this CPU)\n"
            f"thresholds [{th}] — exits evaluated: {cal['evaluated_exits']}\n"
            f"test ({run_images} images, one frame at a time): accuracy "
            f"[bold]{100 * calibrated['accuracy']:.2f}%[/], mean [bold]{calibrated['mean_ms']:.3f} ms[/], "
            f"p95 {calibrated['p95_ms']:.3f} ms\n"
            f"full model: accuracy {100 * full['accuracy']:.2f}%, mean {full['mean_ms']:.3f} ms → speed-up "
            f"[bold]{summary['speedup']:.2f}×[/]\n"
            f"exit histogram: {json.dumps(summary['test']['exit_histogram'])}\n"
            f"artifact: {artifact}  (embed it: Cascade.load('{artifact}'))\n"
            f"took {timings['total_s'] / 60:.1f} min: "
            + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items() if k != "total_s"),
            title="edgeexit quickstart",
        )
    )
    return summary
