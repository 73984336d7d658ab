"""The calibration report as typed stages: its JSON and manifest keys are a contract, the iso-accuracy
point is what it says, option errors name their fields."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeexit.calibrate.optimizer import CostModel
from edgeexit.calibrate.options import CalibrationOptions, OptionError
from edgeexit.calibrate.run import ISO_ACCURACY_DROP, run_calibration
from edgeexit.runtime.artifact import Artifact, Calibration

# The key paths of `run_calibration`'s result (= `calibrate --json`) before the report became typed,
# captured from a real tiny calibration at commit cc79ee8 (budget mode, --max-drop mode; the iso-accuracy
# block's keys from a run with a tolerance it could meet). The manifest's `calibration` block is the
# result without the artifact path, the plot and its curves, plus `created` and `backend` (checked then too).
BEFORE_COMMON = {
    "artifact",
    "baseline_msdnet",
    "baseline_msdnet.accuracy",
    "baseline_msdnet.latency_ms",
    "baseline_msdnet.predicted",
    "baseline_msdnet.predicted.accuracy",
    "baseline_msdnet.predicted.exit_shares",
    "baseline_msdnet.predicted.latency_ms",
    "baseline_msdnet.predicted.mean_ms",
    "baseline_msdnet.predicted.p95_ms",
    "baseline_msdnet.thresholds",
    "budget_ms",
    "certifiable",
    "certifiable.confidence",
    "certifiable.frontier",
    "certifiable.frontier[].certified_drop",
    "certifiable.frontier[].latency_ms",
    "certifiable.frontier[].speedup",
    "certifiable.n_frames",
    "data",
    "data.calibration_images",
    "data.dataset",
    "data.seed",
    "data.split",
    "data.verification_images",
    "decided_by",
    "device",
    "device.backend",
    "device.backend_version",
    "device.cpu",
    "device.cpu_threads",
    "device.device",
    "device.host",
    "device.machine",
    "device.precision",
    "evaluated_exits",
    "frontier",
    "frontier[].accuracy",
    "frontier[].latency_ms",
    "full_model",
    "full_model.calibration_accuracy",
    "full_model.measured",
    "full_model.measured.accuracy",
    "full_model.measured.exit_shares",
    "full_model.measured.latency_ms",
    "full_model.measured.mean_ms",
    "full_model.measured.p50_ms",
    "full_model.measured.p95_ms",
    "full_model.measured.samples",
    "full_model.predicted_ms",
    "iso_accuracy",
    "iso_accuracy.accuracy_drop_vs_full_measured",
    "iso_accuracy.drop_bound",
    "iso_accuracy.latency_fraction_of_full",
    "iso_accuracy.max_drop",
    "iso_accuracy.measured",
    "iso_accuracy.measured.accuracy",
    "iso_accuracy.measured.exit_shares",
    "iso_accuracy.measured.latency_ms",
    "iso_accuracy.measured.mean_ms",
    "iso_accuracy.measured.p50_ms",
    "iso_accuracy.measured.p95_ms",
    "iso_accuracy.measured.samples",
    "iso_accuracy.predicted",
    "iso_accuracy.predicted.accuracy",
    "iso_accuracy.predicted.exit_shares",
    "iso_accuracy.predicted.latency_ms",
    "iso_accuracy.predicted.mean_ms",
    "iso_accuracy.predicted.p95_ms",
    "iso_accuracy.thresholds",
    "ladder",
    "ladder[].budget_ms",
    "ladder[].exit_ms",
    "ladder[].measured",
    "ladder[].measured.frames",
    "ladder[].measured.mean_ms",
    "ladder[].measured.p95_ms",
    "ladder[].predicted_accuracy",
    "ladder[].predicted_ms",
    "ladder[].thresholds",
    "latency",
    "latency.batch",
    "latency.decision_ms",
    "latency.exit_groups",
    "latency.exit_groups.*",
    "latency.exit_groups.*.mean_ms",
    "latency.exit_groups.*.p50_ms",
    "latency.exit_groups.*.p95_ms",
    "latency.exit_groups.*.p99_ms",
    "latency.exit_groups.*.repeats",
    "latency.exit_step_ms",
    "latency.frame_overhead_ms",
    "latency.units",
    "latency.units.*",
    "latency.units.*.mean_ms",
    "latency.units.*.p50_ms",
    "latency.units.*.p95_ms",
    "latency.units.*.p99_ms",
    "latency.units.*.repeats",
    "measured",
    "measured.accuracy",
    "measured.drop_vs_full",
    "measured.exit_ms",
    "measured.exit_shares",
    "measured.interleaved",
    "measured.interleaved.frames",
    "measured.interleaved.full_mean_ms",
    "measured.interleaved.mean_ms",
    "measured.interleaved.p95_ms",
    "measured.interleaved.speedup",
    "measured.ladder_scale",
    "measured.latency_ms",
    "measured.mean_ms",
    "measured.p50_ms",
    "measured.p95_ms",
    "measured.reference",
    "measured.reference.block_frames",
    "measured.reference.block_sd",
    "measured.reference.frames",
    "measured.reference.mean_ms",
    "measured.reference.p95_ms",
    "measured.samples",
    "metric",
    "msdnet_curve",
    "msdnet_curve[].accuracy",
    "msdnet_curve[].latency_ms",
    "msdnet_curve[].q",
    "note",
    "options",
    "options.backend",
    "options.budget_fraction",
    "options.budget_ms",
    "options.confidence",
    "options.data",
    "options.iso_accuracy",
    "options.images",
    "options.ladder_steps",
    "options.max_drop",
    "options.metric",
    "options.policy",
    "options.precision",
    "options.repeats",
    "options.seed",
    "options.split",
    "options.verify_images",
    "plot",
    "policy",
    "predicted",
    "predicted.accuracy",
    "predicted.accuracy_interval_95",
    "predicted.drop_interval_95",
    "predicted.drop_vs_full",
    "predicted.exit_shares",
    "predicted.latency_ms",
    "predicted.mean_ms",
    "predicted.p95_ms",
    "seconds",
    "thresholds",
}
BEFORE_BUDGET_ONLY = {
    "cross_fit",
    "cross_fit.chosen",
    "cross_fit.folds",
    "cross_fit.out_of_fold",
    "cross_fit.out_of_fold.full-model",
    "cross_fit.out_of_fold.full-model.accuracy",
    "cross_fit.out_of_fold.full-model.latency_ms",
    "cross_fit.out_of_fold.msdnet",
    "cross_fit.out_of_fold.msdnet.accuracy",
    "cross_fit.out_of_fold.msdnet.latency_ms",
    "cross_fit.out_of_fold.optimised",
    "cross_fit.out_of_fold.optimised.accuracy",
    "cross_fit.out_of_fold.optimised.latency_ms",
    "predicted.out_of_fold_accuracy",
}
BEFORE_MAX_DROP_ONLY = {
    "max_drop",
    "max_drop.confidence",
    "max_drop.drop_bound",
    "max_drop.families",
    "max_drop.family",
    "max_drop.frames_needed",
    "max_drop.frames_needed.*",
    "max_drop.frontier",
    "max_drop.frontier[].certified_drop",
    "max_drop.frontier[].latency_ms",
    "max_drop.frontier[].speedup",
    "max_drop.kept",
    "max_drop.max_drop",
    "max_drop.method",
    "max_drop.n_frames",
    "max_drop.verified_drop",
    "max_drop.z",
}


def _manifest_keys(result_keys: set[str]) -> set[str]:
    def plot_only(p: str) -> bool:
        return p in ("artifact", "plot") or p.split("[")[0].split(".")[0] in ("frontier", "msdnet_curve")

    return {p for p in result_keys if not plot_only(p)} | {"created", "backend"}


# Added since the capture, in both modes: the drift monitor's reference (runtime/monitor.py).
DRIFT_REFERENCE = {
    "drift_reference",
    "drift_reference.classes",
    "drift_reference.classes.counts",
    "drift_reference.classes.high",
    "drift_reference.delta",
    "drift_reference.exits",
    "drift_reference.exits[].below",
    "drift_reference.exits[].high",
    "drift_reference.exits[].low",
    "drift_reference.exits[].q",
    "drift_reference.frames",
    "drift_reference.statistic",
    "drift_reference.thresholds",
    "drift_reference.version",
    # the input-brightness channel: the network input's median level and its Clopper-Pearson bounds
    "drift_reference.level",
    "drift_reference.level.below",
    "drift_reference.level.high",
    "drift_reference.level.low",
    "drift_reference.level.q",
    "drift_reference.level.stride",
}
# Added since the capture, in both modes: what the budget covers (calibrate --frame-size); without the
# flag the block is {"size": null, "network_size": [W, H], "covers": "cascade"}.
FRAME = {"frame", "frame.size", "frame.network_size", "frame.covers", "options.frame_size"}
# Added since the capture, in both modes: how busy the device was while profiling (calibrate/load.py),
# how far the load moved each piece's per-round time, and the plan's measured share of the full model.
LOAD = {f"load.{k}" for k in ("seconds", "cpu_share", "preemptions_per_s", "rounds", "quiet_rounds", "slowdown",
                              "quiet_spread", "quiet_error", "interrupted_share", "verdict", "profiles",
                              "accepted")} | {"load", "options.repeat", "options.accept_load",
                              "latency.units.*.spread", "latency.exit_groups.*.spread",
                              "measured.fraction_of_full"}  # fmt: skip
BEFORE = {
    "budget": {"result": BEFORE_COMMON | BEFORE_BUDGET_ONLY | DRIFT_REFERENCE | FRAME | LOAD},
    "max_drop": {"result": BEFORE_COMMON | BEFORE_MAX_DROP_ONLY | DRIFT_REFERENCE | FRAME | LOAD},
}
for _mode in BEFORE.values():
    _mode["manifest"] = _manifest_keys(_mode["result"])

# Maps keyed by data (unit names, exit groups, speed-ups): their keys are written as "*".
DYNAMIC = {"latency.units", "latency.exit_groups", "max_drop.frames_needed"}
# Present only when the real cascade overran the budget (see `_hold_measured`): either refit or not.
LATENCY_CORRECTION = {
    "latency_correction",
    "latency_correction.ratio",
    "latency_correction.first_measured_ms",
    "latency_correction.first_thresholds",
    "latency_correction.refit",
}


def schema(x, path: str = "") -> set[str]:
    """Every key path of a JSON value ("a.b", lists as "a[].b")."""
    out: set[str] = set()
    if isinstance(x, dict):
        for k, v in x.items():
            p = f"{path}.*" if path in DYNAMIC else (f"{path}.{k}" if path else k)
            out.add(p)
            out |= schema(v, p)
    elif isinstance(x, list):
        for v in x:
            out |= schema(v, path + "[]")
    return out


def _values(x, path: str) -> list:
    """The values at ``path`` (a `schema` path) in ``x``."""
    vals = [x]
    for part in path.split("."):
        nxt = []
        name, lists = part.rstrip("[]"), part.count("[]")
        for v in vals:
            if not isinstance(v, dict):
                continue
            got = list(v.values()) if name == "*" else ([v[name]] if name in v else [])
            for _ in range(lists):
                got = [e for g in got if isinstance(g, list) for e in g]
            nxt += got
        vals = nxt
    return vals


def assert_same_keys(doc: dict, before: set[str]) -> None:
    """``doc`` has every key path ``before`` had and no other; a path may be missing only beneath a value
    that is None or empty in ``doc`` (an infeasible baseline, no iso-accuracy point, ...), or inside the
    optional latency correction."""
    got = schema(doc)
    assert got - before - LATENCY_CORRECTION == set(), "keys the report did not have before"
    for p in sorted(before - got):
        if p in LATENCY_CORRECTION:
            continue
        parts = p.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        prefixes += [q.removesuffix("[]") for q in prefixes if q.endswith("[]")]
        empty = any(v is None or v == {} or v == [] for q in prefixes for v in _values(doc, q))
        assert empty, f"{p} is missing"


@pytest.fixture(scope="module")
def budget_run(tiny_artifact, tmp_path_factory):
    dest = tmp_path_factory.mktemp("report") / "model.edgeexit"
    shutil.copytree(tiny_artifact, dest)
    result = run_calibration(dest, budget_fraction=1.5, backend="onnxruntime", repeats=30, verify_images=100)
    return dest, result


@pytest.mark.slow
def test_budget_mode_keeps_every_key_of_the_result_and_the_manifest_block(budget_run):
    dest, result = budget_run
    assert_same_keys(result, BEFORE["budget"]["result"])
    cal = Artifact.load(dest).to_json()["calibration"]
    assert_same_keys(cal, BEFORE["budget"]["manifest"])
    # the manifest block is the result without the artifact path and the plot, plus the stamp
    assert set(cal) == (set(result) - {"artifact", "frontier", "msdnet_curve", "plot"}) | {"created", "backend"}
    assert cal["thresholds"] == result["thresholds"] and cal["ladder"] == result["ladder"]


@pytest.mark.slow
def test_the_manifest_block_parses_as_the_runtime_calibration(budget_run):
    dest, result = budget_run
    cal = Artifact.load(dest).calibration
    assert isinstance(cal, Calibration) and cal.backend == "onnxruntime-cpu"
    assert list(cal.thresholds) == result["thresholds"]
    assert len(cal.ladder) == 16 == len(result["ladder"])
    for rung, row in zip(cal.ladder, result["ladder"], strict=True):
        assert list(rung.thresholds) == row["thresholds"] and rung.predicted_ms == row["predicted_ms"]
        assert row["measured"]["frames"] == 100 and row["measured"]["mean_ms"] > 0
    # the rungs run from the cheapest cascade to every exit evaluated, predicted accuracy rising
    acc = [r.predicted_accuracy for r in cal.ladder]
    assert acc[-1] >= acc[0] and cal.ladder[0].predicted_ms < cal.ladder[-1].predicted_ms
    assert result["measured"]["ladder_scale"] > 0 and len(result["measured"]["exit_ms"]) == 8
    # the budget controller anchors on the chosen plan as the ladder measured it (pooled, on the rungs'
    # scale), not on the one contiguous verification run
    ref, inter = result["measured"]["reference"], result["measured"]["interleaved"]
    assert cal.reference is not None and cal.reference.complete and cal.reference.mean_ms == ref["mean_ms"]
    assert cal.reference.block_frames == ref["block_frames"] > 0 and ref["frames"] >= 100
    assert inter["speedup"] == pytest.approx(inter["full_mean_ms"] / inter["mean_ms"])


@pytest.mark.slow
def test_cli_max_drop_json_and_manifest_keep_every_key(artifact_copy, tmp_path):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    out = tmp_path / "c.json"
    args = ["calibrate", str(artifact_copy), "--max-drop", "1pt", "--backend", "onnxruntime", "--repeats", "30"]
    res = CliRunner().invoke(app, [*args, "--verify-limit", "100", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert_same_keys(r, BEFORE["max_drop"]["result"])
    assert_same_keys(Artifact.load(artifact_copy).to_json()["calibration"], BEFORE["max_drop"]["manifest"])
    promise = r["max_drop"]
    assert promise["verified_drop"] == pytest.approx(
        r["full_model"]["measured"]["accuracy"] - r["measured"]["accuracy"]
    )
    assert promise["kept"] == (promise["verified_drop"] <= 0.01 + 1e-12)
    assert "cross_fit" not in r and "latency_correction" not in r


@pytest.mark.slow
def test_iso_accuracy_is_none_when_the_frames_cannot_certify_it(budget_run):
    """400 frames cannot certify 0.5 pt at 95 %: even a plan agreeing with the full model on every frame
    has an upper bound of z·sqrt(2/402)/sqrt(400) ≈ 0.8 pt (the +1 pseudo-counts), so no point is reported
    and the certifiable frontier says why."""
    _, r = budget_run
    assert r["options"]["iso_accuracy"] is True and r["certifiable"]["n_frames"] == 400
    assert r["iso_accuracy"] is None
    faster = [p for p in r["certifiable"]["frontier"] if p["speedup"] > 1 + 1e-9]
    assert all(p["certified_drop"] > ISO_ACCURACY_DROP for p in faster)


@pytest.mark.slow
def test_iso_accuracy_point_is_within_its_tolerance_and_faster(artifact_copy, monkeypatch):
    """The tiny model's early exits are weak (40 % at exit 1 vs 67 % at the last): nothing faster than the
    full model is certified within 0.5 pt on its frames. At a tolerance it can meet (45 pt: above every
    bound of its sequences) the iso-accuracy point is the cheapest certified plan, faster than the full
    model, its predicted drop within its bound, and its verification run is what the report says."""
    import edgeexit.calibrate.run as run

    tol = 0.45
    monkeypatch.setattr(run, "ISO_ACCURACY_DROP", tol)
    r = run_calibration(artifact_copy, budget_fraction=1.5, backend="onnxruntime", repeats=30, verify_images=100)
    iso, full = r["iso_accuracy"], r["full_model"]
    assert iso is not None
    assert iso["max_drop"] == tol and 0 < iso["drop_bound"] <= tol
    # the bound is an upper bound on the drop these frames estimate
    assert full["calibration_accuracy"] - iso["predicted"]["accuracy"] <= iso["drop_bound"] + 1e-12
    assert iso["predicted"]["accuracy"] >= full["calibration_accuracy"] - tol
    assert iso["predicted"]["latency_ms"] < full["predicted_ms"]
    assert iso["thresholds"][-1] == 0.0 and any(t <= 1 for t in iso["thresholds"][:-1])
    assert iso["measured"]["samples"] == 100 and abs(sum(iso["measured"]["exit_shares"]) - 1) < 1e-9
    assert iso["latency_fraction_of_full"] == pytest.approx(
        iso["measured"]["latency_ms"] / full["measured"]["latency_ms"]
    )
    assert iso["accuracy_drop_vs_full_measured"] == pytest.approx(
        full["measured"]["accuracy"] - iso["measured"]["accuracy"]
    )
    # the certifiable frontier (thinned to speed-up steps of 0.02; a sequence's running bound) reaches the
    # point's speed-up within the tolerance
    speedup = full["predicted_ms"] / iso["predicted"]["latency_ms"]
    reach = [p for p in r["certifiable"]["frontier"] if p["speedup"] >= speedup - 0.02 - 1e-9]
    assert reach and min(p["certified_drop"] for p in reach) <= tol + 1e-12
    assert Artifact.load(artifact_copy).to_json()["calibration"]["iso_accuracy"] == iso


@pytest.mark.slow
def test_a_cascade_slower_than_predicted_is_refitted_and_reported(artifact_copy, monkeypatch):
    """Every plan but the full model made to measure 2.5 times its real latency when run interleaved
    with it (a cascade slower than the cost model says; a device slower as a whole slows the full
    model too and is not a reason to refit), the optimiser's plan chosen (at 150 % the tiny model's
    choice out of fold is the full model, which has nothing to refit): the plan overruns the budget as
    a share of the full model, so the optimiser is refitted at the budget scaled by measured/predicted
    (or, when nothing cheaper exists, the plan is kept), and the report's latency_correction says which."""
    from dataclasses import replace

    import edgeexit.calibrate.run as run
    from edgeexit.runtime.plan import CascadePlan

    real_verify, real_fit = run.verify_together, run.cross_fitted

    full = CascadePlan.full_model(8).to_list()

    def slow(cascade, x, y, plans, **k):  # every plan but the full model measures 2.5x (interleaved)
        runs = real_verify(cascade, x, y, plans, **k)
        times = ("latency_ms", "mean_ms", "p50_ms", "p95_ms")
        slowed = [{**m, **{f: 2.5 * m[f] for f in times}, "block_ms": [2.5 * b for b in m["block_ms"]],
                   "frame_ms": [2.5 * t for t in m["frame_ms"]]} for m in runs]  # fmt: skip
        return [m if p.to_list() == full else s for p, m, s in zip(plans, runs, slowed, strict=True)]

    def optimised(*a, **k):
        fit = real_fit(*a, **k)
        return replace(fit, chosen="optimised", solution=fit.fits["optimised"])

    monkeypatch.setattr(run, "verify_together", slow)
    monkeypatch.setattr(run, "cross_fitted", optimised)
    r = run_calibration(
        artifact_copy, budget_fraction=1.5, backend="onnxruntime", repeats=30, verify_images=100, iso_accuracy=False
    )
    lc = r["latency_correction"]
    assert r["cross_fit"]["chosen"] == "optimised"
    assert set(schema(r)) & LATENCY_CORRECTION == {"latency_correction"} | {f"latency_correction.{k}" for k in lc}
    assert lc["first_measured_ms"] > 1.03 * r["budget_ms"] and lc["ratio"] > 1.03
    if "first_thresholds" in lc:  # refitted: the new plan is predicted within the corrected budget
        assert len(lc["first_thresholds"]) == 8
        assert r["predicted"]["latency_ms"] <= r["budget_ms"] / 2  # refitted for a cascade 2.5x its model
        assert r["measured"]["fraction_of_full"] * r["full_model"]["predicted_ms"] <= 1.03 * r["budget_ms"]
    else:
        assert lc["refit"] is False
    assert Artifact.load(artifact_copy).to_json()["calibration"]["latency_correction"] == lc


