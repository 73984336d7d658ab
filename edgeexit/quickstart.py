"""`edgeexit quickstart`: train → eval → export → calibrate → run, on Fashion-MNIST, on a CPU."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Quickstart:
    out: Path
    data_dir: str | None
    say: object
    show: object
    console: object
    timings: dict = field(default_factory=dict)

    def step(self, key: str, t0: float) -> None:
        self.timings[key] = time.perf_counter() - t0


def run_quickstart(
    out: Path,
    budget_ms: float | None = None,
    budget_fraction: float | None = None,
    max_drop: float | None = 0.005,
    epochs: int = 2,
    train_images: int | None = 20000,
    width: float = 0.25,
    data_dir: str | None = None,
    console=None,
    out_console=None,
    test_images: int = 10000,
    force: bool = False,
) -> dict:
    from edgeexit.data import load_dataset
    from edgeexit.errors import UserError

    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    if Path(out).resolve() == Path.cwd().resolve() or Path(out).is_file():
        raise UserError(f"--out {out} must be a folder of its own for the run (e.g. runs/quickstart)")
    _check_out(Path(out), force)
    test = load_dataset("fashion-mnist", "test", data_dir)  # fail early, with the install hint, if missing
    _claim(Path(out))
    q = _Quickstart(
        Path(out),
        data_dir,
        console.print if console is not None else print,
        out_console.print if out_console is not None else print,
        console,
    )
    t0 = time.perf_counter()
    _train(q, epochs, width, train_images)
    _evaluate(q, test)
    artifact = _export(q)
    if budget_ms is not None or budget_fraction is not None:
        max_drop = None  # the budget mode, one flag away: `edgeexit quickstart --budget 60%`
    elif max_drop is None:
        raise UserError("give the quickstart a promise (--max-drop 0.5pt) or a budget (--budget 60%)")
    cal = _calibrate(q, artifact, budget_ms, budget_fraction, max_drop)
    measured = _run(q, artifact, test, test_images)
    q.timings["total_s"] = time.perf_counter() - t0
    summary = _summary(q, artifact, cal, measured, test_images)
    _panel(q, summary, cal, test_images)
    return summary


_RUN_FILES = ("model.pt", "last.pt", "model.edgeexit", "quickstart.json")
_WRITES = ("model.pt", "last.pt", "model.edgeexit", "eval.json", "budgeted.png", "calibration.json", "quickstart.json")
# Left in a folder the quickstart made its own: only such a folder's files are replaced with --force.
MARKER = ".edgeexit-quickstart"


def _check_out(out: Path, force: bool) -> None:
    """Like `train`: a run already in OUT is replaced only with --force, and only in a folder the
    quickstart wrote (its marker, or the quickstart.json of an older run): a user's own eval.json or
    model.pt in OUT is never overwritten. Every file it writes there must be writable as a regular
    file, and OUT itself a folder or a path to make one at (not a link to nothing), checked before
    training starts."""
    from edgeexit.errors import UserError
    from edgeexit.util import check_output_path

    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out} is a link to nothing ({out.readlink()}): give a folder, or a path to make one")
    owned = (out / MARKER).is_file() or (out / "quickstart.json").is_file()
    taken = [name for name in _WRITES if (out / name).exists() or (out / name).is_symlink()]
    if taken and not owned:
        raise UserError(
            f"--out {out} holds {', '.join(taken)}, which the quickstart did not write there: choose another --out "
            "(--force replaces only a quickstart's own run)"
        )
    found = [name for name in _RUN_FILES if name in taken]
    if found and not force:
        raise UserError(
            f"--out {out} already holds a run ({', '.join(found)}): add --force to replace it, or choose another --out"
        )
    for name in _WRITES:
        if name != "model.edgeexit":
            check_output_path(out / name, f"--out {out}:")


def _claim(out: Path) -> None:
    """Make OUT the quickstart's: the folder and its marker, before anything else is written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `edgeexit quickstart`: --force may replace this folder's run\n")


