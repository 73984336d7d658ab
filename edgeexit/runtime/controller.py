"""Holding a latency budget while the device drifts (the controller needs only the standard library,
runtime.latency's percentile and the typed calibration of runtime.artifact; it never runs the cascade).

A calibration is a snapshot: a Jetson that throttles, a camera pipeline sharing the CPU or a
second app thread makes every unit slower, and fixed thresholds then overrun their budget exactly
when it matters. `BudgetController` moves between pre-computed plans (SPINN / Edgent style): the
calibration's *ladder* (the most accurate plan at ≥ 16 budgets) plus the calibrated plan itself.

**What calibration measured, per rung.** `calibrate` runs every rung for real on the verification
frames, interleaved with the chosen plan and the full model (calibrate/ladder.py), and stores each
rung's quiet latency (mean and p95) and its mean latency per exit taken, all measured on the same
moments: on a shared VM the speed wanders by ±30 % over seconds, so a plan timed alone (the
verification run) is one moment's sample, not the reference. The controller compares against those
measurements, not the cost model's prediction (which can be 20 % off for multi-exit plans). A
ladder from an older calibration without them falls back to prediction × the calibrated plan's
measured/predicted ratio, learned online while quiet.

**The device's slowdown, not the images'.** A frame that goes to the last exit costs more than one
that leaves at the first, so a window of harder images is slower on a quiet device. Each frame's
latency is therefore divided by what calibration measured *for the exit it took* on the current
rung: ``ŝ = Σ latency / Σ expected(exit)`` (for the p95 metric, the window's p95 over the rung's
quiet p95, corrected by the same data-mix factor). ``ŝ`` is 1 under the conditions of calibration
whatever the images.

After every window of ``window`` frames (or earlier, see the trip below):

- ``s̄`` is the larger of this window's ``ŝ`` and the last one's (an envelope: a step is seen in
  one window, a recovery is believed when two windows agree);
- ``σ_q`` is the window-to-window standard deviation of ``ŝ`` in quiet windows (seeded from the
  calibration's measured spread), ``σ_d`` the recent one in any window (what contention adds);
  both from successive windows on one rung, each jump counted at most 3 σ;
- **quiet** when ``s̄ ≤ 1 + z·σ_q``: the plan is chosen as at calibration (slowdown 1), so the
  calibrated plan (or a more accurate rung, when the budget is above its measured cost) comes back
  as soon as the device does; a device clearly faster than at calibration (``s̄ + z·σ_q < 1``)
  affords a more accurate rung, chosen for slowdown ``s̄ + z·σ_q``;
- otherwise the plan is chosen for slowdown ``S = s̄ + z_m·σ_d`` (``z_m`` = 1.645: the next window
  over B one time in twenty; the quiet band's ``z`` = 2.5 is wider, so that calibration's own noise
  is not taken for a load): the margin grows with the measured variance, not a fixed constant;
- the chosen rung is the most accurate with ``q·S ≤ budget``, ``q`` its measured quiet latency.
  Down at once; up when the envelope allows it, i.e. after two windows agree.

**Trip**: with the mean metric, a partial window of ≥ ``window/4`` frames whose slowdown already
exceeds ``max(budget/q, s̄)·(1 + 3·σ_q·√(window/n))`` decides at once, so a step change is answered
within a quarter to one window. Per frame this costs a lock, a table lookup, two additions and one
comparison (measured in benchmarks/controller_overhead.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edgeexit.runtime.artifact import Calibration, LadderRung
from edgeexit.runtime.latency import percentile

_sqrt = math.sqrt


@dataclass(frozen=True)
class Rung:
    plan: object  # CascadePlan
    predicted_ms: float
    predicted_accuracy: float
    calibrated: bool = False  # the plan calibration chose (its measured latency anchors "quiet")
    measured_ms: dict | None = None  # {"mean_ms", "p95_ms"} measured by calibrate on this rung
    exit_ms: tuple | None = None  # mean latency per exit position (0-based) taken, measured; None: unseen


def build_ladder(rows: Sequence[LadderRung], make_plan, calibrated: LadderRung | None = None) -> list[Rung]:
    """Distinct plans from the calibration's ladder, cheapest first, each more accurate than the last
    (a plan that costs more and is not more accurate is never worth moving to). ``calibrated``: the
    calibration's own choice, always kept. Rungs carry what calibrate measured, where it did."""

    def to_rung(row: LadderRung, is_calibrated: bool) -> Rung:
        meas = row.measured
        measured = {"mean_ms": meas.mean_ms, "p95_ms": meas.p95_ms} if meas is not None and meas.complete else None
        exits = row.exit_ms if measured is not None else None
        plan = make_plan(row.thresholds)
        return Rung(plan, row.predicted_ms, row.predicted_accuracy, is_calibrated, measured, exits)

    rungs: dict[tuple, Rung] = {}
    if calibrated is not None:
        rungs[tuple(calibrated.thresholds)] = to_rung(calibrated, True)
    for row in rows:
        rungs.setdefault(tuple(row.thresholds), to_rung(row, False))
    every_measured = all(r.measured_ms is not None for r in rungs.values())

    def cost(r: Rung) -> float:  # rank by what was measured when every rung was
        return r.measured_ms["mean_ms"] if every_measured and r.measured_ms is not None else r.predicted_ms

    ladder: list[Rung] = []
    for rung in sorted(rungs.values(), key=lambda r: (cost(r), -r.predicted_accuracy)):
        if rung.calibrated:  # the calibrated plan stays; dearer plans that are not more accurate go
            while ladder and ladder[-1].predicted_accuracy >= rung.predicted_accuracy and not ladder[-1].calibrated:
                ladder.pop()
            ladder.append(rung)
        elif not ladder or rung.predicted_accuracy > ladder[-1].predicted_accuracy:
            ladder.append(rung)
    return ladder


