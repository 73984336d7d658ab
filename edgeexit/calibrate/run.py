"""`edgeexit calibrate`: profile on this device, collect exit statistics, choose thresholds, verify.

Every stored held-out frame decides (issue 20): the budget mode picks its approach (free optimiser,
MSDNet's thresholds, full model) by K-fold cross-fitting and refits the winner on all frames; the
--max-drop promise is a fixed-sequence test (Learn-then-Test) on all frames. The verification half is
still run through the real cascade, frame by frame, for the measured latency and a runtime check.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeexit.calibrate.optimizer import CostModel, Solution, cross_fitted, evaluate, msdnet_baseline, optimize
from edgeexit.errors import UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.device import fingerprint
from edgeexit.runtime.manifest import write_calibration
from edgeexit.runtime.plan import MSDNET_QS, CascadePlan, exit_group_name
from edgeexit.runtime.profiling import (
    frame_overhead_ms,
    fused_frame_overhead_ms,
    profile_exit_groups,
    verify,
)
from edgeexit.util import atomic_write, esc, remove_stale_temps

ISO_ACCURACY_DROP = 0.005  # "within 0.5 pt of the final exit"


@dataclass(frozen=True)
class CalibrationOptions:
    """Every option of `edgeexit calibrate`, validated in one place."""

    budget_ms: float | None = None
    budget_fraction: float | None = None  # of the full model's predicted latency
    metric: str = "mean"
    backend: str = "auto"
    data: str | None = None
    split: str = "heldout"
    limit: int | None = None  # calibration images
    verify_limit: int | None = None
    repeats: int = 200
    policy: str = "max_softmax"
    data_dir: str | None = None
    plot: str | None = None
    seed: int = 0
    iso_accuracy: bool = True
    max_drop: float | None = None  # accuracy drop vs the full model allowed (fraction: 0.005 = 0.5 pt)
    precision: str | None = None  # the units to calibrate (int8 after `export --int8`); None: the backend's
    confidence: float = 0.95  # of the --max-drop promise
    ladder_steps: int = 16  # plans in the ladder (the budget controller's rungs; benchmarks ask for more)

    def __post_init__(self) -> None:
        from edgeexit.runtime.policies import POLICIES

        if self.budget_ms is not None and self.budget_fraction is not None:
            raise UserError("give one budget: in time (5ms) or as a share of the full model (50%), not both")
        if self.budget_ms is None and self.budget_fraction is None and self.max_drop is None:
            raise UserError("give --budget (5ms, 50%), --max-drop (0.5pt), or both")
        if self.max_drop is not None and not (0 <= self.max_drop < 1):
            raise UserError(f"--max-drop must be within 0pt..100pt, got {self.max_drop}")
        if not 2 <= self.ladder_steps <= 200:
            raise UserError(f"ladder_steps must be within 2..200, got {self.ladder_steps}")
        if not 0.5 <= self.confidence < 1:
            raise UserError(f"--confidence must be within 0.5..0.999, got {self.confidence}")
        for name in ("budget_ms", "budget_fraction"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise UserError(f"the budget must be a positive finite number, got {v}")
        if self.metric not in ("mean", "p95"):
            raise UserError(f"--metric must be mean or p95, got '{self.metric}'")
        if self.split not in ("heldout", "test"):
            raise UserError(f"--split must be heldout or test, got '{self.split}'")
        if self.policy not in POLICIES:
            raise UserError(f"--policy must be one of {', '.join(POLICIES)}, got '{self.policy}'")
        for name in ("limit", "verify_limit"):
            v = getattr(self, name)
            if v is not None and v < 20:
                raise UserError(f"--{name.replace('_', '-')} must be at least 20, got {v}")
        if self.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {self.repeats}")


@dataclass
class _Session:
    """What one calibration run has loaded and measured."""

    folder: Path
    cascade: Cascade
    frames: np.ndarray
    labels: np.ndarray
    dataset: str
    calib_idx: np.ndarray
    verify_idx: np.ndarray
    profile: dict | None = None
    overhead_ms: float = 0.0
    groups: dict | None = None  # fused exit groups' latency, on a runner that fuses
    conf: np.ndarray | None = None  # exit statistics of every deciding frame (calibration + verification)
    correct: np.ndarray | None = None

    @property
    def decide_idx(self) -> np.ndarray:
        return np.concatenate([self.calib_idx, self.verify_idx])


def run_calibration(artifact, *, console=None, **options) -> dict:
    """Calibrate ``artifact`` in place (see `CalibrationOptions` for the options) and return the result."""
    opts = CalibrationOptions(**options)
    t_start = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    s = _open(Path(artifact), opts, say)
    try:
        _measure(s, opts, console)
        cost = _cost_model(s, opts.metric)
        budget_ms = _budget(opts, cost, say)
        promise, crossfit = None, None
        if opts.max_drop is not None:
            chosen, promise = _choose_within_drop(s, opts, cost, budget_ms, say)
            _, frontier = optimize(s.conf, s.correct, cost, budget_ms, opts.metric, pairs=False)
        else:
            crossfit = cross_fitted(s.conf, s.correct, cost, budget_ms, opts.metric, seed=opts.seed)
            chosen, frontier = crossfit.solution, crossfit.frontier
            say(
                f"  chosen out of fold ({crossfit.folds} folds): [bold]{crossfit.chosen}[/] — "
                + ", ".join(
                    f"{a} {100 * v['accuracy']:.2f}%" if v else f"{a} infeasible"
                    for a, v in crossfit.out_of_fold.items()
                )
            )
        result = _verify_choices(s, opts, cost, budget_ms, chosen, say)
        if crossfit is not None:
            chosen = _hold_measured(s, opts, cost, budget_ms, chosen, crossfit.chosen, result, say)
        result.update(_intervals(s, opts, chosen, result, promise))
        if crossfit is not None:
            result["cross_fit"] = crossfit.to_dict()
            oof = crossfit.out_of_fold.get(crossfit.chosen)
            if oof:
                result["predicted"]["out_of_fold_accuracy"] = oof["accuracy"]
        result.update(_report_extras(s, opts, cost, frontier))
        cert = _certify(s, opts, cost, ISO_ACCURACY_DROP, None)
        result["certifiable"] = {"confidence": opts.confidence, "n_frames": int(len(s.conf)), "frontier": cert.frontier}
        result["ladder"] = _ladder(s, opts, cost)
        _measure_ladder(s, opts, result, console)
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        _write(s, opts, result, say)
    finally:
        s.cascade.close()
    return result


def _images(artifact, opts: CalibrationOptions) -> tuple:
    """(frames, labels, name, calibration indices, verification indices): the held-out images stored
    in the artifact (no torch, no dataset needed), unless --data, --data-dir, --split test or
    another --seed asks for the dataset itself."""
    from edgeexit.runtime.manifest import load_calibration_frames

    if opts.data is None and opts.data_dir is None and opts.split == "heldout" and opts.seed == 0:
        stored = load_calibration_frames(artifact)
        if stored is not None:
            name = f"{artifact.dataset} held-out images stored in the artifact"
            return stored["frames"], stored["labels"], name, stored["calibration"], stored["verification"]
    from edgeexit.data import split_calibration
    from edgeexit.data.frames import load_frames  # lazily: calibrating on the stored frames needs no torch

    frames, labels, name = load_frames(artifact, opts.data, opts.split, opts.data_dir)
    calib_idx, verify_idx = split_calibration(np.arange(len(labels)), opts.seed)
    return frames, labels, name, calib_idx, verify_idx


def _open(folder: Path, opts: CalibrationOptions, say) -> _Session:
    remove_stale_temps(folder)  # what an interrupted calibration left (temporary stats, manifest, plot)
    extra = {"precision": opts.precision} if opts.precision else {}
    cascade = Cascade.load(folder, backend=opts.backend, policy=opts.policy, **extra)
    try:
        frames, labels, name, calib_idx, verify_idx = _images(cascade.artifact, opts)
        calib_idx = calib_idx[: opts.limit] if opts.limit else calib_idx
        verify_idx = verify_idx[: opts.verify_limit] if opts.verify_limit else verify_idx
        if len(calib_idx) < 20 or len(verify_idx) < 20:
            raise UserError(f"the {opts.split} split has too few images ({len(labels)}) to calibrate and verify")
    except BaseException:
        cascade.close()
        raise
    say(
        f"[bold]calibrate[/] {esc(str(folder))} on {cascade.backend_name}: {len(calib_idx)} calibration + "
        f"{len(verify_idx)} verification images ({name} {opts.split})"
    )
    return _Session(folder, cascade, frames, labels, name, calib_idx, verify_idx)


def _measure(s: _Session, opts: CalibrationOptions, console) -> None:
    """Unit latencies, per-frame overhead and exit statistics (cached beside the manifest)."""
    from rich.progress import Progress

    cascade = s.cascade
    x_calib = cascade.preprocess.batch(s.frames[s.decide_idx])
    with Progress(console=console, transient=True, disable=console is None) as prog:
        task = prog.add_task("profiling units", total=cascade.num_exits)
        s.profile = cascade.profile(x_calib[0], repeats=opts.repeats, progress=lambda k: prog.update(task, completed=k))
        p50 = {n: v["p50_ms"] for n, v in s.profile["units"].items()}
        if cascade.fuse and cascade.runner.info.fuses:  # what runs is timed: each evaluated exit's call
            k = cascade.num_exits
            task = prog.add_task("profiling fused exit groups", total=k)
            s.groups = profile_exit_groups(
                cascade, x_calib[0], opts.repeats, progress=lambda n: prog.update(task, completed=n)
            )
            first = s.groups[exit_group_name(0, 0)]["p50_ms"]
            s.overhead_ms = fused_frame_overhead_ms(cascade, s.frames[s.calib_idx[0]], first)
        else:
            s.overhead_ms = frame_overhead_ms(cascade, s.frames[s.calib_idx[0]], p50)
        task = prog.add_task("exit statistics", total=len(x_calib))
        key = hashlib.sha1(
            f"{cascade.backend_name}|{opts.policy}|{s.dataset}|{opts.split}|{opts.seed}|{len(s.calib_idx)}|"
            f"{len(s.verify_idx)}|all|"
            f"{cascade.artifact.created}".encode()
        ).hexdigest()[:12]
        stats = _stats_cached(cascade, s.folder, key, x_calib, progress=lambda n: prog.update(task, completed=n))
    s.conf = stats["confidence"]
    s.correct = stats["prediction"] == s.labels[s.decide_idx][:, None]


def _stats_cached(cascade: Cascade, folder: Path, key: str, x: np.ndarray, progress=None) -> dict:
    path = folder / f"calibration_stats.{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {"confidence": z["confidence"], "prediction": z["prediction"]}
    stats = cascade.exit_statistics(x, progress=progress)
    atomic_write(path, lambda f: np.savez_compressed(f, **stats))
    return stats


def _cost_model(s: _Session, metric: str) -> CostModel:
    field = "mean_ms" if metric == "mean" else "p95_ms"
    return CostModel.from_timings(
        s.cascade.num_exits, s.profile["units"], field, s.profile["decision"][field], s.overhead_ms, s.groups
    )


def _budget(opts: CalibrationOptions, cost: CostModel, say) -> float:
    full_ms = cost.full_ms()
    budget_ms = opts.budget_ms
    if budget_ms is None and opts.budget_fraction is None:  # --max-drop alone: no latency limit
        budget_ms = max(full_ms, cost.exit_costs(np.ones(cost.num_exits, bool))[-1])
    elif budget_ms is None:
        budget_ms = opts.budget_fraction * full_ms
        say(f"  budget = {100 * opts.budget_fraction:.0f}% of the full model = {budget_ms:.3f} ms")
    say(
        f"  full model (every intermediate exit skipped): {full_ms:.3f} ms predicted; cheapest cascade "
        f"{cost.min_ms():.3f} ms"
    )
    return budget_ms


def _plan_correct(s: _Session, plan: CascadePlan) -> np.ndarray:
    """Which calibration images ``plan`` gets right (from the exit statistics)."""
    return s.correct[np.arange(len(s.correct)), plan.exit_positions(s.conf)]


def _certify(s: _Session, opts, cost: CostModel, max_drop: float, budget_ms: float | None):
    from edgeexit.calibrate.promise import certify

    return certify(s.conf, s.correct, cost, max_drop, opts.confidence, budget_ms, opts.metric)


def _frames_advice(s: _Session, cost: CostModel, p, max_drop: float) -> dict[str, int | None]:
    """For speed-ups not certified at ``max_drop``: about how many frames would certify them."""
    from edgeexit.calibrate.promise import frames_for

    reached = cost.full_ms() / p.latency_ms
    return {
        f"{x:g}": frames_for(p, x, max_drop, cost.full_ms(), cost, s.conf, s.correct)
        for x in (1.25, 1.5, 2.0)
        if x > reached + 1e-9
    }


def _choose_within_drop(s: _Session, opts, cost: CostModel, budget_ms: float, say) -> tuple[Solution, dict]:
    """The cheapest plan whose accuracy drop against the full model is certified within --max-drop at
    --confidence on every stored frame (fixed-sequence testing, see calibrate/promise.py `certify`)."""
    limited = opts.budget_ms is not None or opts.budget_fraction is not None
    p = _certify(s, opts, cost, opts.max_drop, budget_ms if limited else None)
    k, n = s.cascade.num_exits, len(s.conf)
    if p.thresholds is None and limited and cost.full_ms() > budget_ms + 1e-9:
        raise UserError(
            f"--max-drop {100 * opts.max_drop:.2f}pt cannot be met within the budget {budget_ms:.3f} ms: no plan "
            f"within it is certified at {100 * opts.confidence:.0f}% on {n} frames; raise the budget, allow a "
            f"larger drop, or store more frames (export --calib-images)"
        )
    th = p.thresholds if p.thresholds is not None else CascadePlan.full_model(k).thresholds
    chosen = evaluate(s.conf, s.correct, cost, th, opts.metric)
    advice = _frames_advice(s, cost, p, opts.max_drop)
    say(
        f"  --max-drop {100 * opts.max_drop:.2f}pt at {100 * opts.confidence:.0f}%: fixed-sequence test on {n} "
        f"frames; chosen {chosen.latency_ms:.3f} ms ({cost.full_ms() / chosen.latency_ms:.2f}× the full model), "
        f"drop ≤ {100 * p.drop_bound:.2f} pt"
    )
    for x, need in advice.items():
        say(
            f"  {x}× at {100 * opts.max_drop:.2f} pt "
            + (f"needs ≈ {need:,} frames: re-export with --calib-images {need}" if need else "is out of reach")
        )
    promise = {
        "max_drop": opts.max_drop,
        "confidence": opts.confidence,
        "method": "fixed-sequence test (Learn-then-Test) of the paired drop vs the full model along a shared "
        "threshold from 1 down, per exit family, Bonferroni over the families",
        "z": p.z,
        "families": [[e + 1 for e in t.exits] for t in p.tests],
        "family": [e + 1 for e in p.family] if p.family else None,
        "drop_bound": p.drop_bound,
        "n_frames": n,
        "frontier": p.frontier,
        "frames_needed": advice,
    }
    return chosen, promise


def _intervals(s: _Session, opts, chosen: Solution, result: dict, promise: dict | None) -> dict:
    """Predicted accuracy and drop vs the full model with 95 % intervals, and the verified values."""
    from edgeexit.calibrate.promise import accuracy_interval, paired_drop

    correct = _plan_correct(s, chosen.plan)
    drop = paired_drop(s.correct[:, -1], correct)
    verified_drop = result["full_model"]["measured"]["accuracy"] - result["measured"]["accuracy"]
    result["predicted"]["accuracy_interval_95"] = list(accuracy_interval(correct))
    result["predicted"]["drop_vs_full"] = drop.drop
    result["predicted"]["drop_interval_95"] = list(drop.interval(0.95))
    result["measured"]["drop_vs_full"] = verified_drop
    out = {
        "decided_by": f"all {len(s.conf)} stored frames ({s.dataset} {opts.split}); the {len(s.verify_idx)} "
        "verification frames among them were also run through the real cascade"
    }
    if promise is not None:
        promise["verified_drop"] = verified_drop
        promise["kept"] = bool(verified_drop <= opts.max_drop + 1e-12)
        out["max_drop"] = promise
    return out


def _verify_choices(s: _Session, opts, cost: CostModel, budget_ms: float, chosen: Solution, say) -> dict:
    """The chosen plan, the MSDNet baseline, the full model and the iso-accuracy point, each run for
    real on the verification half."""
    k, final_acc, full_ms = s.cascade.num_exits, float(s.correct[:, -1].mean()), cost.full_ms()
    vf, vl = s.frames[s.verify_idx], s.labels[s.verify_idx]
    note = None
    if budget_ms >= full_ms and (opts.budget_ms is not None or opts.budget_fraction is not None):
        note = (
            f"budget {budget_ms:.3f} ms is at or above the full model ({full_ms:.3f} ms): final-exit accuracy "
            f"({final_acc:.4f}) is kept; thresholds only add exits that help"
        )
        say(f"  [yellow]{note}[/]")
    base = msdnet_baseline(s.conf, s.correct, cost, budget_ms, opts.metric)
    base_measured = verify(s.cascade, vf, vl, base.plan) if base is not None else None
    full_measured = verify(s.cascade, vf, vl, CascadePlan.full_model(k))
    return {
        "artifact": str(s.folder),
        "budget_ms": budget_ms,
        "metric": opts.metric,
        "policy": opts.policy,
        "thresholds": chosen.to_dict()["thresholds"],
        "evaluated_exits": chosen.evaluated_exits,
        "predicted": _pred(chosen),
        "measured": _meas(verify(s.cascade, vf, vl, chosen.plan)),
        "baseline_msdnet": (
            {
                "accuracy": base_measured["accuracy"],
                "latency_ms": base_measured["latency_ms"],
                "predicted": _pred(base),
                "thresholds": base.to_dict()["thresholds"],
            }
            if base is not None
            else None
        ),
        "full_model": {"predicted_ms": full_ms, "measured": _meas(full_measured), "calibration_accuracy": final_acc},
        "iso_accuracy": _iso_accuracy(s, opts, cost, full_measured) if opts.iso_accuracy else None,
        "note": note,
    }


def _hold_measured(s: _Session, opts, cost: CostModel, budget_ms: float, chosen: Solution, approach, result, say):
    """The cost model adds timings of pieces profiled one at a time; a cascade alternating between
    them can run slower (measured: 1.2x on an AVX-512 Xeon for 6 evaluated exits, within a few % on an
    EPYC). When the real cascade overruns the budget by more than 3 %, refit the same approach at the
    budget scaled by measured/predicted and run it again: the budget holds for what runs."""
    from edgeexit.calibrate.optimizer import APPROACHES

    measured, predicted = result["measured"][f"{opts.metric}_ms"], getattr(chosen, f"{opts.metric}_ms")
    if opts.budget_ms is None and opts.budget_fraction is None or measured <= budget_ms * 1.03 or predicted <= 0:
        return chosen
    ratio = measured / predicted
    if budget_ms / ratio < cost.min_ms():  # nothing cheaper to refit to: keep the plan, say so in the report
        result["latency_correction"] = {"ratio": ratio, "first_measured_ms": measured, "refit": False}
        return chosen
    try:
        th = APPROACHES[approach](s.conf, s.correct, cost, budget_ms / ratio, opts.metric)
    except UserError:
        th = None
    if th is None:
        return chosen
    fixed = evaluate(s.conf, s.correct, cost, th, opts.metric)
    m = verify(s.cascade, s.frames[s.verify_idx], s.labels[s.verify_idx], fixed.plan)
    say(
        f"  the real cascade ran {ratio:.2f}x the cost model ({measured:.3f} ms > budget {budget_ms:.3f} ms): "
        f"refitted at {budget_ms / ratio:.3f} ms predicted, measured {m[f'{opts.metric}_ms']:.3f} ms"
    )
    result["latency_correction"] = {
        "ratio": ratio,
        "first_measured_ms": measured,
        "first_thresholds": result["thresholds"],
    }
    result.update(thresholds=fixed.to_dict()["thresholds"], evaluated_exits=fixed.evaluated_exits)
    result["predicted"], result["measured"] = _pred(fixed), _meas(m)
    return fixed


def _iso_accuracy(s: _Session, opts, cost: CostModel, full_measured: dict) -> dict | None:
    """The cheapest plan certified within ISO_ACCURACY_DROP of the full model (as --max-drop 0.5pt
    would choose), run for real on the verification half."""
    p = _certify(s, opts, cost, ISO_ACCURACY_DROP, None)
    if p.thresholds is None:
        return None
    sol = evaluate(s.conf, s.correct, cost, p.thresholds, opts.metric)
    measured = verify(s.cascade, s.frames[s.verify_idx], s.labels[s.verify_idx], sol.plan)
    return {
        "max_drop": ISO_ACCURACY_DROP,
        "drop_bound": p.drop_bound,
        "predicted": _pred(sol),
        "measured": _meas(measured),
        "thresholds": sol.to_dict()["thresholds"],
        "latency_fraction_of_full": measured["latency_ms"] / full_measured["latency_ms"],
        "accuracy_drop_vs_full_measured": full_measured["accuracy"] - measured["accuracy"],
    }


def _ladder(s: _Session, opts, cost: CostModel) -> list[dict]:
    """The most accurate plan at ``ladder_steps`` budgets from the cheapest cascade to every exit evaluated:
    what the runtime's budget controller moves along when the device slows down or recovers."""
    from edgeexit.calibrate.optimizer import plan_ladder

    hi = cost.exit_costs(np.ones(cost.num_exits, bool))[-1]
    rows = []
    for budget, sol in plan_ladder(s.conf, s.correct, cost, cost.min_ms(), hi, opts.ladder_steps, opts.metric):
        rows.append(
            {
                "budget_ms": budget,
                "thresholds": sol.plan.to_list(),
                "predicted_ms": sol.mean_ms,
                "predicted_accuracy": sol.accuracy,
            }
        )
    return rows


