import json

import numpy as np
import pytest

from edgeexit.calibrate.run import run_calibration
from edgeexit.errors import UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact

# Every test here calibrates (or reads the module's calibration): profiling, the fused exit groups and
# the interleaved verification take tens of seconds of CPU each. `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

CONTRACT = {"budget_ms", "metric", "thresholds", "evaluated_exits", "predicted", "measured", "baseline_msdnet"}


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, tmp_path_factory):
    import shutil

    dest = tmp_path_factory.mktemp("cal") / "model.edgeexit"
    shutil.copytree(tiny_artifact, dest)
    result = run_calibration(
        dest, budget_fraction=1.5, backend="onnxruntime", repeats=60, verify_images=200, iso_accuracy=False
    )
    return dest, result


def test_calibration_result_and_manifest(calibrated):
    dest, result = calibrated
    assert CONTRACT <= set(result)
    assert len(result["thresholds"]) == 8 and result["thresholds"][-1] <= 0
    assert result["evaluated_exits"][-1] == 8
    assert result["predicted"]["latency_ms"] <= result["budget_ms"] + 1e-9
    assert 0 < result["measured"]["accuracy"] <= 1 and result["measured"]["latency_ms"] > 0
    assert result["data"]["calibration_images"] == 300 and result["data"]["verification_images"] == 200
    m = Artifact.load(dest).to_json()
    cal = m["calibration"]
    assert cal["thresholds"] == result["thresholds"] and cal["backend"] == "onnxruntime-cpu"
    assert set(cal["latency"]["units"]) == {u["name"] for u in m["units"]}
    assert cal["device"]["cpu"] and cal["device"]["backend_version"]
    assert (dest / "calibration.png").stat().st_size > 1000
    assert list(dest.glob("calibration_stats.*.npz"))
    # ONNX Runtime fuses each evaluated exit's units into one call: every such group is timed
    groups = cal["latency"]["exit_groups"]
    assert len(groups) == 8 * 9 // 2 and "seg_02-04+head_04" in groups and "seg_01+head_01" in groups
    assert all(g["p50_ms"] > 0 for g in groups.values())
    # timed in memory: the artifact caches only the graphs of plans that ran, not all 36 groups
    assert len(list((dest / "fused").glob("*.onnx"))) < 36


def test_a_loaded_cascade_uses_the_calibrated_thresholds(calibrated, test_frames):
    dest, result = calibrated
    c = Cascade.load(dest, backend="onnxruntime")
    assert np.allclose(c.plan.thresholds[:-1], result["thresholds"][:-1])
    frames, _ = test_frames
    # the calibrated latency table is loaded: a deadline of 0 ms answers from the first exit
    assert all(c.predict(f, deadline_ms=0.0).exit_index == 1 for f in frames[:20])


def test_skipped_exits_are_not_evaluated(calibrated):
    _, result = calibrated
    for k, th in enumerate(result["thresholds"][:-1], 1):
        assert (k in result["evaluated_exits"]) == (th <= 1)


def test_infeasible_budget_is_exit_2_naming_the_minimum(artifact_copy):
    with pytest.raises(UserError, match=r"below the cheapest possible cascade \(\d+\.\d+ ms"):
        run_calibration(
            artifact_copy, budget_ms=1e-4, backend="onnxruntime", repeats=30, verify_images=50, iso_accuracy=False
        )
    assert Artifact.load(artifact_copy).to_json()["calibration"] is None


def test_generous_budget_keeps_final_exit_accuracy(artifact_copy):
    r = run_calibration(
        artifact_copy, budget_ms=1000.0, backend="onnxruntime", repeats=30, verify_images=100, iso_accuracy=False
    )
    assert "final-exit accuracy" in r["note"]
    assert r["predicted"]["accuracy"] >= r["full_model"]["calibration_accuracy"]


def test_cli_calibrate_json(artifact_copy, tmp_path):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    out = tmp_path / "c.json"
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(artifact_copy),
            "--budget",
            "150%",  # a tiny model's cheapest cascade can cost 90 % of its full model (timing noise)
            "--backend",
            "onnxruntime",
            "--repeats",
            "30",
            "--verify-limit",
            "100",
            "--metric",
            "p95",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert CONTRACT <= set(r) and r["metric"] == "p95"
    assert r["predicted"]["p95_ms"] <= r["budget_ms"] + 1e-9
    res = CliRunner().invoke(app, ["calibrate", str(artifact_copy), "--budget", "fast"])
    assert res.exit_code == 2 and "cannot read budget" in res.output