@pytest.mark.parametrize(
    ("options", "fields", "message"),
    [
        ({"max_drop": 1.5}, ("max_drop",), "--max-drop must be within 0pt..100pt, got 1.5"),
        ({"budget_ms": 5.0, "budget_fraction": 0.5}, ("budget_ms", "budget_fraction"), "give one budget"),
        ({}, ("budget_ms", "budget_fraction", "max_drop"), "give --budget (5ms, 50%), --max-drop (0.5pt), or both"),
        ({"budget_ms": -1.0}, ("budget_ms",), "--budget must be a positive finite number, got -1.0"),
        (
            {"budget_fraction": 0.5, "verify_images": 3},
            ("verify_images",),
            "--verify-images must be at least 20, got 3",
        ),
        ({"budget_fraction": 0.5, "metric": "p50"}, ("metric",), "--metric must be mean or p95, got 'p50'"),
        ({"budget_fraction": 0.5, "confidence": 1.0}, ("confidence",), "--confidence must be within 0.5..0.999"),
        ({"budget_fraction": 0.5, "ladder_steps": 1}, ("ladder_steps",), "ladder_steps must be within 2..200, got 1"),
    ],
)
def test_option_errors_name_their_fields_in_the_cli_phrasing(options, fields, message):
    with pytest.raises(OptionError) as e:
        CalibrationOptions(**options)
    assert e.value.fields == fields and str(e.value).startswith(message)


def test_cost_model_full_and_all_exits():
    cost = CostModel(segment_ms=[1.0, 2.0, 3.0], head_ms=[0.1, 0.2, 0.3], decision_ms=0.01, overhead_ms=0.05)
    assert cost.full_ms() == pytest.approx(0.05 + 6.0 + 0.3 + 0.01)
    assert cost.all_exits_ms() == pytest.approx(0.05 + 6.0 + 0.6 + 0.03)
    assert cost.all_exits_ms() == pytest.approx(float(cost.exit_costs(np.ones(3, bool))[-1]))
