"""BudgetController with injected latencies (no clock, no model)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from edgeexit.runtime.artifact import LadderRung, parse_calibration
from edgeexit.runtime.controller import BudgetController, Rung, build_ladder, calibrated_ladder

# five rungs, cheapest first; rung 3 is the calibrated plan (measured 1.0 ms)
COSTS = [0.40, 0.55, 0.70, 1.00, 1.30]


def ladder() -> list[Rung]:
    return [Rung(f"plan{i}", c, 0.80 + 0.02 * i, calibrated=(i == 3)) for i, c in enumerate(COSTS)]


def make(budget=1.0, noise=0.03, **kw) -> BudgetController:
    return BudgetController(ladder(), budget, window=32, measured_ms=1.0, noise=noise, **kw)


def feed(ctl, frames, slowdown=1.0, jitter=0.05, rng=None):
    """Frames on whatever rung the controller picked: its true cost × slowdown × noise."""
    rng = rng or random.Random(0)
    seen = []
    for _ in range(frames):
        s = slowdown() if callable(slowdown) else slowdown
        ctl.observe(COSTS[ctl.index] * s * (1 + rng.gauss(0, jitter)))
        seen.append(ctl.index)
    return seen


def test_budget_equal_to_the_plans_own_latency_keeps_the_calibrated_plan_when_quiet():
    ctl = make(budget=1.0)
    assert ctl.index == 3
    seen = feed(ctl, 3000)
    assert seen.count(3) / len(seen) > 0.97
    assert ctl.switches * 1000 / 3000 <= 20


def test_step_change_is_answered_within_one_window_and_the_plan_comes_back():
    ctl = make()
    feed(ctl, 320)
    seen = feed(ctl, 32, slowdown=1.65)  # step: the very first window already moves down
    assert seen[-1] < 3 and COSTS[seen[-1]] * 1.65 <= 1.0
    during = feed(ctl, 1500, slowdown=1.65)
    over = [COSTS[i] * 1.65 > 1.1 for i in during]
    assert sum(over) / len(over) < 0.05
    after = feed(ctl, 1000)
    assert after[-1] == 3 and after.index(3) < 32 * 8  # back to the calibrated plan within a few windows
    assert after[200:].count(3) / len(after[200:]) > 0.97


def test_recovery_is_believed_after_two_agreeing_windows_not_one():
    ctl = make()
    feed(ctl, 320)
    feed(ctl, 320, slowdown=1.65, jitter=0.01)
    assert ctl.index < 3
    lucky = feed(ctl, 32, jitter=0.01)  # one quiet window's worth of frames: not yet a recovery
    assert lucky[-1] < 3
    # two full quiet windows agree (the first window after the return still held slow frames): back
    second = feed(ctl, 64, jitter=0.01)
    assert second[-1] == 3 and second.index(3) >= 32
    flicker = iter(range(10**6))  # quiet and slow windows alternating: no climbing on the quiet ones
    seen = feed(ctl, 640, slowdown=lambda: 1.65 if (next(flicker) // 32) % 2 else 1.0, jitter=0.01)
    over = [COSTS[i] * 1.65 > 1.1 for k, i in enumerate(seen) if (k // 32) % 2]
    assert sum(over) / len(over) < 0.1


def test_a_device_faster_than_at_calibration_affords_a_more_accurate_rung():
    ctl = BudgetController(measured_ladder(), 1.0, window=32, noise=0.03)
    assert ctl.index == 3
    seen = feed(ctl, 640, slowdown=0.70, jitter=0.02)  # rung 4 (1.30 ms quiet) costs 0.91 ms here
    assert seen[-1] == 4 and COSTS[4] * 0.70 <= 1.0
    back = feed(ctl, 320, slowdown=1.0, jitter=0.02)  # calibration's speed again: the calibrated plan
    assert back[-1] == 3 and back.index(3) <= 32
    slightly = BudgetController(measured_ladder(), 1.0, window=32, noise=0.03)  # faster by less than the noise
    assert feed(slightly, 640, slowdown=0.95, jitter=0.02)[-1] == 3
    learned = make(budget=1.0)  # rungs without measurements learn against slowdown 1: no climbing above
    assert feed(learned, 640, slowdown=0.70, jitter=0.02)[-1] == 3


def test_margin_grows_with_window_to_window_variance():
    calm, noisy = make(), make()
    feed(calm, 640, slowdown=1.5, jitter=0.02)
    frame = iter(range(10**6))
    feed(noisy, 640, slowdown=lambda: 1.3 if (next(frame) // 32) % 2 else 1.7, jitter=0.02)  # same mean
    assert noisy.state()["margin"] > 2 * calm.state()["margin"] > 0
    assert noisy.index < calm.index  # more variance: a cheaper plan for the same mean slowdown


def test_bounded_switches_under_steady_contention():
    ctl = make()
    feed(ctl, 320)
    before = ctl.switches
    feed(ctl, 3000, slowdown=1.65, jitter=0.10, rng=random.Random(3))
    assert (ctl.switches - before) * 1000 / 3000 <= 20


def test_rungs_learn_their_own_quiet_cost():
    # the prediction of every rung but the calibrated one is 20% high; calibration measured rung 3 at 1.0 ms
    rows = [Rung(f"p{i}", c * 1.2, 0.80 + 0.02 * i) for i, c in enumerate(COSTS)]
    rows[3] = Rung("p3", 1.0, 0.86, calibrated=True)
    ctl = BudgetController(rows, 0.75, window=32, measured_ms=1.0, noise=0.03)
    assert ctl.index == 1  # predicted: rung 2 costs 0.84 > 0.75
    seen = feed(ctl, 640, jitter=0.02)
    assert ctl.quiet_ms[1] == pytest.approx(0.55, rel=0.03) and ctl.quiet_ms[3] == 1.0  # the anchor stays
    assert seen[-1] == 2 and ctl.quiet_ms[2] == pytest.approx(0.70, rel=0.05)  # learned: rung 2 fits


def test_thread_safety_two_threads_one_controller():
    switched = []
    ctl = make(apply=switched.append)
    n, per = 4, 4000

    def worker(seed):
        rng = random.Random(seed)
        for k in range(per):
            s = 1.65 if (k // 500) % 2 else 1.0
            ctl.observe(COSTS[ctl.index] * s * (1 + rng.gauss(0, 0.05)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = ctl.state()
    assert st["windows"] >= n * per // 32 // 1 * 0.25 and ctl._n < 32
    assert len(switched) == st["switches"] > 0 and switched[-1] == ctl.plan  # every switch applied, in order


def test_p95_metric_and_bad_arguments():
    ctl = BudgetController(ladder(), 1.0, window=64, metric="p95", measured_ms=1.0, noise=0.03)
    feed(ctl, 640, jitter=0.0)
    assert ctl.index == 3
    feed(ctl, 128, slowdown=1.65, jitter=0.0)
    assert ctl.index < 3
    with pytest.raises(ValueError, match="metric"):
        BudgetController(ladder(), 1.0, metric="p99")
    with pytest.raises(ValueError, match="ladder"):
        BudgetController([], 1.0)


def test_the_calibrated_plan_is_a_rung_even_if_the_ladder_lacks_it():
    rows = [LadderRung((0.5,), 0.4, 0.8), LadderRung((0.9,), 1.0, 0.86)]
    lad = build_ladder(rows, tuple, LadderRung((0.8,), 0.9, 0.85))
    assert [r.plan for r in lad] == [(0.5,), (0.8,), (0.9,)] and lad[1].calibrated


def measured_ladder(pred_error=0.8) -> list[Rung]:
    """The ladder as `calibrate` now writes it: every rung measured (true cost COSTS[i]), while the cost
    model's prediction of every multi-exit rung is ``pred_error`` × the truth (20 % too cheap)."""
    return [
        Rung(
            f"plan{i}",
            c * (1.0 if i == 3 else pred_error),
            0.80 + 0.02 * i,
            calibrated=(i == 3),
            measured_ms={"mean_ms": c, "p95_ms": 1.3 * c},
        )  # fmt: skip
        for i, c in enumerate(COSTS)
    ]


