import itertools

import numpy as np
import pytest

from edgeexit.calibrate.optimizer import CostModel, evaluate, msdnet_baseline, optimize
from edgeexit.errors import UserError
from edgeexit.runtime.plan import SKIP, CascadePlan
from edgeexit.util import parse_budget


def synthetic(n, k, seed):
    """Exit statistics shaped like a real early-exit net: deeper exits more accurate and confident."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    depth = np.linspace(0.3, 1.0, k)
    conf = np.clip(depth[None] * (1.2 - difficulty[:, None]) + 0.15 * rng.standard_normal((n, k)), 0, 1)
    correct = rng.random((n, k)) < np.clip(0.25 + 0.75 * conf, 0, 1)
    cost = CostModel(
        segment_ms=rng.uniform(0.2, 1.0, k), head_ms=rng.uniform(0.05, 0.3, k), decision_ms=0.01, overhead_ms=0.05
    )
    return conf, correct, cost


def brute_force(conf, correct, cost, budget, metric="mean"):
    """Every threshold that matters: skip, or one of the distinct confidences at that exit."""
    k = conf.shape[1]
    options = [np.r_[SKIP, np.unique(conf[:, j])] for j in range(k - 1)]
    best = None
    for combo in itertools.product(*options):
        s = evaluate(conf, correct, cost, np.r_[combo, -np.inf], metric)
        if s.latency_ms <= budget + 1e-9 and (best is None or s.accuracy > best.accuracy + 1e-12):
            best = s
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frac", [0.35, 0.6, 0.85])
def test_optimizer_matches_brute_force_on_small_problems(seed, frac):
    conf, correct, cost = synthetic(n=24, k=3, seed=seed)
    conf = np.round(conf, 2)  # few distinct values keeps brute force small
    budget = cost.min_ms() + frac * (cost.exit_costs(np.ones(3, bool))[-1] - cost.min_ms())
    best = brute_force(conf, correct, cost, budget)
    sol, _ = optimize(conf, correct, cost, budget)
    assert sol.mean_ms <= budget + 1e-9
    assert sol.accuracy == pytest.approx(best.accuracy, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_optimizer_near_brute_force_with_four_exits(seed):
    conf, correct, cost = synthetic(n=40, k=4, seed=100 + seed)
    conf = np.round(conf * 8) / 8
    budget = cost.min_ms() + 0.5 * (cost.exit_costs(np.ones(4, bool))[-1] - cost.min_ms())
    best = brute_force(conf, correct, cost, budget)
    sol, _ = optimize(conf, correct, cost, budget)
    assert sol.mean_ms <= budget + 1e-9
    assert sol.accuracy >= best.accuracy - 1 / 40  # at most one sample from the optimum


@pytest.mark.slow
def test_optimizer_never_worse_than_msdnet_and_respects_p95():
    conf, correct, cost = synthetic(n=2000, k=8, seed=7)
    full = cost.full_ms()
    for frac in (0.4, 0.6, 0.8):
        for metric in ("mean", "p95"):
            sol, frontier = optimize(conf, correct, cost, frac * full, metric)
            base = msdnet_baseline(conf, correct, cost, frac * full, metric)
            assert sol.latency_ms <= frac * full + 1e-9
            if base is not None:
                assert sol.accuracy >= base.accuracy
            # the reported numbers are what the thresholds really give
            again = evaluate(conf, correct, cost, sol.thresholds, metric)
            assert again.accuracy == sol.accuracy and again.latency_ms == sol.latency_ms
    assert frontier[0].latency_ms <= frontier[-1].latency_ms


def test_skipped_heads_cost_nothing():
    cost = CostModel(segment_ms=[1, 1, 1], head_ms=[0.5, 0.5, 0.5], decision_ms=0.0)
    conf = np.full((4, 3), 0.5)
    correct = np.ones((4, 3), bool)
    s = evaluate(conf, correct, cost, [SKIP, SKIP, -np.inf])
    assert s.mean_ms == pytest.approx(3.5)  # 3 segments + final head only
    s = evaluate(conf, correct, cost, [0.9, SKIP, -np.inf])  # head 1 runs, nobody leaves
    assert s.mean_ms == pytest.approx(4.0)
    assert s.evaluated_exits == [1, 3]


def test_infeasible_budget_names_the_minimum():
    conf, correct, cost = synthetic(n=50, k=3, seed=1)
    with pytest.raises(UserError, match=f"{cost.min_ms():.3f} ms"):
        optimize(conf, correct, cost, cost.min_ms() * 0.5)


def test_budget_above_full_cascade_keeps_final_exit_accuracy():
    conf, correct, cost = synthetic(n=500, k=4, seed=3)
    sol, _ = optimize(conf, correct, cost, cost.full_ms() * 1.5)
    assert sol.accuracy >= correct[:, -1].mean()


@pytest.mark.parametrize("text,ms", [("5ms", 5.0), ("800us", 0.8), ("0.005s", 5.0), ("2.5ms", 2.5), (" 1e-3 s", 1.0)])
def test_parse_budget(text, ms):
    ms_read, fraction = parse_budget(text)
    assert ms_read == pytest.approx(ms) and fraction is None


@pytest.mark.parametrize("text", ["fast", "-1ms", "0ms", "5 parsecs", "5"])
def test_parse_budget_rejects(text):
    with pytest.raises(UserError):
        parse_budget(text)


def test_geometric_thresholds_follow_the_geometric_shares():
    rng = np.random.default_rng(0)
    conf = rng.random((10000, 4))
    plan = CascadePlan.msdnet(conf, 0.5)
    shares = np.bincount(plan.exit_positions(conf), minlength=4) / len(conf)
    p = 0.5 ** np.arange(1, 5)
    p /= p.sum()
    np.testing.assert_allclose(shares[:3], p[:3], atol=0.002)


def fused_costs(cost: CostModel, saving_ms: float = 0.04) -> CostModel:
    """A fused cost model: group a..b costs its units' sum, less ``saving_ms`` per boundary fused away
    (the call and the (de)quantisation that fusion removes)."""
    k = cost.num_exits
    groups = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(a, k):
            groups[a, b] = cost.segment_ms[a : b + 1].sum() + cost.head_ms[b] - saving_ms * (b - a)
    return CostModel(cost.segment_ms, cost.head_ms, cost.decision_ms, cost.overhead_ms, group_ms=groups)


def test_fused_group_costs_add_up_per_evaluated_exit():
    units = CostModel(segment_ms=[1.0, 2.0, 3.0], head_ms=[0.5, 0.25, 0.125], decision_ms=0.01, overhead_ms=0.1)
    same = fused_costs(units, saving_ms=0.0)  # groups that cost exactly their units: the same model
    for mask in itertools.product([False, True], repeat=2):
        ev = np.array([*mask, True])
        np.testing.assert_allclose(same.exit_costs(ev)[ev], units.exit_costs(ev)[ev])
    fused = fused_costs(units, saving_ms=0.2)
    # exits 1 and 3 evaluated: group (1,1), then group (2,3) fusing one boundary away
    np.testing.assert_allclose(
        fused.exit_costs(np.array([True, False, True]))[[0, 2]],
        [0.1 + 1.5 + 0.01, 0.1 + 1.5 + 0.01 + 5.125 - 0.2 + 0.01],
    )
    assert fused.full_ms() == pytest.approx(0.1 + 6.125 - 0.4 + 0.01)
    assert fused.min_ms() == pytest.approx(units.min_ms())


@pytest.mark.parametrize("seed", range(4))
def test_optimizer_matches_brute_force_with_fused_costs(seed):
    conf, correct, cost = synthetic(n=24, k=3, seed=200 + seed)
    conf = np.round(conf, 2)
    cost = fused_costs(cost, saving_ms=0.15)
    budget = cost.min_ms() + 0.5 * (cost.exit_costs(np.ones(3, bool))[-1] - cost.min_ms())
    best = brute_force(conf, correct, cost, budget)
    sol, _ = optimize(conf, correct, cost, budget)
    assert sol.mean_ms <= budget + 1e-9
    assert sol.accuracy == pytest.approx(best.accuracy, abs=1e-12)


def _kept(
    old_units: dict,
    new_units: dict,
    old_th,
    new_th,
    budget_fraction=0.6,
    old_fraction=0.6,
    quiet_error=0.005,
    slowdown=1.0,
):
    """`calibrate.run._keep_previous` on exact costs: 3 exits, 400 frames, the old calibration's block
    holding ``old_units`` and this profile ``new_units`` (name -> ms)."""
    from types import SimpleNamespace

    from edgeexit.calibrate.options import CalibrationOptions
    from edgeexit.calibrate.result import Measurements
    from edgeexit.calibrate.run import _keep_previous

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, (400, 3))
    correct = rng.uniform(size=(400, 3)) < np.array([0.6, 0.75, 0.9])

    def block(units):
        return {"units": {k: {"mean_ms": v, "p95_ms": v} for k, v in units.items()}, "decision_ms": 0.0,
                "frame_overhead_ms": 0.0}  # fmt: skip

    opts = CalibrationOptions(budget_fraction=budget_fraction, backend="onnxruntime")
    old_opts = {**opts.__dict__, "budget_fraction": old_fraction, "frame_size": None}
    cal = SimpleNamespace(thresholds=tuple(old_th), to_dict=lambda: {"options": old_opts, "latency": block(old_units)})
    session = SimpleNamespace(cascade=SimpleNamespace(artifact=SimpleNamespace(calibration=cal)))
    lat = block(new_units)
    m = Measurements({"units": lat["units"], "decision": {"mean_ms": 0.0}}, None, 0.0, conf, correct,
                     load={"quiet_error": quiet_error, "slowdown": slowdown})  # fmt: skip
    cost = CostModel.from_latency_block(lat, 3)
    new = evaluate(conf, correct, cost, new_th)
    return _keep_previous(session, m, opts, cost, budget_fraction * cost.full_ms(), new)


UNITS = {"seg_01": 1.0, "head_01": 0.1, "seg_02": 1.0, "head_02": 0.1, "seg_03": 1.0, "head_03": 0.1}
OLD_PLAN, NEW_PLAN = [0.5, SKIP, 0.0], [SKIP, 0.45, 0.0]


def test_a_previous_plan_is_kept_while_the_device_prices_it_alike():
    slower = {k: 1.3 * v for k, v in UNITS.items()}  # the whole device 30 % slower: shares unchanged
    kept = _kept(UNITS, slower, OLD_PLAN, NEW_PLAN)
    assert kept is not None
    solution, evidence = kept
    assert list(solution.thresholds[:2]) == OLD_PLAN[:2] and evidence["thresholds"] == OLD_PLAN
    assert evidence["profile_moved"] < 1e-9 and evidence["cost_tolerance"] == 0.01
    assert evidence["new_thresholds"] == NEW_PLAN


@pytest.mark.parametrize(
    "change, why",
    [
        ({"head_01": 0.3}, "a unit the old plan runs is dearer beyond the profile's uncertainty"),
        ({"seg_01": 3.0}, "the old plan no longer fits the budget"),
    ],
)
def test_a_previous_plan_is_replaced_when_the_device_changed(change, why):
    assert _kept(UNITS, {**UNITS, **change}, OLD_PLAN, NEW_PLAN) is None, why


def test_a_previous_plan_for_another_goal_is_not_kept():
    assert _kept(UNITS, UNITS, OLD_PLAN, NEW_PLAN, old_fraction=0.5) is None
    assert _kept(UNITS, UNITS, OLD_PLAN, NEW_PLAN) is not None


def test_the_keep_tolerance_follows_the_profiles_uncertainty():
    # moved 4 %: within twice a 2.5 % quiet error, beyond twice a 0.5 % one
    dearer = {**UNITS, "head_01": 0.1 + 0.04 * (UNITS["seg_01"] + UNITS["head_01"])}
    assert _kept(UNITS, dearer, OLD_PLAN, NEW_PLAN, quiet_error=0.025) is not None
    assert _kept(UNITS, dearer, OLD_PLAN, NEW_PLAN, quiet_error=0.005) is None


def test_a_busy_profile_allows_the_wander_measured_between_busy_profiles():
    from edgeexit.calibrate.run import BUSY_WANDER

    def dearer(share):  # head 1 dearer by ``share`` of what the old plan's first exit costs
        return {**UNITS, "head_01": 0.1 + share * (UNITS["seg_01"] + UNITS["head_01"])}

    roomy = {"budget_fraction": 0.8, "old_fraction": 0.8}  # the old plan fits either way: only the move counts
    busy = {"quiet_error": 0.005, "slowdown": 1.4, **roomy}  # a typical round 1.4x the quiet ones: busy
    assert _kept(UNITS, dearer(0.06), OLD_PLAN, NEW_PLAN, **busy) is not None
    assert _kept(UNITS, dearer(0.06), OLD_PLAN, NEW_PLAN, **roomy) is None  # the same move on a quiet profile
    assert _kept(UNITS, dearer(2 * BUSY_WANDER), OLD_PLAN, NEW_PLAN, **busy) is None


@pytest.mark.parametrize(
    "broken",
    [
        {"head_01": float("nan")},  # a NaN price would pass every comparison
        {"seg_01": 0.0, "head_01": 0.0, "seg_02": 0.0, "head_02": 0.0, "seg_03": 0.0, "head_03": 0.0},
        {"seg_01": -1.0},
    ],
)
def test_a_previous_latency_table_that_does_not_price_is_no_evidence(broken):
    assert _kept({**UNITS, **broken}, UNITS, OLD_PLAN, NEW_PLAN) is None


def test_a_previous_latency_table_missing_a_unit_is_no_evidence():
    """The manifest is a file: a block with a unit missing is not a reason to keep, nor a traceback."""
    assert _kept({k: v for k, v in UNITS.items() if k != "seg_02"}, UNITS, OLD_PLAN, NEW_PLAN) is None