def _train(q: _Quickstart, epochs: int, width: float, train_images: int | None) -> None:
    from edgeexit.train.trainer import TrainConfig, train

    t0 = time.perf_counter()
    q.say(
        f"[bold cyan]1/5 train[/] CE, 8 exits, width {width}, {epochs} epoch(s) on "
        f"{train_images or 'all'} Fashion-MNIST images (CE: no other method beat it on the calibrated "
        "cascade over 10 seeds, docs/results.md)"
    )
    cfg = TrainConfig.from_recipe(
        "fashion-mnist",
        "ce",
        out=str(q.out),
        data_dir=q.data_dir,
        epochs=epochs,
        width=width,
        exits=8,
        train_images=train_images,
        force=True,  # the quickstart's own run folder: a new quickstart replaces the last one
    )
    train(cfg, console=q.console)
    q.step("train_s", t0)


def _evaluate(q: _Quickstart, test) -> None:
    from edgeexit.data.datasets import load_heldout
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgeexit.train.evaluation import evaluate
    from edgeexit.train.report import budgeted_plot, eval_table
    from edgeexit.util import atomic_write_json

    t0 = time.perf_counter()
    q.say("[bold cyan]2/5 eval[/] anytime accuracy and the budgeted-batch curve on the test split")
    ckpt = load_checkpoint(q.out / "model.pt")
    ev = evaluate(model_from_checkpoint(ckpt), test, load_heldout(ckpt["split"], q.data_dir, "fashion-mnist"))
    ev["dataset"] = "fashion-mnist"
    q.show(eval_table(ev))
    budgeted_plot(ev, q.out / "budgeted.png")
    atomic_write_json(q.out / "eval.json", ev)
    q.step("eval_s", t0)


def _export(q: _Quickstart) -> Path:
    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.export.report import info_table
    from edgeexit.runtime.artifact import Artifact

    t0 = time.perf_counter()
    q.say("[bold cyan]3/5 export[/] one ONNX file per unit, parity against PyTorch")
    _, artifact = export_checkpoint(
        q.out / "model.pt", out=q.out / "model.edgeexit", force=True, data_dir=q.data_dir, console=q.console
    )
    q.show(info_table(Artifact.load(artifact)))
    q.step("export_s", t0)
    return artifact


def _calibrate(q: _Quickstart, artifact: Path, budget_ms, budget_fraction, max_drop) -> dict:
    from edgeexit.calibrate.report import calibration_table
    from edgeexit.calibrate.run import run_calibration
    from edgeexit.util import atomic_write_json

    t0 = time.perf_counter()
    goal = "the budget" if max_drop is None else f"the fastest plan certified within {100 * max_drop:.2g} pt"
    q.say(f"[bold cyan]4/5 calibrate[/] latency measured on this CPU with ONNX Runtime; thresholds for {goal}")
    cal = run_calibration(
        artifact,
        budget_ms=budget_ms,
        budget_fraction=None if budget_ms else budget_fraction,
        max_drop=max_drop,
        backend="onnxruntime",
        data_dir=q.data_dir,
        console=q.console,
        # minutes of training come before: a busy machine is profiled again (up to 3 times) and then
        # calibrated anyway, its load printed and kept in calibration.json, rather than the run lost
        repeat=3,
        accept_load=True,
    )
    q.show(calibration_table(cal))
    atomic_write_json(q.out / "calibration.json", cal)
    q.step("calibrate_s", t0)
    return cal


def _run(q: _Quickstart, artifact: Path, test, test_images: int) -> dict:
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan
    from edgeexit.runtime.profiling import verify_together

    t0 = time.perf_counter()
    q.say(f"[bold cyan]5/5 run[/] the calibrated cascade on {test_images} test images, one frame at a time")
    frames = test.images[:test_images].permute(0, 2, 3, 1).numpy()
    labels = test.labels[:test_images].numpy()
    with Cascade.load(artifact, backend="onnxruntime") as cascade:
        # both on the same moments (interleaved blocks): the speed-up is not a draw of the device's wander
        calibrated, full = verify_together(
            cascade, frames, labels, [cascade.plan, CascadePlan.full_model(cascade.num_exits)], keep_correct=True
        )
    q.step("run_s", t0)
    return {"calibrated": calibrated, "full": full}


