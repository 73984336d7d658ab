"""Holding a latency budget while the device drifts (numpy-free, stdlib only).

A calibration is a snapshot: a Jetson that throttles, a changed power mode or a camera pipeline
sharing the CPU makes every unit slower, and fixed thresholds then overrun their budget exactly
when it matters. `BudgetController` moves along the calibration's *ladder* (the most accurate
plan at each of ≥ 16 budgets, with its predicted mean latency):

- it keeps the mean of the last ``window`` frames' measured latency and estimates the device's
  current **slowdown** = measured mean / the current plan's predicted mean;
- after each window it picks the most accurate plan whose predicted latency × slowdown fits the
  budget — **down** at once when the current plan does not fit, **up** only when the better plan
  fits with ``up_margin`` to spare (hysteresis, so it does not oscillate);
- the window restarts after every switch (a new plan has its own latency).

It costs one addition per frame and a decision per window; `Cascade` calls it only when loaded
with ``budget_ms``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Rung:
    plan: object  # CascadePlan
    predicted_ms: float
    predicted_accuracy: float


def build_ladder(rows: list[dict], make_plan) -> list[Rung]:
    """Distinct plans from the manifest's ladder, cheapest first, each more accurate than the last
    (a plan that costs more and is not more accurate is never worth moving to)."""
    rungs: dict[tuple, Rung] = {}
    for row in rows:
        key = tuple(row["thresholds"])
        if key not in rungs:
            rungs[key] = Rung(
                make_plan(row["thresholds"]), float(row["predicted_ms"]), float(row["predicted_accuracy"])
            )
    ladder: list[Rung] = []
    for rung in sorted(rungs.values(), key=lambda r: (r.predicted_ms, -r.predicted_accuracy)):
        if not ladder or rung.predicted_accuracy > ladder[-1].predicted_accuracy:
            ladder.append(rung)
    return ladder


class BudgetController:
    def __init__(
        self, ladder: list[Rung], budget_ms: float, window: int = 32, up_margin: float = 0.85, start: int | None = None
    ) -> None:
        if not ladder:
            raise ValueError("the budget controller needs a calibration ladder: run `edgeexit calibrate` again")
        self.ladder = ladder
        self.budget_ms = float(budget_ms)
        self.window = int(window)
        self.up_margin = float(up_margin)
        self.index = self._best_fitting(1.0) if start is None else start
        self.slowdown = 1.0
        self.window_mean_ms: float | None = None
        self.switches = 0
        self._sum, self._n = 0.0, 0
        self._lock = threading.Lock()

    @property
    def plan(self):
        return self.ladder[self.index].plan

    def _best_fitting(self, slowdown: float, margin: float = 1.0) -> int:
        fits = [i for i, r in enumerate(self.ladder) if r.predicted_ms * slowdown <= self.budget_ms * margin]
        return max(fits) if fits else 0

    def observe(self, latency_ms: float):
        """Record one frame's latency; return the new plan when the controller switches, else None."""
        with self._lock:
            self._sum += latency_ms
            self._n += 1
            if self._n < self.window:
                return None
            mean = self._sum / self._n
            self._sum, self._n = 0.0, 0
            self.window_mean_ms = mean
            self.slowdown = mean / max(1e-9, self.ladder[self.index].predicted_ms)
            target = self.index
            if mean > self.budget_ms:  # the current plan does not fit: down to the best that does
                target = min(self.index, self._best_fitting(self.slowdown))
            else:
                up = self._best_fitting(self.slowdown, self.up_margin)
                if up > self.index:
                    target = up
            if target == self.index:
                return None
            self.index = target
            self.switches += 1
            return self.ladder[target].plan

    def state(self) -> dict:
        return {
            "budget_ms": self.budget_ms,
            "plan_index": self.index,
            "plans": len(self.ladder),
            "predicted_ms": self.ladder[self.index].predicted_ms,
            "slowdown": self.slowdown,
            "window_mean_ms": self.window_mean_ms,
            "switches": self.switches,
        }