def test_measured_rungs_replace_biased_predictions():
    # the old controller took rung 2's predicted 0.56 ms for its cost: on a quiet device it saw a
    # "slowdown" of 1.25 there and stayed a rung low; measured costs make quiet look quiet
    ctl = BudgetController(measured_ladder(), 1.0, window=32, measured_ms=1.0, noise=0.03)
    assert ctl.quiet_ms == COSTS and ctl.index == 3
    seen = feed(ctl, 3000)
    assert seen.count(3) / len(seen) > 0.97 and ctl.quiet
    feed(ctl, 64, slowdown=1.3)
    during = feed(ctl, 1500, slowdown=1.3)
    assert COSTS[during[-1]] * 1.3 <= 1.0 and during[-1] == 2  # the most accurate rung that truly fits
    after = feed(ctl, 600)
    assert after[-1] == 3


def test_harder_images_on_a_quiet_device_are_not_a_slowdown():
    """Per-exit normalisation: frames that go deeper cost more on the same device; the controller
    compares each frame with what calibration measured for the exit it took."""
    exit_ms = (0.5, 1.0, 1.5)  # the calibrated plan: a frame leaving at exit 1/2/3 (calibration: 1.0 mean)
    rungs = [
        Rung("cheap", 0.5, 0.80, measured_ms={"mean_ms": 0.5, "p95_ms": 0.6}, exit_ms=(0.5, None, None)),
        Rung("cal", 1.0, 0.86, calibrated=True, measured_ms={"mean_ms": 1.0, "p95_ms": 1.5}, exit_ms=exit_ms),
    ]
    rng = random.Random(1)

    def run(ctl, frames, slowdown, deep_share):
        seen = []
        for _ in range(frames):
            if ctl.index == 0:
                e = 1
            else:  # harder images: more frames to exit 3 (mean 1.0 -> 1.0 + 0.5*(deep_share-1/3)*... )
                u = rng.random()
                e = 3 if u < deep_share else (2 if u < deep_share + (1 - deep_share) / 2 else 1)
            ctl.observe(exit_ms[e - 1] * slowdown * (1 + rng.gauss(0, 0.03)), e)
            seen.append(ctl.index)
        return seen

    ctl = BudgetController(rungs, 1.1, window=32, noise=0.03)
    seen = run(ctl, 2000, 1.0, deep_share=0.6)  # mean cost 1.2 ms on a quiet device: static also runs 1.2
    assert seen.count(1) / len(seen) > 0.97 and ctl.slowdown == pytest.approx(1.0, abs=0.05)
    seen = run(ctl, 1000, 1.6, deep_share=0.6)  # a real slowdown is still seen
    assert seen[-1] == 0 and ctl.slowdown == pytest.approx(1.6, abs=0.1)
    plain = BudgetController([Rung(r.plan, r.predicted_ms, r.predicted_accuracy, r.calibrated, r.measured_ms)
                              for r in rungs], 1.1, window=32, noise=0.03)  # fmt: skip
    seen = run(plain, 2000, 1.0, deep_share=0.6)  # without exit tables the same quiet device looks slow
    assert seen.count(1) / len(seen) < 0.5


