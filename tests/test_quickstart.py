import json

import pytest
from typer.testing import CliRunner

from edgeexit.cli import app


@pytest.mark.slow
def test_quickstart_whole_flow_at_tiny_size(tmp_path, fashion_test):
    out = tmp_path / "qs"
    res = CliRunner().invoke(
        app,
        [
            "quickstart",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--limit-train",
            "2048",
            "--width",
            "0.0625",
            "--test-images",
            "1000",
        ],
    )
    assert res.exit_code == 0, res.output
    s = json.loads((out / "quickstart.json").read_text())
    assert s["test"]["images"] == 1000 and sum(s["test"]["exit_histogram"].values()) == 1000
    assert s["budget_ms"] > 0 and len(s["thresholds"]) == 8
    # the default is the promise: the fastest plan certified within 0.5 pt, its test drop with an interval
    assert s["promise"]["max_drop"] == pytest.approx(0.005) and s["promise"]["drop_bound"] <= 0.005
    lo, hi = s["test_drop"]["interval_95"]
    assert lo <= s["test_drop"]["drop"] <= hi
    assert s["test_drop"]["drop"] == pytest.approx(s["full_model_test"]["accuracy"] - s["test"]["accuracy"])
    # a 1-epoch width-0.0625 model is weak, but far above chance (10 %)
    assert s["test"]["accuracy"] > 0.2 and s["full_model_test"]["accuracy"] > 0.2
    assert s["speedup"] > 0
    for f in (
        "model.pt",
        "eval.json",
        "budgeted.png",
        "calibration.json",
        "model.edgeexit/manifest.json",
        "model.edgeexit/calibration.png",
    ):
        assert (out / f).is_file(), f
    assert (
        json.loads((out / "model.edgeexit" / "manifest.json").read_text())["calibration"]["budget_ms"] == s["budget_ms"]
    )
    for word in ("promise", "thresholds", "accuracy", "speed-up", "drop on the test images"):
        assert word in res.output
