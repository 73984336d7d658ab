"""calibrate on a busy device: the load it reports, the refusal when the profile cannot be trusted
(and --repeat / --accept-load), a percent budget held as a share of the full model measured on the
same moments, and plans that never get cheaper as the budget grows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeexit.calibrate.run import MIN_ROUNDS, run_calibration
from edgeexit.runtime.artifact import Artifact

# The tests that calibrate a real tiny artifact take tens of seconds of CPU each: marked slow.

LOAD_KEYS = {"seconds", "cpu_share", "rounds", "quiet_rounds", "slowdown", "quiet_spread", "quiet_error",
             "interrupted_share", "verdict", "profiles"}  # fmt: skip


def test_the_verdict_refuses_only_a_profile_whose_quiet_level_is_unknown():
    """Busy is said, not refused (the quiet rounds still give the ratios); too busy is a quiet level
    known only within more than 10 %, whatever the CPU share."""
    from edgeexit.calibrate.load import describe, verdict

    calm = {"cpu_share": 0.98, "slowdown": 1.02, "quiet_error": 0.004, "quiet_rounds": 17, "rounds": 50}
    assert verdict(calm) == ("quiet", [])
    assert verdict({**calm, "cpu_share": 0.3, "slowdown": 1.4})[0] == "busy"
    level, reasons = verdict({**calm, "quiet_error": 0.12})
    assert level == "too busy" and "±12.0%" in reasons[0]
    line = describe({**calm, "verdict": "quiet", "preemptions_per_s": 12.0})
    assert line.startswith("quiet: calibrate ran 98% of the time, 12 preemptions/s") and "17 of 50" in line


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, tmp_path_factory):
    dest = tmp_path_factory.mktemp("load") / "model.edgeexit"
    shutil.copytree(tiny_artifact, dest)
    r = run_calibration(dest, budget_fraction=1.5, backend="onnxruntime", repeats=40, verify_images=200,
                        iso_accuracy=False, ladder_steps=2, accept_load=True)  # fmt: skip
    return dest, r


@pytest.mark.slow
def test_the_report_and_the_manifest_say_how_busy_the_device_was(calibrated):
    dest, r = calibrated
    load = r["load"]
    assert LOAD_KEYS <= set(load) and load["verdict"] in ("quiet", "busy", "too busy")
    assert load["rounds"] >= MIN_ROUNDS and load["quiet_rounds"] == -(-load["rounds"] // 3) and load["profiles"] == 1
    assert 0 < load["cpu_share"] < 1.5 and load["slowdown"] >= 1.0 and 0 <= load["interrupted_share"] < 1
    assert Artifact.load(dest).to_json()["calibration"]["load"] == load
    # every piece of the cost model comes from the same quiet rounds, with how far the load moved it
    units = r["latency"]["units"]
    assert all(u["spread"] >= 0 and u["repeats"] > 0 for u in units.values())
    assert all(g["p50_ms"] > 0 for g in r["latency"]["exit_groups"].values())
    assert r["measured"]["fraction_of_full"] == pytest.approx(
        r["measured"]["mean_ms"] / r["full_model"]["measured"]["mean_ms"], rel=0.5
    )


@pytest.mark.slow
def test_a_device_too_busy_to_trust_is_refused_in_one_line_unless_repeated_or_accepted(
    calibrated, tmp_path, monkeypatch
):
    """With the trust limit below any real profile's, every profile is 'too busy': calibrate is exit 2
    with one line naming the three ways on and writes nothing; --repeat profiles again (pooled) and
    --accept-load writes the plan with the verdict in its load block."""
    from typer.testing import CliRunner

    import edgeexit.calibrate.load as load_rules
    from edgeexit.cli import app

    dest, _ = calibrated
    art = tmp_path / "busy.edgeexit"
    shutil.copytree(dest, art)
    before = (art / "manifest.json").read_text()
    monkeypatch.setattr(load_rules, "MAX_QUIET_ERROR", -1.0)
    monkeypatch.setattr("edgeexit.calibrate.run.RETRY_PAUSE_S", 0.0)
    args = ["calibrate", str(art), "--budget", "150%", "--backend", "onnxruntime", "--repeats", "20",
            "--verify-images", "50"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "too busy to calibrate reliably" in res.output and "Traceback" not in res.output
    assert all(w in res.output for w in ("wait", "--repeat N", "--accept-load"))
    assert (art / "manifest.json").read_text() == before
    out = tmp_path / "c.json"
    res = CliRunner().invoke(app, [*args, "--repeat", "2", "--accept-load", "--json", str(out)])
    assert res.exit_code == 0, res.output
    load = json.loads(out.read_text())["load"]
    assert load["verdict"] == "too busy" and load["accepted"] is True and load["profiles"] == 2
    assert load["rounds"] == 2 * MIN_ROUNDS  # the two profiles' rounds pooled
    assert Artifact.load(art).to_json()["calibration"]["load"]["accepted"] is True
    res = CliRunner().invoke(app, [*args, "--repeat", "0"])
    assert res.exit_code == 2 and "--repeat must be within 1..100" in res.output


@pytest.mark.slow
def test_a_busy_profile_is_taken_longer_and_said_so(calibrated, tmp_path, monkeypatch):
    """With the CPU-share threshold above any real profile's (as if other processes held the core), the
    first profile reads busy: calibrate takes BUSY_ROUNDS times the rounds (pooled, one profile), says
    why, and the load block counts them. A profile busy only by its slow rounds is not extended."""
    from typer.testing import CliRunner

    import edgeexit.calibrate.load as load_rules
    from edgeexit.calibrate.run import BUSY_ROUNDS
    from edgeexit.cli import app

    dest, _ = calibrated
    art = tmp_path / "busy.edgeexit"
    shutil.copytree(dest, art)
    out = tmp_path / "c.json"
    args = ["calibrate", str(art), "--budget", "150%", "--backend", "onnxruntime", "--repeats", "20",
            "--verify-images", "50", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr(load_rules, "BUSY_SLOWDOWN", 0.0)  # every profile busy by its rounds alone
    monkeypatch.setattr(load_rules, "BUSY_CPU_SHARE", 0.0)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    load = json.loads(out.read_text())["load"]
    assert load["verdict"] == "busy" and load["rounds"] == MIN_ROUNDS and "more rounds" not in res.output
    monkeypatch.setattr(load_rules, "BUSY_CPU_SHARE", 2.0)  # calibrate never had the core to itself
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"the device is busy: profiling {(BUSY_ROUNDS - 1) * MIN_ROUNDS} more rounds" in res.output
    load = json.loads(out.read_text())["load"]
    assert load["verdict"] == "busy" and load["profiles"] == 1 and load["rounds"] == BUSY_ROUNDS * MIN_ROUNDS


@pytest.mark.slow
def test_a_percent_budget_holds_as_a_share_of_the_full_model_measured_on_the_same_moments(calibrated, tmp_path):
    """95 % of the full model (the tiny model's cheapest cascade can cost 60-90 % of it): the chosen
    plan, run interleaved with the full model on the verification frames, costs at most 1.10 x that
    share of it, whatever the load while it ran."""
    dest, _ = calibrated
    art = tmp_path / "share.edgeexit"
    shutil.copytree(dest, art)
    res = run_calibration(art, budget_fraction=0.95, backend="onnxruntime", repeats=40, verify_images=300,
                          iso_accuracy=False, ladder_steps=2, accept_load=True)  # fmt: skip
    assert res["budget_ms"] == pytest.approx(0.95 * res["full_model"]["predicted_ms"])
    assert res["measured"]["fraction_of_full"] <= 1.10 * 0.95


@pytest.mark.slow
def test_a_larger_budget_never_chooses_a_cheaper_plan(calibrated):
    """On one calibration's cost model and stored frames, the plan chosen (out of fold, as calibrate
    does) at budgets from the cheapest cascade to the full model never costs less than the plan chosen
    at a smaller budget."""
    from edgeexit.calibrate.optimizer import CostModel, cross_fitted
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames

    dest, r = calibrated
    lat, k = r["latency"], len(r["thresholds"])
    cost = CostModel.from_timings(k, lat["units"], "mean_ms", lat["decision_ms"], lat["frame_overhead_ms"],
                                  lat["exit_groups"])  # fmt: skip
    with Cascade.load(dest, backend="onnxruntime") as c:
        stored = load_calibration_frames(c.artifact)
        x = c.preprocessor.batch(stored["frames"])
        stats = c.exit_statistics(x)
    correct = stats["prediction"] == stored["labels"][:, None]
    costs = []
    for share in np.linspace(cost.min_ms() / cost.full_ms(), 1.0, 8):
        fit = cross_fitted(stats["confidence"], correct, cost, share * cost.full_ms() + 1e-9)
        costs.append(fit.solution.mean_ms)
    assert all(b >= a - 1e-9 for a, b in zip(costs, costs[1:], strict=False)), costs


def test_a_plans_share_of_the_full_model_is_the_median_of_its_interleaved_blocks():
    """A burst of other work that landed on one of the plan's blocks (5 ms instead of 1) moves one
    block's ratio, not the share: the plan costs half the full model; the means say it costs as much."""
    from edgeexit.calibrate.result import Verified

    plan = Verified(None, {"mean_ms": 2.0}, (1.0, 1.0, 5.0, 1.0))
    full = Verified(None, {"mean_ms": 2.0}, (2.0, 2.0, 2.0, 2.0))
    assert plan.share_of(full, "mean_ms") == pytest.approx(0.5)
    assert Verified(None, {"mean_ms": 2.0}).share_of(full, "mean_ms") == pytest.approx(1.0)  # no blocks: the means