def test_measure_ladder_runs_every_rung_and_the_full_model_on_one_scale():
    """Every rung, the chosen plan and the full model run interleaved on the same moments; the scale is
    the interleaved run's speed pooled with the verification run's (frame-weighted, through the exit mix);
    a controller built from the result anchors "quiet" on that reference."""
    from test_cascade_logic import SlowRunner, frame, ladder_calibration, ladder_manifest

    from edgeexit.calibrate.ladder import LadderMeasurement, measure_ladder
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.controller import controller_for

    cal = ladder_calibration()
    c = Cascade(ladder_manifest(), SlowRunner(0.001))
    rows = [dict(r) for r in cal["ladder"]]
    # the verification run (90 frames, all leaving at exit 4) said 2 ms: a lucky moment, 2x faster
    verified = {"mean_ms": 2.0, "p95_ms": 2.5, "samples": 90, "exit_shares": [0.0, 0.0, 0.0, 1.0]}
    frames = np.stack([frame(0)] * 30)
    rung_thresholds = [r["thresholds"] for r in rows]
    got = measure_ladder(c, frames, cal["thresholds"], rung_thresholds, verified, max_frames=30, block=10)
    assert isinstance(got, LadderMeasurement) and verified["mean_ms"] == 2.0  # a value; the inputs unchanged
    inter, ref = got.interleaved, got.reference
    assert inter.frames == 30 and inter.mean_ms >= 4.0  # 4 segments of >= 1 ms each, measured
    assert got.full_mean_ms >= inter.mean_ms * 0.9 and got.speedup == pytest.approx(got.full_mean_ms / inter.mean_ms)
    r_v = 2.0 / inter.mean_ms  # the verification run's speed relative to the interleaved run
    scale = (90 * r_v + 30) / 120
    assert got.scale == pytest.approx(scale)
    assert ref.mean_ms == pytest.approx(scale * inter.mean_ms) and ref.frames == 120
    assert got.block_frames == 10 and got.block_sd is not None and 0 <= got.block_sd < 0.5  # 3 steady blocks
    assert len(got.rungs) == len(rows)
    means = []
    for rung, segments in zip(got.rungs, (1, 2, 2, 4), strict=True):
        assert rung.frames == 30 and rung.latency() == {"mean_ms": rung.mean_ms, "p95_ms": rung.p95_ms, "frames": 30}
        means.append(rung.mean_ms / segments)
    assert max(means) < 1.6 * min(means)  # cost per segment alike: each rung measured for what it runs
    assert got.rungs[3].mean_ms == pytest.approx(ref.mean_ms, rel=0.25)  # the chosen plan's rung
    for rung in got.rungs:  # nobody is confident: every frame leaves at the plan's first evaluated exit
        taken = [v for v in rung.exit_ms if v is not None]
        assert len(taken) == 1 and taken[0] == pytest.approx(rung.mean_ms)
    assert ref.exit_ms[3] == pytest.approx(ref.mean_ms, rel=0.01)
    assert not c.closed and c.plan == c.plan  # the cascade itself is untouched and open
    # the runtime reads a reference on the rows' scale as the calibrated plan's quiet anchor
    for row, rung in zip(rows, got.rungs, strict=True):
        row["measured"], row["exit_ms"] = rung.latency(), list(rung.exit_ms)
    reference = {**ref.latency(), "block_frames": got.block_frames, "block_sd": got.block_sd}
    measured = {**verified, "reference": reference, "exit_ms": list(ref.exit_ms), "ladder_scale": got.scale}
    block = {"thresholds": cal["thresholds"], "predicted": {"mean_ms": 2.0, "accuracy": 0.9}, "ladder": rows}
    parsed = parse_calibration({**block, "measured": measured}, 4)
    lad = calibrated_ladder(parsed, tuple)
    assert [r.measured_ms is not None for r in lad] == [True] * len(lad)
    anchor = next(r for r in lad if r.calibrated)
    assert anchor.measured_ms["mean_ms"] == pytest.approx(ref.mean_ms)
    ctl = controller_for(parsed, lad, budget_ms=ref.mean_ms)
    assert ctl.quiet_ms[ctl.anchor] == pytest.approx(ref.mean_ms)
    assert ctl.index == ctl.anchor  # B = the plan's own reference latency: the calibrated plan runs
    # a verification run that cannot be compared (an exit the interleaved run never saw) pools nothing
    odd = dict(verified, exit_shares=[1.0, 0.0, 0.0, 0.0])
    got = measure_ladder(c, frames, cal["thresholds"], rung_thresholds, odd, max_frames=30, block=10)
    assert got.scale == 1.0 and got.reference.frames == 30


