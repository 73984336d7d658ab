"""benchmarks/gpu_check.py judges its numbers: a parity step whose numbers miss the precision's
tolerance fails (and the script's exit status with it), run here on the SIMULATED TensorRT of
tests/fake_gpu/ (it checks the judging, not TensorRT)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fake_gpu import add_engines, install

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.sim


def test_a_parity_step_out_of_tolerance_fails_and_one_inside_passes(monkeypatch, artifact_copy, test_frames):
    import gpu_check

    import edgeexit.runtime.compare as compare

    install(monkeypatch, version="10.3.0", tf32=True)
    add_engines(artifact_copy)
    frames, labels = test_frames[0][:200], test_frames[1][:200]
    report: dict = {}
    gpu_check._step(report, "ok_step", gpu_check.parity, str(artifact_copy), frames, labels, "tensorrt")
    assert report["ok_step"]["ok"] is True and report["ok_step"]["result"]["failures"] == []
    assert 0 < max(report["ok_step"]["result"]["per_exit"]["max_abs_confidence_diff"]) <= 5e-3  # TF32, in bounds
    tight = compare.Tolerance(max_abs_confidence=1e-9, max_disagreement=0.005)
    monkeypatch.setitem(compare.TOLERANCES, "fp32", tight)
    gpu_check._step(report, "bad_step", gpu_check.parity, str(artifact_copy), frames, labels, "tensorrt")
    bad = report["bad_step"]
    assert bad["ok"] is False and "max |Δconfidence|" in bad["error"] and bad["result"]["per_exit"]
