"""The typed outputs of `edgeexit calibrate`'s stages and the report assembled from them (numpy only).

`run.py` runs the stages; each returns one of these frozen values, which the next stage reads and none
changes: `Measurements` → `Choice` → `Verification` (of `Verified` rows) → `Ladder` → `CalibrationReport`.
The report's `.manifest_block()` is the manifest's calibration, typed (`edgeexit.runtime.artifact.Calibration`,
whose `LadderRung` the ladder reuses, holding the whole block) and its `.to_json()` is what
`run_calibration` returns and `calibrate --json` writes: both keep every key they had as a dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgeexit.calibrate.optimizer import CostModel, CrossFit, Solution, evaluate
from edgeexit.calibrate.options import CalibrationOptions
from edgeexit.calibrate.promise import DropEstimate, Promise
from edgeexit.runtime.artifact import Calibration, LadderRung, parse_calibration
from edgeexit.runtime.latency import percentile
from edgeexit.runtime.plan import CascadePlan
from edgeexit.runtime.profiling import quiet_share

# What the report keeps of `edgeexit.runtime.profiling.verify` for every plan it ran.
MEASURED = ("accuracy", "latency_ms", "mean_ms", "p50_ms", "p95_ms", "samples", "exit_shares")


@dataclass(frozen=True)
class Measurements:
    """What `_measure` timed and collected on this device (every field set when it returns)."""

    profile: dict  # Cascade.profile: {"units": name -> stats, "decision": stats}
    groups: dict | None  # fused exit groups' latency, on a runner that fuses (None: units run one by one)
    overhead_ms: float  # per frame, outside the units
    conf: np.ndarray  # (frames, exits): exit statistics of every deciding frame (calibration + verification)
    correct: np.ndarray  # (frames, exits) bool
    prediction: np.ndarray | None = None  # (frames, exits) class per exit (the drift monitor's class shares)
    load: dict | None = None  # how busy the device was while profiling (calibrate/load.py)
    exit_step_ms: float = 0.0  # the cascade's own work per evaluated exit (`profiling.exit_step_from`)

    @property
    def num_frames(self) -> int:
        return len(self.conf)

    def cost(self, metric: str) -> CostModel:
        field = "mean_ms" if metric == "mean" else "p95_ms"
        units, decision = self.profile["units"], self.profile["decision"][field]
        k = self.conf.shape[1]
        return CostModel.from_timings(k, units, field, decision, self.overhead_ms, self.groups, self.exit_step_ms)

    def evaluate(self, cost: CostModel, th, metric: str) -> Solution:
        return evaluate(self.conf, self.correct, cost, th, metric)

    def plan_correct(self, plan: CascadePlan) -> np.ndarray:
        """Which deciding frames ``plan`` gets right (from the exit statistics)."""
        return self.correct[np.arange(len(self.correct)), plan.exit_positions(self.conf)]

    def latency_block(self) -> dict:
        return {
            "batch": 1,
            "units": self.profile["units"],
            "decision_ms": self.profile["decision"]["mean_ms"],
            "frame_overhead_ms": self.overhead_ms,
            "exit_step_ms": self.exit_step_ms,
            **({"exit_groups": self.groups} if self.groups is not None else {}),
        }


@dataclass(frozen=True)
class Choice:
    """The plan chosen on the stored frames, and how."""

    solution: Solution
    frontier: list  # the optimiser's accuracy-latency frontier (Solutions) on every frame
    promise: Promise | None = None  # --max-drop: the fixed-sequence test that certified the plan
    frames_needed: dict | None = None  # --max-drop: speed-up -> frames that would certify it (None: out of reach)
    crossfit: CrossFit | None = None  # budget mode: the approach chosen out of fold
    # budget mode: the evidence for keeping the plan this calibration replaces (`run._keep_previous`)
    kept_previous: dict | None = None


@dataclass(frozen=True)
class Verified:
    """A plan run for real through the cascade on the verification frames."""

    solution: Solution  # the plan and what the cost model predicted for it on the stored frames
    measured: dict  # `MEASURED` of `verify`
    block_ms: tuple[float, ...] = ()  # mean latency per interleaved block (`verify_together`)
    # (latency_ms, exit_index) of every frame, in order (`verify_together`): the quiet share's input
    frames: tuple[tuple[float, ...], tuple[int, ...]] | None = None

    def share_of(self, other: Verified, key: str) -> float:
        """This plan's latency over ``other``'s, the two run interleaved (`share_interval`'s point)."""
        return self.share_interval(other, key)[0]

    def share_interval(self, other: Verified, key: str) -> tuple[float, float, float]:
        """This plan's latency over ``other``'s, the two run interleaved, with a 90 % interval: for the
        mean, the ratio of their quiet means (`profiling.quiet_share`: per exit, the frames not
        interrupted by other work; beside two busy processes on the 2-core VM, the median of 50-frame
        block ratios read one plan 0.34-1.29 of the full model over eight checks where this read
        0.66-0.77, its quiet reference 0.74: docs/results.md); else the median over blocks of their
        block-mean ratio (a burst
        that hit one block moves one ratio, not the answer), without an interval; the ratio of ``key``
        when neither is known."""
        if key == "mean_ms" and self.frames is not None and other.frames is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                share = quiet_share(self.frames, other.frames)
            if all(np.isfinite(share)) and share[0] > 0:  # a clock that read 0 ms leaves the blocks to judge
                return share
        n = min(len(self.block_ms), len(other.block_ms))
        if n == 0:
            r = self.measured[key] / other.measured[key]
        else:
            r = percentile([a / b for a, b in zip(self.block_ms[:n], other.block_ms[:n], strict=True)], 50)
        return r, r, r

    @property
    def thresholds(self) -> list[float]:
        return self.solution.plan.to_list()

    def predicted_dict(self) -> dict:
        s = self.solution
        return {
            "accuracy": s.accuracy,
            "latency_ms": s.latency_ms,
            "mean_ms": s.mean_ms,
            "p95_ms": s.p95_ms,
            "exit_shares": s.exit_shares,
        }


@dataclass(frozen=True)
class LatencyCorrection:
    """The real cascade overran the budget: the cost model's ratio and what ran first."""

    ratio: float  # measured / predicted
    first_measured_ms: float
    first_thresholds: list | None  # None: nothing cheaper to refit to, the plan was kept

    def to_dict(self) -> dict:
        out = {"ratio": self.ratio, "first_measured_ms": self.first_measured_ms}
        if self.first_thresholds is None:
            return {**out, "refit": False}
        return {**out, "first_thresholds": self.first_thresholds}


@dataclass(frozen=True)
class IsoAccuracy:
    """The cheapest plan certified within ``max_drop`` of the full model, run for real."""

    verified: Verified
    drop_bound: float
    max_drop: float

    def to_dict(self, full: Verified) -> dict:
        m = self.verified.measured
        return {
            "max_drop": self.max_drop,
            "drop_bound": self.drop_bound,
            "predicted": self.verified.predicted_dict(),
            "measured": dict(m),
            "thresholds": self.verified.thresholds,
            "latency_fraction_of_full": m["latency_ms"] / full.measured["latency_ms"],
            "accuracy_drop_vs_full_measured": full.measured["accuracy"] - m["accuracy"],
        }


@dataclass(frozen=True)
class Verification:
    """Every plan the report names, each run for real on the verification frames."""

    chosen: Verified  # what calibration chose (after the latency correction, if one was needed)
    full: Verified  # the full model (every intermediate exit skipped)
    baseline: Verified | None  # MSDNet's geometric thresholds at the same budget (None: none fits)
    iso: IsoAccuracy | None  # None: not asked for, or nothing faster than the full model certified
    correction: LatencyCorrection | None
    note: str | None
    # the chosen plan's measured latency (--metric) over the full model's, the two run interleaved
    fraction_of_full: float | None = None


@dataclass(frozen=True)
class MeasuredRung:
    """One ladder rung: the manifest's `LadderRung` and what the real cascade measured for it."""

    budget_ms: float
    rung: LadderRung
    measured: dict  # {mean_ms, p95_ms, frames}
    exit_ms: list  # mean latency per exit position taken (None where no frame left there)

    def to_dict(self) -> dict:
        return {
            "budget_ms": self.budget_ms,
            "thresholds": list(self.rung.thresholds),
            "predicted_ms": self.rung.predicted_ms,
            "predicted_accuracy": self.rung.predicted_accuracy,
            "measured": self.measured,
            "exit_ms": self.exit_ms,
        }


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[MeasuredRung, ...]
    chosen_exit_ms: list  # the chosen plan's latency per exit position, on the rungs' scale
    scale: float  # verification-run / interleaved-run latency of the chosen plan
    # the chosen plan as the interleaved run timed it, beside the full model on the same moments:
    # {mean_ms, p95_ms, frames, full_mean_ms, speedup}
    interleaved: dict | None = None
    # the chosen plan on the rungs' scale, what the budget controller anchors on, with the
    # block-to-block sd of its slowdown: {mean_ms, p95_ms, frames, block_frames, block_sd}
    reference: dict | None = None


@dataclass(frozen=True)
class CalibrationReport:
    """One calibration, assembled once from the stages' outputs."""

    artifact: str
    backend: str
    created: str
    seconds: float
    options: CalibrationOptions
    budget_ms: float
    n_frames: int  # every deciding frame
    full_predicted_ms: float  # the cost model's full model (every intermediate exit skipped)
    decided_by: str
    choice: Choice
    verification: Verification
    ladder: Ladder
    accuracy_interval_95: tuple[float, float]  # of the chosen plan, on the stored frames
    drop: DropEstimate  # of the chosen plan vs the full model, paired, on the stored frames
    device: dict
    latency: dict
    data: dict
    msdnet_curve: tuple[dict, ...]
    certifiable: dict
    plot: str | None = None
    drift_reference: dict | None = None  # runtime/monitor.py `reference_statistics`, on the stored frames
    # what the budget covers: the cascade on network-size frames, or (--frame-size) the frame, with the
    # preprocessing cost measured at that size (calibrate/run.py `_frame_cost`)
    frame: dict | None = None
    # how busy the device was while profiling (calibrate/load.py): cpu_share, preemptions_per_s, the
    # rounds' slowdown and quiet_spread, the verdict; None in reports built without a profile
    load: dict | None = None

    @property
    def verified_drop(self) -> float:
        """The full model's measured accuracy minus the chosen plan's, on the verification frames."""
        v = self.verification
        return v.full.measured["accuracy"] - v.chosen.measured["accuracy"]

    def manifest_block(self) -> Calibration:
        """The manifest's calibration, checked and typed as the next load reads it: the report without
        the artifact's path and the plot, stamped with the time and the backend. Most of the block is
        calibrate's evidence (options, frontier, cross-fit, iso-accuracy, data, device), which the
        runtime does not interpret: `Calibration` types what it reads and keeps the block whole."""
        block = {**self._body(curves=False), "created": self.created, "backend": self.backend}
        return parse_calibration(block, len(self.verification.chosen.thresholds), where="the calibration report")

    def to_json(self) -> dict:
        """What `run_calibration` returns and `calibrate --json` writes: the report with the artifact's
        path, the plot's curves and the plot's path (when one was drawn)."""
        out = {"artifact": self.artifact, **self._body(curves=True)}
        return {**out, "plot": self.plot} if self.plot is not None else out

    def _measured_block(self) -> dict:
        """The chosen plan as measured: the verification run, its drop, and the ladder's view of it
        (per-exit latency, the scale, the interleaved run and the reference the controller anchors on)."""
        v, ladder = self.verification, self.ladder
        measured = {
            **v.chosen.measured,
            "drop_vs_full": self.verified_drop,
            "exit_ms": ladder.chosen_exit_ms,
            "ladder_scale": ladder.scale,
        }
        if ladder.interleaved is not None:
            measured["interleaved"] = ladder.interleaved
        if ladder.reference is not None:
            measured["reference"] = ladder.reference
        if v.fraction_of_full is not None:
            measured["fraction_of_full"] = v.fraction_of_full
        return measured

    def _body(self, curves: bool) -> dict:
        o, v, c = self.options, self.verification, self.choice
        chosen = v.chosen
        predicted = {
            **chosen.predicted_dict(),
            "accuracy_interval_95": list(self.accuracy_interval_95),
            "drop_vs_full": self.drop.drop,
            "drop_interval_95": list(self.drop.interval(0.95)),
        }
        oof = c.crossfit.out_of_fold.get(c.crossfit.chosen) if c.crossfit is not None else None
        if oof:
            predicted["out_of_fold_accuracy"] = oof["accuracy"]
        measured = self._measured_block()
        out = {
            "budget_ms": self.budget_ms,
            "metric": o.metric,
            "policy": o.policy,
            "thresholds": chosen.thresholds,
            "evaluated_exits": chosen.solution.evaluated_exits,
            "predicted": predicted,
            "measured": measured,
            "baseline_msdnet": _baseline_block(v.baseline),
            "full_model": {
                "predicted_ms": self.full_predicted_ms,
                "measured": dict(v.full.measured),
                "calibration_accuracy": self.full_calibration_accuracy,
            },
            "iso_accuracy": v.iso.to_dict(v.full) if v.iso is not None else None,
            "note": v.note,
        }
        if v.correction is not None:
            out["latency_correction"] = v.correction.to_dict()
        out["decided_by"] = self.decided_by
        if c.promise is not None:
            out["max_drop"] = self._promise_block()
        if c.crossfit is not None:
            out["cross_fit"] = c.crossfit.to_dict()
        if c.kept_previous is not None:
            out["kept_previous"] = c.kept_previous
        out.update(device=self.device, latency=self.latency, data=self.data)
        if curves:
            out["frontier"] = [{"accuracy": f.accuracy, "latency_ms": f.latency_ms} for f in c.frontier]
            out["msdnet_curve"] = [dict(p) for p in self.msdnet_curve]
        out["options"] = {k: val for k, val in asdict(o).items() if k not in ("plot", "data_dir")}
        out["certifiable"] = self.certifiable
        out["ladder"] = [r.to_dict() for r in self.ladder.rungs]
        if self.drift_reference is not None:
            out["drift_reference"] = self.drift_reference
        if self.frame is not None:
            out["frame"] = self.frame
        if self.load is not None:
            out["load"] = self.load
        out["seconds"] = self.seconds
        return out

    @property
    def full_calibration_accuracy(self) -> float:
        return self.verification.full.solution.accuracy

    def _promise_block(self) -> dict:
        p, o = self.choice.promise, self.options
        return {
            "max_drop": o.max_drop,
            "confidence": o.confidence,
            "method": "fixed-sequence test (Learn-then-Test) of the paired drop vs the full model along a shared "
            "threshold from 1 down, per exit family, Bonferroni over the families",
            "z": p.z,
            "families": [[e + 1 for e in t.exits] for t in p.tests],
            "family": [e + 1 for e in p.family] if p.family else None,
            "drop_bound": p.drop_bound,
            "n_frames": self.n_frames,
            "frontier": p.frontier,
            "frames_needed": self.choice.frames_needed,
            "verified_drop": self.verified_drop,
            "kept": bool(self.verified_drop <= o.max_drop + 1e-12),
        }


def _baseline_block(b: Verified | None) -> dict | None:
    if b is None:
        return None
    return {
        "accuracy": b.measured["accuracy"],
        "latency_ms": b.measured["latency_ms"],
        "predicted": b.predicted_dict(),
        "thresholds": b.thresholds,
    }
