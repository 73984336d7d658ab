"""Accuracy promises that hold on unseen data: intervals and the `--max-drop` guard (numpy only).

Picking the cheapest plan that clears an accuracy bar *on the images used to pick it* selects for
lucky plans: measured on the quickstart model, "within 0.5 pt on the calibration half" became a
2-point miss on the verification half. Two things fix that:

- **Paired statistics.** A plan's drop against the full model is measured on the *same* images:
  d_i = correct_full(i) - correct_plan(i) ∈ {-1, 0, 1}. Most images agree (d_i = 0), so the paired
  drop is far less noisy than two separate accuracies.
- **A prediction bound, not a point estimate.** The promise is about the drop a user will measure
  on n_new unseen images. With the calibration estimate D_c (n_c images) and the new measurement
  D_new both noisy, D_new - D_c has variance ≈ σ²(1/n_c + 1/n_new), σ² the per-image variance of
  d. The guard accepts a plan only if D_c + z·σ·sqrt(1/n_c + 1/n_new) ≤ target, with z the
  one-sided normal quantile of the stated confidence, raised (Šidák) for the number of plans the
  search looked at, since the cheapest of many candidates is the one most likely to be lucky.
  σ² is estimated from the calibration images with a +1 pseudo-count on each side, so a plan with
  few disagreements is not declared noise-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class DropEstimate:
    drop: float  # full-model accuracy minus plan accuracy on these images (fraction)
    sd: float  # per-image standard deviation of d = correct_full - correct_plan
    n: int

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Two-sided interval for the drop on the population these images came from."""
        z = NormalDist().inv_cdf(0.5 + confidence / 2)
        half = z * self.sd / math.sqrt(self.n)
        return self.drop - half, self.drop + half

    def bound_for_new_images(self, n_new: int | None, z: float) -> float:
        """One-sided upper bound on the drop measured on ``n_new`` unseen images (None: infinitely many)."""
        var = self.sd**2 * (1 / self.n + (1 / n_new if n_new else 0.0))
        return self.drop + z * math.sqrt(var)


def paired_drop(correct_full: np.ndarray, correct_plan: np.ndarray) -> DropEstimate:
    d = correct_full.astype(np.int8) - correct_plan.astype(np.int8)
    n = len(d)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    # +1 pseudo-count on each side: never a zero variance from a lucky sample
    p_up, p_down = (up + 1) / (n + 2), (down + 1) / (n + 2)
    var = p_up + p_down - (p_up - p_down) ** 2
    return DropEstimate((up - down) / n, math.sqrt(max(var, 0.0)), n)


def accuracy_interval(correct: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for an accuracy measured on len(correct) images."""
    n = len(correct)
    p = float(np.mean(correct))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def guard_z(confidence: float, candidates: int) -> float:
    """One-sided z for ``confidence``, Šidák-corrected for ``candidates`` plans looked at."""
    alpha = 1 - confidence
    per_plan = 1 - (1 - alpha) ** (1 / max(1, candidates))
    return NormalDist().inv_cdf(1 - per_plan)


LADDER_STEPS = 16


def candidate_plans(conf: np.ndarray, correct: np.ndarray, cost, budget_ms: float, metric: str = "mean") -> list:
    """The optimiser's most accurate plan at LADDER_STEPS budgets from the cheapest cascade up to
    ``budget_ms`` (duplicates dropped), plus the full model when it fits: what --max-drop chooses from."""
    from edgeexit.calibrate.optimizer import evaluate, plan_ladder
    from edgeexit.runtime.plan import CascadePlan

    candidates, seen = [], set()
    for _, sol in plan_ladder(conf, correct, cost, cost.min_ms(), budget_ms, LADDER_STEPS, metric):
        key = tuple(sol.plan.to_list())
        if key not in seen:
            seen.add(key)
            candidates.append(sol)
    full = evaluate(conf, correct, cost, CascadePlan.full_model(conf.shape[1]).thresholds, metric)
    if full.latency_ms <= budget_ms + 1e-9 and tuple(full.plan.to_list()) not in seen:
        candidates.append(full)
    return candidates


@dataclass(frozen=True)
class GuardChoice:
    index: int | None  # which candidate (None: none meets the target)
    bounds: list[float]  # each candidate's upper bound on the drop for new images
    z: float


def choose_within_drop(
    correct_full: np.ndarray,
    plans_correct: list[np.ndarray],
    latencies: list[float],
    max_drop: float,
    confidence: float = 0.95,
    n_new: int | None = None,
    guard: bool = True,
    is_full_model: list[bool] | None = None,
) -> GuardChoice:
    """The cheapest candidate whose drop (guarded: its upper bound for ``n_new`` new images) is
    within ``max_drop``. ``plans_correct[j]``: correctness of candidate j on the calibration images;
    ``is_full_model[j]``: candidate j *is* the full model (drop 0 on any images, no bound needed)."""
    z = guard_z(confidence, len(plans_correct)) if guard else 0.0
    bounds = []
    for j, c in enumerate(plans_correct):
        if is_full_model is not None and is_full_model[j]:
            bounds.append(0.0)
            continue
        est = paired_drop(correct_full, c)
        bounds.append(est.bound_for_new_images(n_new, z) if guard else est.drop)
    ok = [j for j, b in enumerate(bounds) if b <= max_drop + 1e-12]
    index = min(ok, key=lambda j: latencies[j]) if ok else None
    return GuardChoice(index, bounds, z)