class BudgetController:
    """See the module docstring. ``measured_ms``: the calibrated plan's measured window metric
    (its quiet latency); ``noise``: a seed for σ_q (relative window-to-window sd of the slowdown);
    ``apply``: called with the new plan, under the controller's lock, at every switch. ``z``: the quiet
    band in σ_q; ``margin_z``: the margin in σ_d."""

    def __init__(
        self,
        ladder: list[Rung],
        budget_ms: float,
        window: int = 32,
        metric: str = "mean",
        measured_ms: float | None = None,
        noise: float | None = None,
        z: float = 2.5,
        margin_z: float = 1.645,
        learn: float = 0.1,
        apply=None,
        start: int | None = None,
    ) -> None:
        if not ladder:
            raise ValueError("the budget controller needs a calibration ladder: run `edgeexit calibrate` again")
        if metric not in ("mean", "p95"):
            raise ValueError(f"metric must be mean or p95, got {metric!r}")
        if not (isinstance(window, int) and window >= 4):
            raise ValueError(f"window must be an integer >= 4 frames, got {window!r}")
        self.ladder = ladder
        self.budget_ms = float(budget_ms)
        self.window = window
        self.metric = metric
        self.z, self.margin_z, self.learn = float(z), float(margin_z), float(learn)
        self.apply = apply
        self.anchor = next((i for i, r in enumerate(ladder) if r.calibrated), None)
        self._quiet_costs(measured_ms)
        self._tables = [self._table(i) for i in range(len(ladder))]
        self.sigma_q = max(0.01, float(noise)) if noise is not None else 0.05
        self.sigma_d = self.sigma_q
        self.envelope = 1.0
        self.slowdown = 1.0
        self._s_prev = 1.0  # the last window's slowdown
        self.quiet = True
        self.window_ms: float | None = None
        self.switches = 0
        self.windows = 0
        self.history: list[tuple[float, int]] = []  # (time, rung) at every switch, for benchmarks
        self._prev: tuple[int, float, bool] | None = None  # (rung, ŝ, quiet) of the last window
        self._lock = threading.Lock()
        self._lat: list[float] = []
        self._sum, self._exp, self._n = 0.0, 0.0, 0
        self.index = self._choose(1.0, quiet=True) if start is None else int(start)
        self._expect = self._tables[self.index]
        self._set_trip()

    def _quiet_costs(self, measured_ms: float | None) -> None:
        """q: each rung's quiet window metric; measured by calibrate where it could, else the prediction
        × the calibrated plan's measured/predicted ratio (learned online while quiet)."""
        ladder, anchor, field = self.ladder, self.anchor, f"{self.metric}_ms"
        anchor_measured = ladder[anchor].measured_ms if anchor is not None else None
        if measured_ms is None and anchor_measured is not None:
            measured_ms = anchor_measured[field]
        ratio = 1.0
        if anchor is not None and measured_ms is not None and measured_ms > 0:
            ratio = measured_ms / max(1e-12, ladder[anchor].predicted_ms)
        self.bias = ratio  # measured / predicted, for rungs calibration did not measure
        self.quiet_ms = [r.measured_ms[field] if r.measured_ms else r.predicted_ms * ratio for r in ladder]
        if anchor is not None and measured_ms is not None:
            self.quiet_ms[anchor] = float(measured_ms)
        self._learned = [r.measured_ms is not None or (i == anchor and measured_ms is not None)
                         for i, r in enumerate(ladder)]  # fmt: skip
        self._fixed = list(self._learned)  # measured at calibration: never relearned
        self._seen = [0] * len(ladder)

    def _table(self, i: int) -> tuple[float, ...]:
        """Expected quiet latency of a frame on rung ``i`` by the exit number it took (index 0: unknown)."""
        r = self.ladder[i]
        mean = r.measured_ms["mean_ms"] if r.measured_ms else self.quiet_ms[i]
        per = r.exit_ms or ()
        return (mean,) + tuple(v if v is not None else mean for v in per) + (mean,) * 64

    @property
    def plan(self):
        return self.ladder[self.index].plan

    # -- the decision ----------------------------------------------------------------------------
    def _choose(self, slowdown: float, quiet: bool) -> int:
        best = 0
        for i, q in enumerate(self.quiet_ms):
            if q * slowdown <= self.budget_ms * (1 + 1e-9):
                best = i
        return best

    def _set_trip(self) -> None:
        """The partial-window slowdown above which the mean metric decides before the window ends:
        ``level·(1 + 3·σ_q·√(window/n))`` for ``n ≥ window/4`` frames (two numbers, no table)."""
        self._trip_first = max(2, self.window // 4) if self.metric == "mean" else math.inf
        self._trip_level = max(self.budget_ms / max(1e-12, self.quiet_ms[self.index]), self.envelope)
        self._trip_k = 3 * self.sigma_q * math.sqrt(self.window)

    def observe(self, latency_ms: float, exit_index: int = 0):
        """Record one frame's latency and the exit number it took (1-based; 0: unknown); return the
        new plan when the controller switches, else None."""
        with self._lock:
            total, expected, n = self._sum + latency_ms, self._exp + self._expect[exit_index], self._n + 1
            self._sum, self._exp, self._n = total, expected, n
            if self.metric == "p95":  # every latency of the window is kept
                self._lat.append(latency_ms)
                if n < self.window:
                    return None
            elif n < self.window and not (
                n >= self._trip_first and total > expected * self._trip_level * (1 + self._trip_k / _sqrt(n))
            ):
                return None
            return self._decide()

    def _decide(self):
        i = self.index
        n = self._n
        full = n >= self.window
        mean_expected = self._exp / n  # the rung's quiet mean for the exits these frames took
        if self.metric == "mean":
            m = self._sum / n
            s = self._sum / max(1e-12, self._exp)
        else:
            m = percentile(self._lat, 95)
            mix = mean_expected / max(1e-12, self._expect[0])  # harder images than calibration's: > 1
            s = m / max(1e-12, self.quiet_ms[i] * mix)
        self._sum, self._exp, self._n, self._lat = 0.0, 0.0, 0, []
        self.window_ms, self.slowdown, self.windows = m, s, self.windows + 1
        # variance: successive full windows on the same rung
        if full and self._prev is not None and self._prev[0] == i:
            # a jump beyond 3 σ counts as 3 σ: a step is a change of level (the envelope's job), not noise
            d2 = 0.5 * min((s - self._prev[1]) ** 2, 9 * self.sigma_d**2)
            self.sigma_d = math.sqrt((1 - 0.25) * self.sigma_d**2 + 0.25 * d2)
            # the accepted noise: pairs whose first window was quiet, whatever the second (counting only
            # second windows inside the band truncated the sample: σ_q shrank, the band with it, and a
            # quiet device looked loaded); a jump beyond 3 σ_q counts as 3 σ_q (a step is no noise)
            if self._prev[2]:
                d2q = min(0.5 * (s - self._prev[1]) ** 2, 4.5 * self.sigma_q**2)
                self.sigma_q = max(0.01, math.sqrt((1 - 0.05) * self.sigma_q**2 + 0.05 * d2q))
        # the envelope: the larger of this window's slowdown and the last one's. A step up is answered
        # in this window; a return to quiet is believed after two windows agree (one lucky window is
        # not a recovery), with no slower decay (the device's quiet comes back at once, so should we)
        self.envelope = max(s, self._s_prev)
        self._s_prev = s
        quiet = self.envelope <= 1 + self.z * self.sigma_q
        self.quiet = quiet
        if full and quiet and not self._fixed[i]:  # an unmeasured rung (older calibration) learns its cost
            self._learn(i, m)
        self._prev = (i, s, quiet) if full else None
        # quiet: as at calibration (slowdown 1), or as fast as the device now clearly is (a quieter device
        # than calibration's affords a more accurate rung); else the slowdown plus a margin of the
        # variance measured under these conditions
        if not quiet:
            slowdown = self.envelope + self.margin_z * self.sigma_d
        elif all(self._fixed):  # every rung's quiet cost measured: a faster device is measurable too
            slowdown = min(1.0, self.envelope + self.z * self.sigma_q)
        else:  # costs learned online are learned against slowdown 1
            slowdown = 1.0
        target = self._choose(slowdown, quiet)
        if target != i:
            self.index = target
            self._expect = self._tables[target]
            self.switches += 1
            self.history.append((time.perf_counter(), target))
            self._prev = None
            if self.apply is not None:
                self.apply(self.ladder[target].plan)
            self._set_trip()
            return self.ladder[target].plan
        self._set_trip()
        return None

    def _learn(self, i: int, m: float) -> None:
        self._seen[i] += 1  # a running mean at first, then an average of the last ~1/learn windows
        q = self.quiet_ms[i] + max(self.learn, 1 / self._seen[i]) * (m - self.quiet_ms[i])
        if self.anchor is not None and i < self.anchor:
            q = min(q, self.quiet_ms[self.anchor])
        self.quiet_ms[i] = q
        self._learned[i] = True
        rate = max(self.learn, 1 / self._seen[i]) if self.anchor is None else self.learn
        self.bias += rate * (q / max(1e-12, self.ladder[i].predicted_ms) - self.bias)
        for j, r in enumerate(self.ladder):  # rungs not run quiet yet follow the learned bias
            if not self._learned[j]:
                self.quiet_ms[j] = r.predicted_ms * self.bias
        self._tables = [self._table(j) for j in range(len(self.ladder))]
        self._expect = self._tables[self.index]

    def state(self) -> dict:
        return {
            "budget_ms": self.budget_ms,
            "metric": self.metric,
            "plan_index": self.index,
            "calibrated_index": self.anchor,
            "plans": len(self.ladder),
            "measured_rungs": sum(r.measured_ms is not None for r in self.ladder),
            "quiet_ms": self.quiet_ms[self.index],
            "predicted_ms": self.ladder[self.index].predicted_ms,
            "slowdown": self.slowdown,
            "envelope": self.envelope,
            "quiet": self.quiet,
            "sigma_quiet": self.sigma_q,
            "sigma_recent": self.sigma_d,
            "margin": 0.0 if self.quiet else self.margin_z * self.sigma_d,
            "window_ms": self.window_ms,
            "windows": self.windows,
            "switches": self.switches,
        }


def calibrated_ladder(calibration: Calibration, make_plan) -> list[Rung]:
    """The controller's ladder of a calibration: its rungs and the calibrated plan (a rung of its own,
    measured on the ladder's scale when calibrate measured that: its quiet anchor)."""
    cal = calibration
    chosen = None
    if cal.thresholds is not None and cal.predicted_ms is not None:
        measured = cal.reference if cal.reference is not None else cal.measured
        chosen = LadderRung(cal.thresholds, cal.predicted_ms, cal.predicted_accuracy or 0.0, measured, cal.exit_ms)
    return build_ladder(cal.ladder, make_plan, chosen)


def controller_for(calibration: Calibration, ladder: list[Rung], budget_ms: float, apply=None, window=None):
    """A controller seeded from a calibration: the calibrated plan's measured latency (its
    ``reference`` on the ladder's scale when calibrate measured one, else the verification run) and
    its spread (the block-to-block sd calibrate measured, else one guessed from the frame p95)."""
    # 64 frames: on a shared CPU a 32-frame window's slowdown has a sd of ~8 % (white noise the envelope and
    # the margin then pay for twice); a step is still answered within 16-64 frames (the trip)
    w = window or 64
    meas = calibration.measured
    ref = calibration.reference
    if ref is not None and ref.complete:
        meas = ref  # a broken reference falls back to the verification run
    noise = None
    if meas is not None and meas.block_sd is not None and meas.block_frames is not None:
        noise = min(0.5, meas.block_sd * math.sqrt(meas.block_frames / w))  # block-mean sd -> window-mean sd
    elif meas is not None and meas.mean_ms is not None and meas.p95_ms is not None and meas.p95_ms > meas.mean_ms:
        noise = (meas.p95_ms - meas.mean_ms) / 1.645 / math.sqrt(w) / meas.mean_ms  # frame sd -> window-mean sd
    return BudgetController(
        ladder,
        budget_ms,
        window=w,
        metric=calibration.metric,
        measured_ms=meas.of(calibration.metric) if meas is not None else None,
        noise=noise,
        apply=apply,
    )
