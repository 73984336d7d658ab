"""The accuracy promise: intervals, and the `--max-drop` guard on exit statistics where
the true drop of every plan is known."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from edgeexit.calibrate.optimizer import CostModel
from edgeexit.calibrate.promise import accuracy_interval, certify, exit_families, fixed_sequence, paired_drop

FULL_ACC = 0.9


def population_sampler(true_drops: np.ndarray, seed: int):
    """Images whose paired (full, plan j) correctness has drop true_drops[j] exactly in expectation.

    Cheaper plans disagree with the full model on a superset of images (nested, as real cascades do):
    an image the full model gets right is lost by plan j when u < a_j/FULL_ACC; one it gets wrong is
    won back when u < b_j/(1-FULL_ACC), with a_j - b_j = true_drops[j] and b_j = a_j/3.
    """
    a = true_drops * 1.5  # so that a - b = drop with b = a / 3
    b = a / 3
    rng = np.random.default_rng(seed)

    def sample(n: int):
        full = rng.random(n) < FULL_ACC
        u = rng.random(n)
        lose = u[:, None] < (a / FULL_ACC)[None, :]
        win = u[:, None] < (b / (1 - FULL_ACC))[None, :]
        plans = np.where(full[:, None], ~lose, win)
        return full, [plans[:, j] for j in range(len(true_drops))]

    return sample


@pytest.mark.parametrize("target", [0.0025, 0.005, 0.01])
def test_fixed_sequence_keeps_its_error_rate_where_the_plain_choice_does_not(target):
    """Plans ordered from the most to the least expensive (true drop growing): the fixed-sequence test
    picks a plan whose true drop exceeds the target in <= 5 % of trials, with power; the plain choice
    (cheapest whose estimate is within the target) breaks the promise often."""
    true_drops = np.linspace(0.0, 0.03, 31)  # plan j: drop j*0.1 pt; cheaper as j grows
    sample = population_sampler(true_drops, seed=int(target * 1e4))
    z = NormalDist().inv_cdf(0.95)
    trials, n = 300, 5000
    z_sidak = NormalDist().inv_cdf((0.95) ** (1 / len(true_drops)))  # the old guard: Šidák over every plan
    bad, plain_bad, chosen, sidak = 0, 0, [], []
    for _ in range(trials):
        full_c, plans_c = sample(n)
        _, _, passed = fixed_sequence(full_c, plans_c, target, z)
        j = passed - 1  # the last plan that passed (plan 0 has true drop 0 and passes unless unlucky)
        drop_j = true_drops[max(j, 0)]
        bad += drop_j > target + 1e-12
        chosen.append(drop_j)
        est = [float(full_c.mean() - p.mean()) for p in plans_c]
        ests, _, _ = fixed_sequence(full_c, plans_c, target, z)
        ok = [i for i, e in enumerate(ests) if e.drop + z_sidak * e.sd / np.sqrt(n) <= target] or [0]
        sidak.append(true_drops[max(ok)])
        plain = max(i for i, e in enumerate(est) if e <= target or i == 0)
        plain_bad += true_drops[plain] > target + 1e-12
    # stated level 5 %; 300 trials: a binomial 95 % band reaches about 7.5 %
    assert bad / trials <= 0.075, bad / trials
    assert plain_bad / trials > 0.2, plain_bad / trials
    # power: without a multiplicity penalty it reaches cheaper plans than the Šidák guard did
    assert np.mean(chosen) > np.mean(sidak) and np.mean(chosen) >= target * 0.3, (np.mean(chosen), np.mean(sidak))


def test_certify_uses_a_family_fixed_in_advance_and_reports_the_frontier():
    rng = np.random.default_rng(0)
    n, k = 4000, 4
    conf = np.sort(rng.random((n, k)), axis=1)  # deeper exits more confident
    correct = rng.random((n, k)) < np.array([0.80, 0.86, 0.90, 0.92])
    cost = CostModel(segment_ms=[0.1, 0.1, 0.1, 0.1], head_ms=[0.02] * 4)
    loose = certify(conf, correct, cost, 0.05)
    tight = certify(conf, correct, cost, 0.0)
    assert loose.latency_ms < tight.latency_ms <= cost.full_ms() + 1e-12
    assert tight.thresholds is None or tight.drop_bound <= 0.0
    assert loose.drop_bound <= 0.05 and loose.family is not None
    assert all(t.exits[-1] == k - 1 for t in loose.tests) and len(loose.tests) == len(exit_families(k))
    speed = [r["speedup"] for r in loose.frontier]
    drops = [r["certified_drop"] for r in loose.frontier]
    assert speed == sorted(speed) and drops == sorted(drops)  # faster costs more certified drop
    # a budget below the certified plan's latency leaves only the cheaper ones
    within = certify(conf, correct, cost, 0.05, budget_ms=loose.latency_ms * 0.999)
    assert within.thresholds is None or within.latency_ms <= loose.latency_ms * 0.999


def test_paired_drop_and_intervals():
    full = np.array([1, 1, 1, 0, 1, 0, 1, 1] * 100, bool)
    plan = full.copy()
    plan[:50] = False  # 50 images lost (those the full model had right: indices with full True)
    est = paired_drop(full, plan)
    lost = int((full[:50]).sum())
    assert est.drop == pytest.approx(lost / 800)
    lo, hi = est.interval(0.95)
    assert lo < est.drop < hi and hi - lo < 0.05
    assert est.bound_for_new_images(800, 1.645) > est.bound_for_new_images(None, 1.645) > est.drop
    lo, hi = accuracy_interval(full, 0.95)
    assert lo < full.mean() < hi
    # identical plans: no drop, but a non-zero spread (the +1 pseudo-counts)
    same = paired_drop(full, full)
    assert same.drop == 0 and same.sd > 0
