"""Holding a latency budget while the device drifts (stdlib only; issue 21).

A calibration is a snapshot: a Jetson that throttles, a camera pipeline sharing the CPU or a
second app thread makes every unit slower, and fixed thresholds then overrun their budget exactly
when it matters. `BudgetController` moves between pre-computed plans (SPINN / Edgent style): the
calibration's *ladder* (the most accurate plan at ≥ 16 budgets) plus the calibrated plan itself.

Per rung it keeps a **quiet latency** ``q`` (the window metric, mean or p95, when nothing else
runs). The calibrated plan's ``q`` is what calibration *measured* for it on the verification
frames: the anchor that defines "conditions of calibration". Every other rung starts from the
calibration's prediction scaled by the calibrated plan's measured/predicted ratio and learns its
own ``q`` online from its windows judged quiet (never above the calibrated plan's, for a cheaper
rung); rungs not run quietly yet follow the learned measured/predicted ratio.

After every window of ``window`` frames (or earlier, see the trip below):

- ``ŝ = window metric / q[current]`` is the device's slowdown; ``s̄`` follows it at once upward
  and decays by ``release`` per window downward (an envelope: a step is seen in one window, a
  recovery takes a few);
- ``σ_q`` is the window-to-window standard deviation of ``ŝ`` in quiet windows (the noise
  calibration accepted), ``σ_d`` the recent one in any window (what contention adds); both from
  successive windows on one rung, each jump counted at most 3 σ (a step is a change of level);
- **quiet** when ``s̄ ≤ 1 + z·σ_q``: the plan is chosen as at calibration (slowdown 1), so the
  calibrated plan comes back as soon as the device does;
- otherwise the plan is chosen for slowdown ``S = s̄ + z·σ_d``: the margin grows with the
  measured variance, not a fixed constant;
- the chosen rung is the most accurate with ``q·S ≤ budget`` (the calibrated plan also when the
  budget is at least its measured latency and the device is quiet). Down at once; up only to
  the lower of the last two windows' choices (no climbing on one lucky window).

**Trip**: with the mean metric, a partial window of ≥ ``window/4`` frames whose mean already
exceeds ``max(budget, q·s̄)·(1 + 3·σ_q·√(window/n))`` decides at once, so a step change is
answered within a quarter to one window. Per frame this costs a lock, two additions and one
comparison (measured in benchmarks/controller_overhead.py).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Rung:
    plan: object  # CascadePlan
    predicted_ms: float
    predicted_accuracy: float
    calibrated: bool = False  # the plan calibration chose (its measured latency anchors "quiet")


def build_ladder(rows: list[dict], make_plan, calibrated: dict | None = None) -> list[Rung]:
    """Distinct plans from the manifest's ladder, cheapest first, each more accurate than the last
    (a plan that costs more and is not more accurate is never worth moving to). ``calibrated``:
    ``{thresholds, predicted_ms, predicted_accuracy}`` of the calibration's own choice, always kept."""
    rungs: dict[tuple, Rung] = {}
    cal_key = None
    if calibrated is not None:
        cal_key = tuple(calibrated["thresholds"])
        rungs[cal_key] = Rung(
            make_plan(calibrated["thresholds"]),
            float(calibrated["predicted_ms"]),
            float(calibrated["predicted_accuracy"]),
            True,
        )
    for row in rows:
        key = tuple(row["thresholds"])
        if key not in rungs:
            rungs[key] = Rung(
                make_plan(row["thresholds"]), float(row["predicted_ms"]), float(row["predicted_accuracy"])
            )
    ladder: list[Rung] = []
    for rung in sorted(rungs.values(), key=lambda r: (r.predicted_ms, -r.predicted_accuracy)):
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
    ``apply``: called with the new plan, under the controller's lock, at every switch."""

    def __init__(
        self,
        ladder: list[Rung],
        budget_ms: float,
        window: int = 32,
        metric: str = "mean",
        measured_ms: float | None = None,
        noise: float | None = None,
        z: float = 2.5,
        release: float = 0.5,
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
        self.z, self.release, self.learn = float(z), float(release), float(learn)
        self.apply = apply
        anchor = next((i for i, r in enumerate(ladder) if r.calibrated), None)
        self.anchor = anchor
        ratio = 1.0
        if anchor is not None and measured_ms is not None and measured_ms > 0:
            ratio = measured_ms / max(1e-12, ladder[anchor].predicted_ms)
        self.bias = ratio  # measured / predicted, for rungs not run quiet yet
        self.quiet_ms = [r.predicted_ms * ratio for r in ladder]  # learned online (the anchor stays)
        self._learned = [i == anchor and measured_ms is not None for i in range(len(ladder))]
        self._seen = [0] * len(ladder)
        self.sigma_q = max(0.01, float(noise)) if noise is not None else 0.05
        self.sigma_d = self.sigma_q
        self.envelope = 1.0
        self.slowdown = 1.0
        self.quiet = True
        self.window_ms: float | None = None
        self.switches = 0
        self.windows = 0
        self._prev: tuple[int, float, bool] | None = None  # (rung, ŝ, quiet) of the last window
        self._last_target: int | None = None
        self._lock = threading.Lock()
        self._lat: list[float] = []
        self._sum, self._n = 0.0, 0
        self.index = self._choose(1.0, quiet=True) if start is None else int(start)
        self._last_target = self.index
        self._set_trip()

    @property
    def plan(self):
        return self.ladder[self.index].plan

    # -- the decision ----------------------------------------------------------------------------
    def _choose(self, slowdown: float, quiet: bool) -> int:
        best = 0
        for i, q in enumerate(self.quiet_ms):
            fits = q * slowdown <= self.budget_ms * (1 + 1e-9)
            if quiet and i == self.anchor:  # the calibrated plan, whenever its measured cost is within budget
                fits = q <= self.budget_ms * (1 + 1e-9)
            if fits:
                best = i
        return best

    def _set_trip(self) -> None:
        """Partial-window sums above which the mean metric decides before the window ends."""
        if self.metric != "mean":
            self._trip = None
            return
        level = max(self.budget_ms, self.quiet_ms[self.index] * self.envelope)
        w, first = self.window, max(2, self.window // 4)
        self._trip = [math.inf] * first + [
            n * level * (1 + 3 * self.sigma_q * math.sqrt(w / n)) for n in range(first, w + 1)
        ]

    def observe(self, latency_ms: float):
        """Record one frame's latency; return the new plan when the controller switches, else None."""
        with self._lock:
            self._sum += latency_ms
            self._n += 1
            n = self._n
            if self.metric == "p95":
                self._lat.append(latency_ms)
            elif n < self.window and not self._sum > self._trip[n]:
                return None
            if n < self.window and self.metric == "p95":
                return None
            return self._decide()

    def _window_metric(self) -> float:
        if self.metric == "mean":
            return self._sum / self._n
        lat = sorted(self._lat)
        return lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]

    def _decide(self):
        m = self._window_metric()
        full = self._n >= self.window
        self._sum, self._n, self._lat = 0.0, 0, []
        i = self.index
        s = m / max(1e-12, self.quiet_ms[i])
        self.window_ms, self.slowdown, self.windows = m, s, self.windows + 1
        # variance: successive full windows on the same rung
        if full and self._prev is not None and self._prev[0] == i:
            # a jump beyond 3 σ counts as 3 σ: a step is a change of level (the envelope's job), not noise;
            # a truly noisier device still raises σ by ×1.37 per window
            d2 = 0.5 * min((s - self._prev[1]) ** 2, 9 * self.sigma_d**2)
            self.sigma_d = math.sqrt((1 - 0.25) * self.sigma_d**2 + 0.25 * d2)
            if self._prev[2] and s <= 1 + self.z * self.sigma_q:  # both quiet: the accepted noise
                d2q = min(d2, 4.5 * self.sigma_q**2)
                self.sigma_q = max(0.01, math.sqrt((1 - 0.05) * self.sigma_q**2 + 0.05 * d2q))
        self.envelope = s if s > self.envelope else self.envelope + self.release * (s - self.envelope)
        quiet = self.envelope <= 1 + self.z * self.sigma_q
        self.quiet = quiet
        if full and quiet and i != self.anchor:  # learn this rung's own quiet cost
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
        self._prev = (i, s, quiet) if full else None
        target = self._choose(1.0 if quiet else self.envelope + self.z * self.sigma_d, quiet)
        last, self._last_target = self._last_target, target
        if target > i:
            target = max(i, min(target, last if last is not None else target))
        if target != i:
            self.index = target
            self.switches += 1
            self._prev = None
            if self.apply is not None:
                self.apply(self.ladder[target].plan)
            self._set_trip()
            return self.ladder[target].plan
        self._set_trip()
        return None

    def state(self) -> dict:
        return {
            "budget_ms": self.budget_ms,
            "metric": self.metric,
            "plan_index": self.index,
            "calibrated_index": self.anchor,
            "plans": len(self.ladder),
            "quiet_ms": self.quiet_ms[self.index],
            "predicted_ms": self.ladder[self.index].predicted_ms,
            "slowdown": self.slowdown,
            "envelope": self.envelope,
            "quiet": self.quiet,
            "sigma_quiet": self.sigma_q,
            "sigma_recent": self.sigma_d,
            "margin": 0.0 if self.quiet else self.z * self.sigma_d,
            "window_ms": self.window_ms,
            "windows": self.windows,
            "switches": self.switches,
        }


def controller_for(calib: dict, ladder: list[Rung], budget_ms: float, apply=None, window: int | None = None):
    """A controller seeded from a manifest's calibration block (measured latency and its spread)."""
    metric = calib.get("metric", "mean")
    if metric not in ("mean", "p95"):
        metric = "mean"
    w = window or (32 if metric == "mean" else 64)
    meas = calib.get("measured") or {}
    measured = meas.get("mean_ms" if metric == "mean" else "p95_ms")
    noise = None
    mean, p95 = meas.get("mean_ms"), meas.get("p95_ms")
    if isinstance(mean, int | float) and isinstance(p95, int | float) and mean > 0 and p95 > mean:
        noise = (p95 - mean) / 1.645 / math.sqrt(w) / mean  # frame sd → window-mean sd, relative
    return BudgetController(
        ladder,
        budget_ms,
        window=w,
        metric=metric,
        measured_ms=float(measured) if isinstance(measured, int | float) and measured > 0 else None,
        noise=noise,
        apply=apply,
    )