def test_hostile_measurements_in_a_ladder_fall_back_to_the_prediction():
    """A manifest is an input: measured latencies that are NaN, negative, strings or missing, and exit
    tables of the wrong type, are ignored (the prediction × bias is used), never trusted or crashed on."""
    bad = [
        {"mean_ms": float("nan"), "p95_ms": 1.0},
        {"mean_ms": -1.0, "p95_ms": 1.0},
        {"mean_ms": "0.5", "p95_ms": 1.0},
        {"mean_ms": float("inf"), "p95_ms": float("inf")},
        "fast",
        None,
    ]
    rows = [
        {
            "thresholds": [0.1 * i],
            "predicted_ms": 0.2 * (i + 1),
            "predicted_accuracy": 0.5 + 0.05 * i,
            "measured": m,
            "exit_ms": ["x", float("nan"), -3],
        }  # fmt: skip
        for i, m in enumerate(bad)
    ]
    lad = build_ladder(parse_calibration({"ladder": rows}, 1).ladder, tuple)
    assert all(r.measured_ms is None and r.exit_ms is None for r in lad)
    ctl = BudgetController(lad, 0.7, window=8)
    assert ctl.quiet_ms == [r.predicted_ms for r in lad]  # no calibrated anchor: bias 1
    good = dict(rows[0], measured={"mean_ms": 0.3, "p95_ms": 0.4}, exit_ms=[0.25, "x", None, -1.0])
    (rung,) = build_ladder(parse_calibration({"ladder": [good]}, 1).ladder, tuple)
    assert rung.measured_ms == {"mean_ms": 0.3, "p95_ms": 0.4} and rung.exit_ms == (0.25, None, None, None)
    with pytest.raises(ValueError, match="window"):
        BudgetController(lad, 0.7, window=2)
    big = BudgetController(lad, 0.7, window=10**9)  # a huge window allocates nothing per window
    for _ in range(1000):
        big.observe(0.5, 3)
    assert big.windows == 0 and big._n == 1000