def _measure_ladder(s: _Session, opts, result: dict, console) -> None:
    """Every rung run for real on verification frames, interleaved with the chosen plan: the budget
    controller compares against these measured costs (and per-exit latencies), not the cost model's."""
    from rich.progress import Progress

    from edgeexit.runtime.controller import measure_ladder

    frames = s.frames[s.verify_idx]
    n = min(len(frames), 600)
    with Progress(console=console, transient=True, disable=console is None) as prog:
        task = prog.add_task(f"measuring {len(result['ladder']) + 1} plans of the ladder", total=n)
        measure_ladder(s.cascade, frames, result["ladder"], result, opts.metric, max_frames=n,
                       progress=lambda k: prog.update(task, completed=k))  # fmt: skip


def _report_extras(s: _Session, opts, cost: CostModel, frontier: list[Solution]) -> dict:
    msd_curve = []
    for q in MSDNET_QS:
        sol = evaluate(s.conf, s.correct, cost, CascadePlan.msdnet(s.conf, q).thresholds, opts.metric)
        msd_curve.append({"q": q, "accuracy": sol.accuracy, "latency_ms": sol.latency_ms})
    return {
        "device": fingerprint(s.cascade.runner.info),
        "latency": {
            "batch": 1,
            "units": s.profile["units"],
            "decision_ms": s.profile["decision"]["mean_ms"],
            "frame_overhead_ms": s.overhead_ms,
            **({"exit_groups": s.groups} if s.groups is not None else {}),
        },
        "data": {
            "dataset": s.dataset,
            "split": opts.split,
            "calibration_images": int(len(s.calib_idx)),
            "verification_images": int(len(s.verify_idx)),
            "seed": opts.seed,
        },
        "frontier": [{"accuracy": f.accuracy, "latency_ms": f.latency_ms} for f in frontier],
        "msdnet_curve": msd_curve,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("plot", "data_dir")},
    }


def _write(s: _Session, opts: CalibrationOptions, result: dict, say) -> None:
    """The plot first, then the manifest: no file the manifest names is written after it."""
    plot_path = Path(opts.plot) if opts.plot else s.folder / "calibration.png"
    try:
        from edgeexit.calibrate.report import calibration_plot

        calibration_plot(result, plot_path)
        result["plot"] = str(plot_path)
    except ImportError:
        say("  (matplotlib not installed: no plot)")
    calibration = {k: v for k, v in result.items() if k not in ("artifact", "frontier", "msdnet_curve", "plot")}
    calibration["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    calibration["backend"] = s.cascade.backend_name
    write_calibration(s.cascade.artifact, calibration)


def _pred(s: Solution) -> dict:
    return {
        "accuracy": s.accuracy,
        "latency_ms": s.latency_ms,
        "mean_ms": s.mean_ms,
        "p95_ms": s.p95_ms,
        "exit_shares": s.exit_shares,
    }


def _meas(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "latency_ms", "mean_ms", "p50_ms", "p95_ms", "samples", "exit_shares")}