def test_max_drop_chooses_a_guarded_plan_and_reports_intervals(artifact_copy, tmp_path):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    out = tmp_path / "c.json"
    args = ["calibrate", str(artifact_copy), "--max-drop", "1pt", "--backend", "onnxruntime", "--repeats", "30"]
    res = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    promise = r["max_drop"]
    assert promise["max_drop"] == pytest.approx(0.01) and promise["drop_bound"] <= 0.01
    assert promise["n_frames"] == 600 and len(promise["families"]) >= 2
    assert promise["frontier"] and all(r["certified_drop"] >= 0 or r["speedup"] >= 1 for r in promise["frontier"])
    lo, hi = r["predicted"]["accuracy_interval_95"]
    assert lo <= r["predicted"]["accuracy"] <= hi
    assert r["measured"]["drop_vs_full"] == pytest.approx(
        r["full_model"]["measured"]["accuracy"] - r["measured"]["accuracy"]
    )
    # Bonferroni over the few exit families only, not over every plan tested
    z = Artifact.load(artifact_copy).to_json()["calibration"]["max_drop"]["z"]
    assert 1.645 < z < 2.7
    # both constraints: an impossible pair is exit 2 naming the one that cannot be met
    res = CliRunner().invoke(app, [*args[:-2], "--repeats", "30", "--budget", "1%", "--max-drop", "0pt"])
    assert res.exit_code == 2
    res = CliRunner().invoke(app, ["calibrate", str(artifact_copy), "--max-drop", "lots"])
    assert res.exit_code == 2 and "write it like 0.5pt" in res.output


def test_calibrate_runs_on_the_device_without_torch_or_the_dataset(artifact_copy):
    """The artifact carries its held-out images: calibrate with only numpy + onnxruntime."""
    import subprocess
    import sys

    m = Artifact.load(artifact_copy).to_json()
    frames = m["calibration_frames"]
    assert frames["count"] == 600 and frames["calibration"] == 300 and frames["verification"] == 300
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch fails\n"
        "from edgeexit.calibrate.run import run_calibration\n"
        f"r = run_calibration({str(artifact_copy)!r}, budget_fraction=1.5, backend='onnxruntime', repeats=30,"
        " iso_accuracy=False)\n"
        "bad = sorted(m for m, mod in sys.modules.items() if mod is not None and (m.split('.')[0] == 'torch'"
        " or m.startswith(('edgeexit.data', 'edgeexit.train', 'edgeexit.export'))))\n"
        "assert not bad, bad\n"
        "print(r['data']['calibration_images'], r['measured']['accuracy'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, acc = proc.stdout.split()
    assert n == "300" and 0.3 < float(acc) <= 1.0
    # the stored images are checked against the manifest's hash
    path = artifact_copy / frames["path"]
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    from edgeexit.errors import ArtifactError
    from edgeexit.runtime.manifest import load_calibration_frames

    with pytest.raises(ArtifactError, match="sha256"):
        load_calibration_frames(Artifact.load(artifact_copy))


@pytest.mark.parametrize("steps", [1, 0, -3, 201])
def test_an_absurd_ladder_size_is_refused_with_the_range(steps):
    from edgeexit.calibrate.run import CalibrationOptions

    with pytest.raises(UserError, match=r"ladder_steps must be within 2\.\.200"):
        CalibrationOptions(budget_fraction=0.5, ladder_steps=steps)


def test_a_recalibration_keeps_the_plan_it_replaces_unless_the_evidence_says_otherwise(artifact_copy, monkeypatch):
    """Calibrating the same artifact again for the same goal gives the same plan, with the evidence in the
    report; a previous plan that no longer fits the budget by the new profile is replaced. (The
    tolerance is widened here so that the test does not depend on how busy the machine running it is;
    the rule itself is tested on exact costs in test_calibrate_optimizer.py.)"""
    from conftest import edit_manifest

    import edgeexit.calibrate.run as run

    opts = dict(budget_fraction=0.9, backend="onnxruntime", repeats=30, verify_images=100, iso_accuracy=False,
                ladder_steps=2)  # fmt: skip
    first = run_calibration(artifact_copy, **opts)
    assert "kept_previous" not in first
    monkeypatch.setattr(run, "_keep_tolerance", lambda m: (0.25, 0.25))
    again = run_calibration(artifact_copy, **opts)
    kept = again["kept_previous"]
    assert kept["thresholds"] == first["thresholds"] and kept["cost_tolerance"] == 0.25
    assert kept["predicted_ms"] <= again["budget_ms"] * 1.25 and kept["profile_moved"] <= 0.25
    if "latency_correction" not in again:  # (a plan that overran when run is refitted whatever chose it)
        assert again["thresholds"] == first["thresholds"]

    def full_model(m):  # every early exit skipped: the whole network, 100 % > 90 % x 1.1
        m["calibration"]["thresholds"] = [2.0] * (len(first["thresholds"]) - 1) + [0.0]

    edit_manifest(artifact_copy, full_model)
    monkeypatch.setattr(run, "_keep_tolerance", lambda m: (0.10, 0.10))
    third = run_calibration(artifact_copy, **opts)
    assert "kept_previous" not in third
    assert third["predicted"]["latency_ms"] <= third["budget_ms"] + 1e-9
