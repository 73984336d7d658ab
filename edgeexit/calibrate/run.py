"""`edgeexit calibrate`: profile on this device, collect exit statistics, choose thresholds, verify.

Every stored held-out frame decides: the budget mode picks its approach (free optimiser,
MSDNet's thresholds, full model) by K-fold cross-fitting and refits the winner on all frames; the
--max-drop promise is a fixed-sequence test (Learn-then-Test) on all frames. The verification half is
still run through the real cascade, frame by frame, for the measured latency and a runtime check.

The run is a chain of stages, each returning a frozen value (calibrate/result.py) that the next reads
and none changes: `_measure` → `Measurements`; `_choose` → `Choice`; `_verify` → `Verification` (of
`Verified` rows); `_measure_ladder` → `Ladder`; `_assemble` → `CalibrationReport`, whose
`.manifest_block()` is the manifest's ``calibration`` block and whose `.to_json()` is what
`run_calibration` returns.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeexit.calibrate import load as load_rules
from edgeexit.calibrate.load import describe as describe_load
from edgeexit.calibrate.load import too_busy_message, verdict
from edgeexit.calibrate.optimizer import CostModel, Solution, cross_fitted, msdnet_baseline, optimize
from edgeexit.calibrate.options import CalibrationOptions
from edgeexit.calibrate.promise import Promise
from edgeexit.calibrate.result import (
    MEASURED,
    CalibrationReport,
    Choice,
    IsoAccuracy,
    Ladder,
    LatencyCorrection,
    MeasuredRung,
    Measurements,
    Verification,
    Verified,
)
from edgeexit.errors import UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import LadderRung
from edgeexit.runtime.cascade import check_finite_confidence
from edgeexit.runtime.device import fingerprint
from edgeexit.runtime.latency import LatencyStats
from edgeexit.runtime.manifest import write_calibration
from edgeexit.runtime.plan import MSDNET_QS, CascadePlan, head_name, segment_name
from edgeexit.runtime.profiling import (
    RoundsProfile,
    cost_pieces,
    exit_step_from,
    overhead_from,
    profile_rounds,
    verify_together,
)
from edgeexit.util import atomic_write, esc, remove_stale_temps

ISO_ACCURACY_DROP = 0.005  # "within 0.5 pt of the final exit"


@dataclass(frozen=True)
class _Session:
    """What one calibration run has loaded: the cascade and the frames that decide."""

    folder: Path
    cascade: Cascade
    frames: np.ndarray
    labels: np.ndarray
    dataset: str
    calib_idx: np.ndarray
    verify_idx: np.ndarray

    @property
    def decide_idx(self) -> np.ndarray:
        return np.concatenate([self.calib_idx, self.verify_idx])

    def run(self, solution: Solution) -> Verified:
        """``solution``'s plan run for real through the cascade on the verification frames."""
        return self.run_together([solution])[0]

    def run_together(self, solutions: list[Solution]) -> list[Verified]:
        """Several plans run for real on the verification frames, interleaved in blocks: on the same
        moments of the device, so that their latencies (the speed-up over the full model) compare."""
        x, y = self.frames[self.verify_idx], self.labels[self.verify_idx]
        runs = verify_together(self.cascade, x, y, [sol.plan for sol in solutions], keep_frames=True)
        return [
            Verified(
                sol, {k: m[k] for k in MEASURED}, tuple(m["block_ms"]), (tuple(m["frame_ms"]), tuple(m["frame_exit"]))
            )
            for sol, m in zip(solutions, runs, strict=True)
        ]


# --- The run --------------------------------------------------------------------------------------------------


