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
            "1024",
            "--width",
            "0.0625",
            "--budget",
            "85%",
        ],
    )
    assert res.exit_code == 0, res.output
    s = json.loads((out / "quickstart.json").read_text())
    assert s["test"]["images"] == 1000 and sum(s["test"]["exit_histogram"].values()) == 1000
    assert s["budget_ms"] > 0 and len(s["thresholds"]) == 8
    assert s["speedup"] > 0 and s["test"]["accuracy"] > 0.3
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
    for word in ("budget", "thresholds", "accuracy", "speed-up"):
        assert word in res.output