def test_the_quiet_share_reads_through_preemptions_and_its_interval_holds_the_truth():
    """A plan that costs 0.4 of the full model (60 % of frames leave at 0.2 ms, 40 % at 0.7 ms; the full
    model 1.0 ms), run beside other work: a quarter of the frames of both plans hit by a preemption of
    3-8 ms, in bursts that cover whole blocks for one plan and not the other. The median of block
    ratios is thrown far off; the quiet share reads what the frames cost without the preemptions within
    2 %, and its 90 % interval holds it and is narrow (it also carries which frames happened to be run:
    the blocks are resampled)."""
    from edgeexit.calibrate.result import Verified
    from edgeexit.runtime.profiling import quiet_share

    rng = np.random.default_rng(1)
    n, block = 600, 50
    exits = np.where(rng.random(n) < 0.6, 1, 8)
    plan_ms = np.where(exits == 1, 0.2, 0.7) * rng.normal(1, 0.03, n)
    full_ms = np.full(n, 1.0) * rng.normal(1, 0.03, n)
    hit_plan = (rng.random(n) < 0.25) | ((np.arange(n) // block) % 4 == 1)  # the plan's blocks 1, 5, 9 all hit
    hit_full = rng.random(n) < 0.25
    busy_plan = plan_ms + hit_plan * rng.uniform(3, 8, n)
    busy_full = full_ms + hit_full * rng.uniform(3, 8, n)
    blocks = lambda x: tuple(float(x[i : i + block].mean()) for i in range(0, n, block))  # noqa: E731
    plan = Verified(None, {"mean_ms": 0.0}, blocks(busy_plan), (tuple(busy_plan), tuple(exits)))
    full = Verified(None, {"mean_ms": 0.0}, blocks(busy_full), (tuple(busy_full), tuple([8] * n)))
    truth = plan_ms.mean() / full_ms.mean()
    share, low, high = plan.share_interval(full, "mean_ms")
    assert share == pytest.approx(truth, rel=0.02)
    assert low <= truth <= high and high - low < 0.06
    old = float(np.median(np.divide(blocks(busy_plan), blocks(busy_full))))
    assert abs(old - truth) > 0.2  # what the block medians read
    s, lo, hi = quiet_share((plan_ms, exits), (full_ms, np.full(n, 8)))
    assert s == pytest.approx(truth, rel=0.005) and lo <= truth <= hi and hi - lo < 0.04
    assert (
        quiet_share((plan_ms[:100], exits[:100]), (full_ms[:100], np.full(100, 8)))[1:]
        == (pytest.approx(s, rel=0.05),) * 2
    )  # fewer than 3 blocks: no interval, the point twice
    # a clock that read 0 ms for every frame of the full model: the block medians judge, not a division by 0
    zero = Verified(None, {"mean_ms": 0.0}, blocks(full_ms), (tuple(np.zeros(n)), tuple([8] * n)))
    by_blocks = float(np.median(np.divide(blocks(busy_plan), blocks(full_ms))))
    assert plan.share_interval(zero, "mean_ms") == (pytest.approx(by_blocks),) * 3