def run_calibration(artifact, *, console=None, **options) -> dict:
    """Calibrate ``artifact`` in place (see `CalibrationOptions` for the options) and return the result
    (`CalibrationReport.to_json`)."""
    opts = CalibrationOptions(**options)
    t_start = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    s = _open(Path(artifact), opts, say)
    try:
        m = _measure(s, opts, console, say)
        cost = m.cost(opts.metric)
        frame = _frame_cost(s, opts, say)
        budget_ms = _budget(opts, cost, say, frame)
        choice = _choose(s, m, opts, cost, budget_ms, say)
        iso_promise = _certify(m, opts, cost, ISO_ACCURACY_DROP, None)  # the iso-accuracy point, certifiable
        verification = _verify(s, m, opts, cost, budget_ms, choice, iso_promise, say)
        ladder = _measure_ladder(s, m, opts, cost, verification.chosen, console)
        report = _assemble(s, m, opts, cost, budget_ms, choice, verification, ladder, iso_promise, t_start)
        report = replace(report, frame=frame)
        report = _write(s, opts, report, say)
    finally:
        s.cascade.close()
    return report.to_json()


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
        calib_idx = calib_idx[: opts.images] if opts.images else calib_idx
        verify_idx = verify_idx[: opts.verify_images] if opts.verify_images else verify_idx
        if len(calib_idx) < 20 or len(verify_idx) < 20:
            raise UserError(f"the {opts.split} split has too few images ({len(labels)}) to calibrate and verify")
    except BaseException:
        cascade.close()
        raise
    say(
        f"[bold]calibrate[/] {esc(str(folder))} on {cascade.runner.info.name}: {len(calib_idx)} calibration + "
        f"{len(verify_idx)} verification images ({name} {opts.split})"
    )
    return _Session(folder, cascade, frames, labels, name, calib_idx, verify_idx)


def _measure(s: _Session, opts: CalibrationOptions, console, say) -> Measurements:
    """Unit latencies, per-frame overhead, how busy the device was, and exit statistics (cached beside
    the manifest)."""
    from rich.progress import Progress

    cascade = s.cascade
    x_calib = cascade.preprocessor.batch(s.frames[s.decide_idx])
    k, fused = cascade.num_exits, bool(cascade.options.fuse and cascade.runner.info.fuses)
    with Progress(console=console, transient=True, disable=console is None) as prog:
        rounds = _profile(s, opts, x_calib[0], prog, say)
        stats = rounds.stats
        units = {n: stats[n] for n in (f(p) for p in range(k) for f in (segment_name, head_name))}
        # on a runner that fuses, what runs is timed: each evaluated exit's one call
        groups = {n: v for n, v in stats.items() if "+" in n} if fused else None
        overhead_ms = overhead_from(stats, k, fused)
        exit_step_ms = exit_step_from(stats, k, fused, overhead_ms)
        task = prog.add_task("exit statistics", total=len(x_calib))
        key = stats_key(cascade, opts, s.dataset, len(s.calib_idx), len(s.verify_idx))
        ex = _stats_cached(cascade, s.folder, key, x_calib, progress=lambda n: prog.update(task, completed=n))
    correct = ex["prediction"] == s.labels[s.decide_idx][:, None]
    profile = {"batch": 1, "units": units, "decision": stats["decision"]}
    return Measurements(
        profile, groups, overhead_ms, ex["confidence"], correct, ex["prediction"], rounds.load, exit_step_ms
    )


PER_ROUND = 4  # calls of each piece per profiling round (--repeats calls in all, in rounds of these)
MIN_ROUNDS = 24  # 8 quiet rounds at least: the quiet level known well enough to judge
RETRY_PAUSE_S = 2.0  # between two profiles of a busy device (--repeat): a burst of load may pass
# A profile taken while other processes held the core (calibrate got less than BUSY_CPU_SHARE of the
# wall time) is taken this many times as long (its rounds pooled); a slow round alone, which a VM with
# nothing else running shows too, is not a reason. Beside two spinning processes on the 2-core VM, six
# profiles of 50 rounds priced the same plans as a share of the full model 6.4-7.6 % apart, of 200
# rounds 1.4-3.2 % (docs/results.md, "Calibration on a busy device")
BUSY_ROUNDS = 4