def test_hostile_reference_and_noise_fields_fall_back_to_the_verification_run():
    """calibration.measured.reference / .interleaved are manifest inputs: NaN, strings, negatives, huge or
    zero block sizes never reach the controller; it falls back to the verification run (and its p95 spread)."""
    from edgeexit.runtime.controller import controller_for

    lad = [Rung(f"plan{i}", c, 0.80 + 0.02 * i, calibrated=(i == 3)) for i, c in enumerate(COSTS)]
    verified = {"mean_ms": 1.1, "p95_ms": 1.5}  # rung 3 predicted 1.0: a fall-back to it would show
    for ref in (
        {"mean_ms": float("nan"), "p95_ms": 1.0, "block_sd": float("nan"), "block_frames": 50},
        {"mean_ms": "0.5", "p95_ms": -1, "block_sd": "big", "block_frames": 0},
        {"mean_ms": -2.0, "p95_ms": 1.0, "block_sd": True, "block_frames": 10**300},
        "fast",
        None,
    ):
        cal = parse_calibration({"metric": "mean", "measured": {**verified, "reference": ref}}, 4)
        ctl = controller_for(cal, lad, budget_ms=1.1)
        assert ctl.quiet_ms[ctl.anchor] == pytest.approx(1.1) and 0.01 <= ctl.sigma_q <= 0.5
        assert ctl.index == ctl.anchor  # B = the verification run's latency: the calibrated plan
    block = {"metric": "mean", "measured": {**verified, "reference": {**verified, "block_sd": 1e6, "block_frames": 50}}}
    huge = controller_for(parse_calibration(block, 4), lad, budget_ms=1.1)
    assert huge.sigma_q == 0.5  # an absurd spread is capped, not trusted
