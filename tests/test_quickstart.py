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
            "--budget",
            "85%",
        ],
    )
    assert res.exit_code == 0, res.output
    s = json.loads((out / "quickstart.json").read_text())
    assert s["test"]["images"] == 1000 and sum(s["test"]["exit_histogram"].values()) == 1000
    assert s["budget_ms"] > 0 and len(s["thresholds"]) == 8
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
    for word in ("budget", "thresholds", "accuracy", "speed-up"):
        assert word in res.output