def _profile(s: _Session, opts: CalibrationOptions, image: np.ndarray, prog, say) -> RoundsProfile:
    """Every piece of the cost model timed in interleaved rounds (`profile_rounds`), BUSY_ROUNDS times as
    many when other processes held the core during the first, up to --repeat times while the device is
    too busy for the profile to be trusted (the tries' rounds pooled); too busy after the last try is a
    UserError unless --accept-load. The load is said either way."""
    cascade = s.cascade
    calls, cleanup = cost_pieces(cascade, image, s.frames[s.calib_idx[0]])
    rounds = max(MIN_ROUNDS, -(-opts.repeats // PER_ROUND))

    def take(n: int) -> RoundsProfile:
        task = prog.add_task(f"profiling {len(calls)} pieces in {n} rounds", total=n)
        return profile_rounds(calls, cascade.runner.synchronize, n, PER_ROUND,
                              progress=lambda done: prog.update(task, completed=done))  # fmt: skip

    prof: RoundsProfile | None = None
    try:
        for attempt in range(1, opts.repeat + 1):
            p = take(rounds)
            prof = p if prof is None else prof.pooled(p)
            level, reasons = verdict(prof.load)
            if attempt == 1 and level == "busy" and prof.load.get("cpu_share", 1.0) < load_rules.BUSY_CPU_SHARE:
                say(
                    f"  the device is busy: profiling {(BUSY_ROUNDS - 1) * rounds} more rounds (a busy profile wanders)"
                )
                prof = prof.pooled(take((BUSY_ROUNDS - 1) * rounds))
                level, reasons = verdict(prof.load)
            if level != "too busy" or attempt == opts.repeat:
                break
            say(f"  the device is too busy ({'; '.join(reasons)}): profiling again ({attempt + 1}/{opts.repeat})")
            time.sleep(RETRY_PAUSE_S)
    finally:
        cleanup()
    assert prof is not None
    # accepted: written although too busy (--accept-load)
    load = {**prof.load, "verdict": level, "profiles": attempt, "accepted": level == "too busy"}
    if level == "too busy" and not opts.accept_load:
        raise UserError(too_busy_message(load, reasons, attempt))
    colour = {"quiet": "green", "busy": "yellow"}.get(level, "bold red")
    say(f"  device load while profiling: [{colour}]{esc(describe_load(load))}[/]")
    return RoundsProfile(prof.stats, load, prof.samples)


def stats_key(cascade: Cascade, opts: CalibrationOptions, dataset, n_calib: int, n_verify: int) -> str:
    """The name of the exit statistics' cache file. They depend on the units that run (backend and
    precision: FP16 and INT8 confidences differ from FP32's), the policy and the frames; "v2": files
    written before the finite check are not reused."""
    info = cascade.runner.info
    text = (
        f"v2|{info.name}|{info.precision}|{opts.policy}|{dataset}|{opts.split}|{opts.seed}|"
        f"{n_calib}|{n_verify}|all|{cascade.artifact.created}"
    )
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _stats_cached(cascade: Cascade, folder: Path, key: str, x: np.ndarray, progress=None) -> dict:
    """The exit statistics of ``x``, from this artifact's cache file when it holds them for exactly
    these frames (checked finite as fresh ones are), else computed and stored."""
    path = folder / f"calibration_stats.{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            cached = {"confidence": z["confidence"], "prediction": z["prediction"]}
        if cached["confidence"].shape == cached["prediction"].shape == (len(x), cascade.plan.num_exits):
            check_finite_confidence(cached["confidence"], cascade.runner.info.name)
            return cached
    stats = cascade.exit_statistics(x, progress=progress)
    atomic_write(path, lambda f: np.savez_compressed(f, **stats))
    return stats


FRAME_ROUNDS = 100  # preprocessing/full-model pairs timed for --frame-size (~0.5 s at 1080p on 2 cores)


def _frame_cost(s: _Session, opts: CalibrationOptions, say) -> dict:
    """The ``frame`` block: what the budget covers. With --frame-size, what preprocessing a frame of
    that size costs on this device, timed in rounds interleaved with the full model on a network-size
    input (each round: one frame converted, one full-model run), so the two compare on the same moments."""
    pre = s.cascade.preprocessor
    network = [pre.width, pre.height]
    if opts.frame_size is None:
        say(
            f"  the budget covers the cascade on {network[0]}x{network[1]} frames (the network's input); converting "
            "larger camera frames costs extra: --frame-size WxH budgets it too"
        )
        return {"size": None, "network_size": network, "covers": "cascade"}
    fw, fh = opts.frame_size
    frame = np.random.default_rng(0).integers(0, 256, (fh, fw, 3), dtype=np.uint8)  # cost does not depend on pixels
    full = s.cascade.derive(thresholds=CascadePlan.full_model(s.cascade.num_exits).thresholds)
    ready = pre(frame)
    full.predict(ready)
    pre_ms, full_ms = [], []
    clock = time.perf_counter
    for _ in range(FRAME_ROUNDS):
        t = clock()
        pre(frame)
        pre_ms.append((clock() - t) * 1e3)
        full_ms.append(full.predict(ready).latency_ms)

    def stats(v: list[float]) -> dict:
        s = LatencyStats.from_samples(v)
        return {"mean_ms": s.mean_ms, "p50_ms": s.p50_ms, "p95_ms": s.p95_ms}

    block = {
        "size": [fw, fh],
        "network_size": network,
        "covers": "frame",
        "preprocess": stats(pre_ms),
        "full_model_same_moments": stats(full_ms),
        "rounds": FRAME_ROUNDS,
    }
    key = "mean_ms" if opts.metric == "mean" else "p95_ms"
    say(
        f"  a {fw}x{fh} frame takes {block['preprocess'][key]:.3f} ms ({opts.metric}) to convert to {network[0]}x"
        f"{network[1]} on this device ({block['full_model_same_moments'][key]:.3f} ms for the full model, same moments)"
    )
    return block


def _budget(opts: CalibrationOptions, cost: CostModel, say, frame: dict | None = None) -> float:
    """The cascade's budget in ms. With --frame-size the budget the user gave covers the frame: its
    preprocessing (measured in `_frame_cost`) is taken off first, and a share (50%) is of the full
    model's frame-to-answer time, preprocessing included."""
    full_ms = cost.full_ms()
    budget_ms = opts.budget_ms
    frame_ms = 0.0
    if frame is not None and frame.get("covers") == "frame":
        frame_ms = frame["preprocess"]["mean_ms" if opts.metric == "mean" else "p95_ms"]
    if not opts.limited:  # --max-drop alone: no latency limit
        budget_ms = max(full_ms, cost.all_exits_ms())
    elif budget_ms is None:
        budget_ms = opts.budget_fraction * (full_ms + frame_ms)
        whole = "frame to answer" if frame_ms else "cascade"
        say(f"  budget = {100 * opts.budget_fraction:.0f}% of the full model ({whole}) = {budget_ms:.3f} ms")
    if opts.limited and frame_ms:
        size = "x".join(map(str, frame["size"]))
        if budget_ms - frame_ms <= 0:
            raise UserError(
                f"the budget {budget_ms:.3f} ms is used up by converting a {size} frame ({frame_ms:.3f} ms on this "
                "device) before the cascade starts: give more time, or ask the camera for smaller frames"
            )
        say(f"  of the {budget_ms:.3f} ms per {size} frame, {frame_ms:.3f} ms go to preprocessing: the cascade gets "
            f"{budget_ms - frame_ms:.3f} ms")  # fmt: skip
        budget_ms -= frame_ms
    say(
        f"  full model (every intermediate exit skipped): {full_ms:.3f} ms predicted; cheapest cascade "
        f"{cost.min_ms():.3f} ms"
    )
    if opts.limited and budget_ms >= full_ms:
        then = (
            "the --max-drop promise alone chooses the plan"
            if opts.max_drop is not None
            else "the plan becomes the most accurate one, which costs about what the full model costs (no speed-up)"
        )
        say(
            f"  [bold yellow]warning[/]: the budget {budget_ms:.3f} ms is above the full model's {full_ms:.3f} ms on "
            f"this device, so it limits nothing: {then}. To run faster give less, e.g. "
            f"--budget {0.6 * full_ms:.3g}ms or --budget 60%"
        )
    return budget_ms


def _certify(m: Measurements, opts, cost: CostModel, max_drop: float, budget_ms: float | None) -> Promise:
    from edgeexit.calibrate.promise import certify

    return certify(m.conf, m.correct, cost, max_drop, opts.confidence, budget_ms, opts.metric)


def _frames_advice(m: Measurements, cost: CostModel, p: Promise, max_drop: float) -> dict[str, int | None]:
    """For speed-ups not certified at ``max_drop``: about how many frames would certify them."""
    from edgeexit.calibrate.promise import frames_for

    reached = cost.full_ms() / p.latency_ms
    return {
        f"{x:g}": frames_for(p, x, max_drop, cost.full_ms(), cost, m.conf, m.correct)
        for x in (1.25, 1.5, 2.0)
        if x > reached + 1e-9
    }


def _choose(s: _Session, m: Measurements, opts: CalibrationOptions, cost: CostModel, budget_ms: float, say):
    if opts.max_drop is not None:
        return _choose_within_drop(m, opts, cost, budget_ms, say)
    crossfit = cross_fitted(m.conf, m.correct, cost, budget_ms, opts.metric, seed=opts.seed)
    names = {"optimised": "edgeexit's optimiser", "msdnet": "MSDNet's thresholds", "full-model": "the full model"}
    say(
        f"  thresholds from [bold]{names.get(crossfit.chosen, crossfit.chosen)}[/], the most accurate on frames its "
        f"thresholds were not fitted on ({crossfit.folds} rounds, each fitting on {crossfit.folds - 1}/"
        f"{crossfit.folds} of the frames and scoring the rest): "
        + ", ".join(
            f"{names.get(a, a)} {100 * v['accuracy']:.2f}%" if v else f"{names.get(a, a)} cannot meet the budget"
            for a, v in crossfit.out_of_fold.items()
        )
    )
    kept = _keep_previous(s, m, opts, cost, budget_ms, crossfit.solution)
    if kept is not None:
        solution, evidence = kept
        say(
            f"  [bold]kept the previous plan[/]: by this profile it costs {evidence['predicted_ms']:.3f} ms against "
            f"the budget {budget_ms:.3f} ms, and this profile prices it and the new best within "
            f"{100 * evidence['profile_moved']:.1f}% of the previous one (two profiles of one device "
            f"wander up to ±{100 * evidence['wander_tolerance']:.0f}% under this load): the device has not "
            "changed beyond what the load moves, so the plan does not either (the new best: "
            f"{100 * evidence['accuracy_gain']:+.2f} pt on the stored frames)"
        )
        return Choice(solution, crossfit.frontier, crossfit=crossfit, kept_previous=evidence)
    return Choice(crossfit.solution, crossfit.frontier, crossfit=crossfit)


# A recalibration's options that, when equal, make the plan it replaces a candidate for the same goal
SAME_GOAL = ("budget_ms", "budget_fraction", "metric", "backend", "data", "split", "images", "verify_images",
             "policy", "seed", "precision", "frame_size", "max_drop")  # fmt: skip


def _keep_previous(s: _Session, m: Measurements, opts, cost: CostModel, budget_ms: float, new: Solution):
    """Keep the plan this calibration replaces when it was chosen for the same goal on the same frames,
    still fits the budget by this profile within the profile's own uncertainty, and the two profiles
    price both plans (the old and the new best) alike within that uncertainty: then the plans differ
    only by how the profile wandered with the load (on a steep accuracy-cost curve a few percent of
    cost is a point or two of accuracy), and a recalibration that changed the plan would change what
    the camera does for no reason. A device that changed (a new driver, a unit now dearer) moves a
    plan's price beyond the uncertainty, and the new best is taken. Returns (its solution, the
    evidence) or None."""
    import json

    cal = s.cascade.artifact.calibration
    if cal is None or cal.thresholds is None or len(cal.thresholds) != m.conf.shape[1]:
        return None
    block = cal.to_dict()
    now = json.loads(json.dumps({k: getattr(opts, k) for k in SAME_GOAL}))
    if any((block.get("options") or {}).get(k) != now[k] for k in SAME_GOAL) or not block.get("latency"):
        return None
    field = "mean_ms" if opts.metric == "mean" else "p95_ms"
    try:  # the old block is a file's word: a latency table that does not read is no evidence
        before = CostModel.from_latency_block(block["latency"], m.conf.shape[1], field)
    except (KeyError, TypeError, ValueError):
        return None
    old = m.evaluate(cost, list(cal.thresholds), opts.metric)
    fit, wander = _keep_tolerance(m)

    def price(c: CostModel, th) -> float:  # a share of the full model for a percent budget, else ms
        ms = m.evaluate(c, th, opts.metric).latency_ms
        return float(np.divide(ms, c.full_ms())) if opts.budget_fraction is not None else ms

    with np.errstate(divide="ignore", invalid="ignore"):
        # np.max: Python's max drops a NaN that is not first
        moved = float(
            np.max([abs(np.divide(price(cost, th), price(before, th)) - 1) for th in (old.thresholds, new.thresholds)])
        )
    # (a zero, negative or non-finite old price reads as "changed": NaN would pass any comparison)
    if not (np.isfinite(moved) and moved <= wander) or old.latency_ms > budget_ms * (1 + fit):
        return None
    evidence = {"thresholds": list(cal.thresholds), "predicted_ms": float(old.latency_ms),
                "cost_tolerance": fit, "profile_moved": float(moved), "wander_tolerance": wander,
                "accuracy_gain": float(new.accuracy - old.accuracy),
                "new_thresholds": new.plan.to_list()}  # fmt: skip
    return old, evidence


# Two profiles of one unchanged device, each taken beside two processes spinning on a 2-core VM, priced
# the same plan up to 11 % apart as a share of the full model, while each reported its quiet level within
# ±1.4-2.3 % (docs/results.md, "Calibration on a busy device"): the rounds of one profile share the
# moment's state, so their standard error understates how far the next profile lands.
BUSY_WANDER = 0.12


def _keep_tolerance(m: Measurements) -> tuple[float, float]:
    """(how far over the budget a kept plan may be priced, how far two profiles may price a plan apart
    before the device counts as changed): twice the relative standard error of this profile's quiet
    level (1 % to 5 %) for both; on a profile taken busy, the wander measured between busy profiles."""
    load = m.load or {}
    fit = min(max(2 * float(load.get("quiet_error") or 0.0), 0.01), 0.05)
    busy = verdict(load)[0] != "quiet" if load else False
    return fit, max(fit, BUSY_WANDER) if busy else fit


def _choose_within_drop(m: Measurements, opts, cost: CostModel, budget_ms: float, say) -> Choice:
    """The cheapest plan whose accuracy drop against the full model is certified within --max-drop at
    --confidence on every stored frame (fixed-sequence testing, see calibrate/promise.py `certify`)."""
    p = _certify(m, opts, cost, opts.max_drop, budget_ms if opts.limited else None)
    k, n = m.conf.shape[1], m.num_frames
    if p.thresholds is None and opts.limited and cost.full_ms() > budget_ms + 1e-9:
        raise UserError(
            f"--max-drop {100 * opts.max_drop:.2f}pt cannot be met within the budget {budget_ms:.3f} ms: no plan "
            f"within it is certified at {100 * opts.confidence:.0f}% on {n} frames; raise the budget, allow a "
            f"larger drop, or store more frames (export --calib-images)"
        )
    th = p.thresholds if p.thresholds is not None else CascadePlan.full_model(k).thresholds
    chosen = m.evaluate(cost, th, opts.metric)
    advice = _frames_advice(m, cost, p, opts.max_drop)
    say(
        f"  --max-drop {100 * opts.max_drop:.2f}pt at {100 * opts.confidence:.0f}% confidence: the fastest plan whose "
        f"accuracy drop vs the full model is at most {100 * p.drop_bound:.2f} pt with that confidence on {n} "
        f"frames; predicted {chosen.latency_ms:.3f} ms (measured below)"
    )
    for x, need in advice.items():
        say(
            f"  {x}× as fast within {100 * opts.max_drop:.2f} pt "
            + (
                f"would need ≈ {need:,} stored frames: re-export with --calib-images {need}"
                if need
                else "is out of reach"
            )
        )
    _, frontier = optimize(m.conf, m.correct, cost, budget_ms, opts.metric, pairs=False)
    return Choice(chosen, frontier, promise=p, frames_needed=advice)


def _verify(
    s: _Session, m: Measurements, opts, cost: CostModel, budget_ms: float, choice: Choice, iso: Promise, say
) -> Verification:
    """The chosen plan, the MSDNet baseline, the full model and the iso-accuracy point, each run for
    real on the verification half (then, in the budget mode, the latency correction)."""
    k, full_ms = m.conf.shape[1], cost.full_ms()
    note = None
    if budget_ms >= full_ms and opts.limited:
        final_acc = float(m.correct[:, -1].mean())
        note = (
            f"budget {budget_ms:.3f} ms is at or above the full model ({full_ms:.3f} ms): final-exit accuracy "
            f"({final_acc:.4f}) is kept; thresholds only add exits that help"
        )  # said as a warning when the budget was read (`_budget`); kept in the report
    base = msdnet_baseline(m.conf, m.correct, cost, budget_ms, opts.metric)
    full_solution = m.evaluate(cost, CascadePlan.full_model(k).thresholds, opts.metric)
    # the chosen plan, the full model and the baseline on the same moments: their latencies compare
    runs = s.run_together([choice.solution, full_solution] + ([base] if base is not None else []))
    chosen, full, baseline = runs[0], runs[1], (runs[2] if base is not None else None)
    iso_point = None
    if opts.iso_accuracy and iso.thresholds is not None:
        iso_point = IsoAccuracy(s.run(m.evaluate(cost, iso.thresholds, opts.metric)), iso.drop_bound, ISO_ACCURACY_DROP)
    correction, approach = None, choice.crossfit.chosen if choice.crossfit is not None else None
    if approach is not None:
        chosen, correction, share = _hold_measured(s, m, opts, cost, budget_ms, chosen, full, approach, say)
    else:
        share = chosen.share_of(full, f"{opts.metric}_ms")
    return Verification(chosen, full, baseline, iso_point, correction, note, share)


REFIT_TOLERANCE = 1.03  # a plan measured above budget x this is refitted
REFITS = 2


def _hold_measured(
    s: _Session, m: Measurements, opts, cost: CostModel, budget_ms: float, chosen: Verified, full: Verified,
    approach: str, say,
) -> tuple[Verified, LatencyCorrection | None, float]:  # fmt: skip
    """Hold the budget for what runs (returns the plan, the correction if one was needed, and the plan's
    measured share of the full model). The plan and the full model ran interleaved, on the same moments:
    the plan's measured share of the full model, times the cost model's (quiet) full model, is what the
    plan costs on the quiet device, whatever the load while it was measured. The cost model adds up
    pieces profiled apart, and a cascade alternating between them can run slower (1.2x measured on an
    AVX-512 Xeon for 6 evaluated exits); when the plan overruns the budget that way by more than 3 %,
    the same approach is refitted at the budget scaled by measured/predicted and measured again against
    the full model, at most twice: the budget holds as a share of the full model. Only an overrun the
    measurement is sure of refits (the low end of the share's 90 % interval over the tolerance): beside
    other work a check of a few hundred frames moves by several percent, and a refit on that noise
    changed the plan from one calibration to the next."""
    from edgeexit.calibrate.optimizer import APPROACHES

    key, full_pred = f"{opts.metric}_ms", cost.full_ms()
    first, correction, current, now_full = chosen, None, chosen, full
    share, low, _high = current.share_interval(now_full, key)  # a bootstrap: read once per measurement
    for _ in range(REFITS):
        quiet_ms, predicted = share * full_pred, getattr(current.solution, key)
        if not opts.limited or low * full_pred <= budget_ms * REFIT_TOLERANCE or predicted <= 0:
            break
        ratio = quiet_ms / predicted
        if correction is None:
            correction = LatencyCorrection(ratio, quiet_ms, None)
        target = budget_ms / ratio
        try:
            th = APPROACHES[approach](m.conf, m.correct, cost, target, opts.metric)
        except UserError:
            th = None
        if th is None:  # nothing cheaper to refit to: keep the plan, say so in the report
            break
        current, now_full = s.run_together([m.evaluate(cost, th, opts.metric), full.solution])
        share, low, _high = current.share_interval(now_full, key)
        correction = LatencyCorrection(correction.ratio, correction.first_measured_ms, first.thresholds)
        say(
            f"  the plan ran {ratio:.2f}x the cost model against the full model on the same moments "
            f"({quiet_ms:.3f} ms quiet-equivalent > budget {budget_ms:.3f} ms): refitted at "
            f"{target:.3f} ms predicted, measured {share * full_pred:.3f} ms quiet-equivalent"
        )
    return current, correction, share


def _measure_ladder(s: _Session, m: Measurements, opts, cost: CostModel, chosen: Verified, console) -> Ladder:
    """The most accurate plan at ``ladder_steps`` budgets from the cheapest cascade to every exit evaluated
    (what the runtime's budget controller moves along when the device slows down or recovers), every rung
    run for real on verification frames, interleaved with the chosen plan: the budget controller compares
    against these measured costs (and per-exit latencies), not the cost model's."""
    from rich.progress import Progress

    from edgeexit.calibrate.ladder import measure_ladder
    from edgeexit.calibrate.optimizer import plan_ladder

    plans = plan_ladder(m.conf, m.correct, cost, cost.min_ms(), cost.all_exits_ms(), opts.ladder_steps, opts.metric)
    rungs = [(b, LadderRung(tuple(sol.plan.to_list()), sol.mean_ms, sol.accuracy)) for b, sol in plans]
    frames = s.frames[s.verify_idx]
    n = min(len(frames), 600)
    with Progress(console=console, transient=True, disable=console is None) as prog:
        task = prog.add_task(f"measuring {len(rungs) + 1} plans of the ladder", total=n)
        timed = measure_ladder(s.cascade, frames, chosen.thresholds, [r.thresholds for _, r in rungs], chosen.measured,
                               max_frames=n, progress=lambda k: prog.update(task, completed=k))  # fmt: skip
    reference = {**timed.reference.latency(), "block_frames": timed.block_frames}
    if timed.block_sd is not None:
        reference["block_sd"] = timed.block_sd
    interleaved = {**timed.interleaved.latency(), "full_mean_ms": timed.full_mean_ms, "speedup": timed.speedup}
    return Ladder(
        tuple(MeasuredRung(b, r, t.latency(), list(t.exit_ms)) for (b, r), t in zip(rungs, timed.rungs, strict=True)),
        list(timed.reference.exit_ms),
        timed.scale,
        interleaved=interleaved,
        reference=reference,
    )


def _assemble(
    s: _Session,
    m: Measurements,
    opts: CalibrationOptions,
    cost: CostModel,
    budget_ms: float,
    choice: Choice,
    verification: Verification,
    ladder: Ladder,
    iso: Promise,
    t_start: float,
) -> CalibrationReport:
    """The report, from the stages' outputs (plus the intervals and curves computed from them)."""
    from edgeexit.calibrate.promise import accuracy_interval, paired_drop

    correct = m.plan_correct(verification.chosen.solution.plan)
    msd_curve = []
    for q in MSDNET_QS:
        sol = m.evaluate(cost, CascadePlan.msdnet(m.conf, q).thresholds, opts.metric)
        msd_curve.append({"q": q, "accuracy": sol.accuracy, "latency_ms": sol.latency_ms})
    return CalibrationReport(
        artifact=str(s.folder),
        backend=s.cascade.runner.info.name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t_start, 1),
        options=opts,
        budget_ms=budget_ms,
        n_frames=m.num_frames,
        full_predicted_ms=cost.full_ms(),
        decided_by=f"all {m.num_frames} stored frames ({s.dataset} {opts.split}); the {len(s.verify_idx)} "
        "verification frames among them were also run through the real cascade",
        choice=choice,
        verification=verification,
        ladder=ladder,
        accuracy_interval_95=accuracy_interval(correct),
        drop=paired_drop(m.correct[:, -1], correct),
        device=fingerprint(s.cascade.runner.info),
        latency=m.latency_block(),
        load=m.load,
        data={
            "dataset": s.dataset,
            "split": opts.split,
            "calibration_images": int(len(s.calib_idx)),
            "verification_images": int(len(s.verify_idx)),
            "seed": opts.seed,
        },
        msdnet_curve=tuple(msd_curve),
        certifiable={"confidence": opts.confidence, "n_frames": m.num_frames, "frontier": iso.frontier},
        drift_reference=_drift_reference(s, m, verification.chosen.solution.plan),
    )


def _drift_reference(s: _Session, m: Measurements, plan: CascadePlan) -> dict | None:
    """What the runtime's drift monitor compares a camera's frames with (runtime/monitor.py): the
    exit confidences of every stored frame on the units and precision calibrated here, the classes
    the chosen plan answers, and each frame's brightness as the network sees it (its preprocessed
    input, read in chunks so a large input size holds one chunk at a time)."""
    from edgeexit.runtime.monitor import frame_levels, reference_statistics

    answered = None
    if m.prediction is not None:
        answered = m.prediction[np.arange(m.num_frames), plan.exit_positions(m.conf)]
    idx = s.decide_idx
    chunks = [frame_levels(s.cascade.preprocessor.batch(s.frames[idx[i : i + 256]])) for i in range(0, len(idx), 256)]
    levels = (np.concatenate([c[0] for c in chunks]), chunks[0][1])
    return reference_statistics(m.conf, answered, len(s.cascade.class_names), plan.to_list(), levels=levels)


def _write(s: _Session, opts: CalibrationOptions, report: CalibrationReport, say) -> CalibrationReport:
    """The plot first, then the manifest: no file the manifest names is written after it. Returns the
    report with the plot's path (when matplotlib drew it)."""
    plot_path = Path(opts.plot) if opts.plot else s.folder / "calibration.png"
    try:
        from edgeexit.calibrate.report import calibration_plot

        calibration_plot(report.to_json(), plot_path)
        report = replace(report, plot=str(plot_path))
    except ImportError:
        say("  (matplotlib not installed: no plot)")
    from edgeexit.calibrate.history import PREVIOUS_NAME, describe, keep_previous

    replaced = keep_previous(s.cascade.artifact)  # saved before the manifest changes: never lost
    write_calibration(s.cascade.artifact, report.manifest_block())
    if replaced is not None:
        say(
            f"  [yellow]replaced[/] the earlier calibration ({esc(describe(replaced))}); it is kept in "
            f"{PREVIOUS_NAME}: `edgeexit calibrate {esc(str(s.folder))} --restore` puts it back"
        )
    return report
