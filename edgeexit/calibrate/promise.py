"""Accuracy promises that hold on unseen data: intervals and the `--max-drop` test (numpy only).

Picking the cheapest plan that clears an accuracy bar *on the images used to pick it* selects for
lucky plans: measured on the quickstart model, "within 0.5 pt on the calibration half" became a
2-point miss on the verification half. A Šidák correction over every candidate plan fixed that but
certified nothing faster than the full model on 2,500 frames. What is used now:

- **Paired statistics.** A plan's drop against the full model is measured on the *same* images:
  d_i = correct_full(i) - correct_plan(i) ∈ {-1, 0, 1}. Most images agree (d_i = 0), so the paired
  drop is far less noisy than two separate accuracies. σ² gets a +1 pseudo-count on each side, so a
  plan with few disagreements is never declared noise-free.
- **Fixed-sequence testing (Learn-then-Test, Angelopoulos et al. 2021; CALM, Schuster et al. 2022).**
  Plans of a family fixed before the frames are seen (one shared confidence threshold λ on a fixed
  set of exits, Jazbec et al. 2024) are tested from the most expensive (λ = 1: the full model) down:
  H0_λ "the drop exceeds the promise" is rejected when D + z·σ/√n ≤ promise, and testing stops at the
  first λ not rejected. The family-wise error is that of one test, so z is the plain one-sided quantile,
  Bonferroni-corrected only over the few exit families. Every stored frame is used: none is spent on
  choosing the order.
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


# --- Learn-then-Test: fixed-sequence testing along a family fixed before looking at the frames ---------------

# One shared confidence threshold, from the most conservative (nobody leaves early) down: fixed in advance,
# so the order of the tests does not depend on the frames (Angelopoulos et al. 2021; Jazbec et al. 2024).
SHARED_LAMBDAS = tuple(float(v) for v in np.r_[1.0 - np.logspace(-4, 0, 64)[:-1], 0.0])


def exit_families(k: int) -> list[tuple[int, ...]]:
    """The exit subsets (0-based positions, the last always included) a shared threshold is tried on,
    fixed by the exit count alone: every exit, every second, every third, the deeper half."""
    last = k - 1
    fams = [tuple(range(k)), tuple(sorted({*range(last, -1, -2)})), tuple(sorted({*range(last, -1, -3)}))]
    fams.append(tuple(range(k // 2, k)))
    out: list[tuple[int, ...]] = []
    for f in fams:
        if len(f) > 1 and f not in out:
            out.append(f)
    return out


def shared_threshold_plan(k: int, exits: tuple[int, ...], lam: float) -> np.ndarray:
    from edgeexit.runtime.plan import SKIP

    th = np.full(k, SKIP)
    th[list(exits)] = lam
    th[-1] = -np.inf
    return th


@dataclass(frozen=True)
class SequenceTest:
    """One family's fixed-sequence test: per plan (in test order) its drop estimate, its upper bound and
    whether it passed (every plan before it passed too)."""

    exits: tuple[int, ...]
    thresholds: list[np.ndarray]
    estimates: list[DropEstimate]
    bounds: list[float]
    passed: int  # how many plans, from the start of the sequence, passed


def fixed_sequence(
    correct_full: np.ndarray, plans_correct: list[np.ndarray], max_drop: float, z: float
) -> tuple[list[DropEstimate], list[float], int]:
    """Test H0_j: drop_j > max_drop for j = 0, 1, ... in order, stopping at the first not rejected.
    The family-wise error stays at the level of one test: no multiplicity penalty, because the order
    is fixed before the frames are seen. Returns the estimates, the bounds and the number passed."""
    ests, bounds, passed, failed = [], [], 0, False
    for c in plans_correct:
        est = paired_drop(correct_full, c)
        ests.append(est)
        b = est.drop + z * est.sd / math.sqrt(est.n)
        bounds.append(b)
        if not failed and b <= max_drop + 1e-12:
            passed += 1
        else:
            failed = True
    return ests, bounds, passed


@dataclass(frozen=True)
class Promise:
    """What --max-drop chose and what the frames can certify (see `certify`)."""

    thresholds: np.ndarray | None  # None: nothing but the full model is certified
    family: tuple[int, ...] | None
    drop_bound: float  # upper bound on the population drop of the chosen plan (0 for the full model)
    latency_ms: float
    z: float
    tests: list[SequenceTest]
    frontier: list[dict]  # per speed-up: the smallest drop these frames certify


def certify(
    conf: np.ndarray,
    correct: np.ndarray,
    cost,
    max_drop: float,
    confidence: float = 0.95,
    budget_ms=None,
    metric: str = "mean",
) -> Promise:
    """The cheapest plan whose accuracy drop against the full model is certified <= ``max_drop`` at
    ``confidence`` (family-wise), on every frame given: fixed-sequence tests along each exit family's
    shared threshold, from 1.0 down, Bonferroni over the few families (see `exit_families`)."""
    from edgeexit.calibrate.optimizer import evaluate

    n, k = conf.shape
    fams = exit_families(k)
    alpha = (1 - confidence) / len(fams)
    z = NormalDist().inv_cdf(1 - alpha)
    full = correct[:, -1]
    full_ms = cost.full_ms()
    best = (full_ms, None, None, 0.0)
    tests, points = [], [(full_ms, 0.0, -1, None)]  # the full model: drop 0 by definition
    for fam in fams:
        ths = [shared_threshold_plan(k, fam, lam) for lam in SHARED_LAMBDAS]
        from edgeexit.runtime.plan import exit_positions

        plans_correct = [correct[np.arange(n), exit_positions(conf, th)] for th in ths]
        ests, bounds, passed = fixed_sequence(full, plans_correct, max_drop, z)
        tests.append(SequenceTest(fam, ths, ests, bounds, passed))
        running = -np.inf
        for j, th in enumerate(ths):
            sol = evaluate(conf, correct, cost, th, metric)
            running = max(running, bounds[j])
            points.append((sol.latency_ms, running, j, fam))
            if j < passed and sol.latency_ms < best[0] and (budget_ms is None or sol.latency_ms <= budget_ms + 1e-9):
                best = (sol.latency_ms, th, fam, bounds[j])
    frontier = _frontier(points, full_ms)
    lat, th, fam, bound = best
    return Promise(th, fam, float(bound), float(lat), float(z), tests, frontier)


def _frontier(points: list, full_ms: float) -> list[dict]:
    """For each speed-up reached, the smallest drop these frames certify at it or faster (the envelope)."""
    rows, cur = [], np.inf
    for lat, drop, _, _ in sorted(points, key=lambda p: p[0]):  # fastest first
        cur = min(cur, drop)
        rows.append({"speedup": float(full_ms / lat), "latency_ms": float(lat), "certified_drop": float(cur)})
    rows.reverse()
    out: list[dict] = []
    for row in rows:
        if not out or row["speedup"] > out[-1]["speedup"] + 0.02:
            out.append(row)
    return out


def frames_for(promise: Promise, speedup: float, max_drop: float, full_ms: float, cost, conf, correct) -> int | None:
    """About how many frames would certify ``speedup`` at ``max_drop`` (the present estimates assumed
    to hold): the least over the families; None when no family's plans are that good even on these frames."""
    from edgeexit.calibrate.optimizer import evaluate

    best = None
    for t in promise.tests:
        for j, th in enumerate(t.thresholds):
            if evaluate(conf, correct, cost, th).mean_ms <= full_ms / speedup:
                n = frames_needed(t, j, max_drop, promise.z)
                if n is not None and (best is None or n < best):
                    best = n
                break
    return best


def frames_needed(test: SequenceTest, upto: int, max_drop: float, z: float) -> int | None:
    """Frames that would let plans 0..upto of ``test`` all pass at ``max_drop`` (their present
    estimates and spreads assumed to hold): None when a plan's own estimate is already above it."""
    need = 0
    for est in test.estimates[: upto + 1]:
        gap = max_drop - est.drop
        if gap <= 0:
            return None
        need = max(need, math.ceil((z * est.sd / gap) ** 2))
    return need