def _summary(q: _Quickstart, artifact: Path, cal: dict, measured: dict, test_images: int) -> dict:
    from edgeexit.calibrate.promise import paired_drop
    from edgeexit.util import atomic_write_json

    calibrated, full = measured["calibrated"], measured["full"]
    drop = paired_drop(full.pop("correct"), calibrated.pop("correct"))
    summary = {
        "artifact": str(artifact),
        "budget_ms": cal["budget_ms"],
        "thresholds": cal["thresholds"],
        "evaluated_exits": cal["evaluated_exits"],
        "test": {
            "images": test_images,
            "accuracy": calibrated["accuracy"],
            "mean_ms": calibrated["mean_ms"],
            "p95_ms": calibrated["p95_ms"],
            "exit_histogram": calibrated["exit_histogram"],
        },
        "full_model_test": {"accuracy": full["accuracy"], "mean_ms": full["mean_ms"]},
        "test_drop": {"drop": drop.drop, "interval_95": list(drop.interval(0.95))},
        "promise": cal.get("max_drop"),
        "speedup": full["mean_ms"] / calibrated["mean_ms"],
        "calibration": {k: cal[k] for k in ("predicted", "measured", "baseline_msdnet", "iso_accuracy")},
        "timings_s": {k: round(v, 1) for k, v in q.timings.items()},
    }
    atomic_write_json(q.out / "quickstart.json", summary)
    return summary


def _pt_range(iv: list[float]) -> str:
    return f"{100 * iv[0]:+.2f} to {100 * iv[1]:+.2f} pt"


def _goal_line(cal: dict) -> str:
    promise = cal.get("max_drop")
    if not promise:
        return f"budget [bold]{cal['budget_ms']:.3f} ms[/] per image (mean, ONNX Runtime on this CPU)"
    return (
        f"promise: at most [bold]{100 * promise['max_drop']:.2f} pt[/] below the full model — certified at "
        f"{100 * promise['confidence']:.0f}% on {promise['n_frames']:,} held-out frames (drop ≤ "
        f"{100 * promise['drop_bound']:.2f} pt); budget mode: edgeexit quickstart --budget 60%"
    )


def _panel(q: _Quickstart, summary: dict, cal: dict, test_images: int) -> None:
    from rich.panel import Panel
    from rich.text import Text

    from edgeexit.runtime.plan import CascadePlan
    from edgeexit.util import esc

    test, full, t = summary["test"], summary["full_model_test"], q.timings
    plan = CascadePlan.from_thresholds(cal["thresholds"]).describe()
    artifact = summary["artifact"]
    q.show(
        Panel.fit(
            Text.from_markup(  # our own markup; the stdout console reads none (foreign strings are escaped)
                _goal_line(cal) + "\n"
                f"thresholds {esc(f'[{plan}]')} — exits evaluated: "
                f"{cal['evaluated_exits']}\n"
                f"test ({test_images} images, one frame at a time): accuracy "
                f"[bold]{100 * test['accuracy']:.2f}%[/], mean [bold]{test['mean_ms']:.3f} ms[/], "
                f"p95 {test['p95_ms']:.3f} ms\n"
                f"full model: accuracy {100 * full['accuracy']:.2f}%, mean {full['mean_ms']:.3f} ms → speed-up "
                f"[bold]{summary['speedup']:.2f}×[/]\n"
                f"drop on the test images: [bold]{100 * summary['test_drop']['drop']:+.2f} pt[/] (paired 95%: "
                f"{_pt_range(summary['test_drop']['interval_95'])})\n"
                f"exit histogram: {json.dumps(test['exit_histogram'])}\n"
                f"artifact: {esc(artifact)}  (embed it: Cascade.load('{esc(artifact)}'))\n"
                f"took {t['total_s'] / 60:.1f} min: "
                + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items() if k != "total_s")
            ),
            title="edgeexit quickstart",
        )
    )
