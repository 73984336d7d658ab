"""The accuracy promise (issue 15): intervals, and the `--max-drop` guard on exit statistics where
the true drop of every plan is known."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.calibrate.promise import accuracy_interval, choose_within_drop, paired_drop

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
def test_the_guard_keeps_its_violation_rate_and_the_plain_choice_does_not(target):
    true_drops = np.linspace(0.0, 0.03, 31)  # plan j: drop j*0.1 pt; cheaper as j grows
    latencies = list(-np.arange(31.0))
    sample = population_sampler(true_drops, seed=int(target * 1e4))
    trials, n_cal, n_ver = 300, 2500, 2500
    violations = {True: 0, False: 0}
    chosen_drops = {True: [], False: []}
    for _ in range(trials):
        full_c, plans_c = sample(n_cal)
        full_v, plans_v = sample(n_ver)
        for guard in (True, False):
            choice = choose_within_drop(full_c, plans_c, latencies, target, 0.95, n_new=n_ver, guard=guard)
            j = choice.index
            verified = float(full_v.mean() - plans_v[j].mean())
            violations[guard] += verified > target
            chosen_drops[guard].append(true_drops[j])
    guarded, plain = violations[True] / trials, violations[False] / trials
    # stated level 5 %; 300 trials: a binomial 95 % band reaches about 7.5 %
    assert guarded <= 0.075, guarded
    assert plain > 0.2, plain
    # and the guard's price: it picks plans with a smaller true drop, not the full model every time
    assert np.mean(chosen_drops[True]) < np.mean(chosen_drops[False])
    assert np.mean(chosen_drops[True]) > 0 or target <= 0.0025


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
