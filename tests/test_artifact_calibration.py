"""The calibration block is typed all the way at load (runtime/artifact.py): predicted and measured
figures, the full model's predicted latency and the engines' fingerprints are numbers or strings of
the right kind, or the artifact is refused naming the field — in the API (`Artifact.load`,
`Cascade.load(budget_ms=...)`) and in the CLI (`run --budget`, `doctor`) alike, exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.errors import ArtifactError
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.cascade import Cascade

runner = CliRunner()

LADDER = [
    {"thresholds": [2.0] * 7 + [0.0], "predicted_ms": 2.0, "predicted_accuracy": 0.8},
    {"thresholds": [0.9] * 7 + [0.0], "predicted_ms": 1.0, "predicted_accuracy": 0.7},
]


def calibrated(artifact, **fields):
    from test_hostile import edit_manifest

    block = {"thresholds": [0.9] * 7 + [0.0], "ladder": LADDER, "predicted": {"mean_ms": 1.0, "accuracy": 0.7},
             "full_model": {"predicted_ms": 2.0}, **fields}  # fmt: skip
    edit_manifest(artifact, lambda m: m.update(calibration=block))


HOSTILE = [
    ({"measured": "abc"}, r"calibration\.measured must be an object, got str"),
    ({"measured": [1, 2]}, r"calibration\.measured must be an object, got list"),
    ({"predicted": "x"}, r"calibration\.predicted must be an object"),
    ({"predicted": {"mean_ms": "1.0"}}, r"calibration\.predicted\.mean_ms must be a positive finite number"),
    ({"predicted": {"mean_ms": 1.0, "accuracy": 7}}, r"calibration\.predicted\.accuracy must be a number within"),
    ({"measured": {"mean_ms": True}}, r"calibration\.measured\.mean_ms must be a positive"),
    ({"measured": {"exit_ms": "fast"}}, r"calibration\.measured\.exit_ms must list a number"),
    ({"full_model": {"predicted_ms": -3}}, r"calibration\.full_model\.predicted_ms must be a positive finite number"),
    ({"full_model": {"predicted_ms": "2"}}, r"calibration\.full_model\.predicted_ms must be a positive"),
    ({"full_model": [2.0]}, r"calibration\.full_model must be an object"),
    ({"full_model": {"predicted_ms": 2.0, "measured": {"p95_ms": -1}}}, r"calibration\.full_model\.measured\.p95_ms"),
]


@pytest.mark.parametrize("fields,match", HOSTILE)
def test_hostile_calibration_fields_are_refused_naming_the_field(artifact_copy, fields, match):
    calibrated(artifact_copy, **fields)
    with pytest.raises(ArtifactError, match=match):
        Artifact.load(artifact_copy)
    with pytest.raises(ArtifactError, match=match):
        Cascade.load(artifact_copy, backend="onnxruntime", budget_ms=5.0)
    for args in (["run", artifact_copy, "--source", artifact_copy, "--budget", "50%"], ["doctor", artifact_copy]):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert match.split(" must")[0].replace("\\", "") in res.output.replace("\n", "")


def test_a_well_typed_block_still_loads_and_drives_the_budget(artifact_copy):
    calibrated(artifact_copy, measured={"mean_ms": 1.1, "p95_ms": 1.4, "exit_ms": [None] * 7 + [1.1]})
    cal = Artifact.load(artifact_copy).calibration
    assert cal.to_dict()["full_model"]["predicted_ms"] == 2.0
    c = Cascade.load(artifact_copy, backend="onnxruntime", budget_ms=5.0)
    assert c.controller.budget_ms == 5.0


@pytest.mark.parametrize("value", [8.7, 87, ["8", "7"]])
def test_engine_fingerprints_of_another_type_are_refused_naming_the_field(artifact_copy, value):
    from test_hostile import edit_manifest

    (artifact_copy / "seg_01.fp16.engine").write_bytes(b"\0" * 16)
    engine = {"path": "seg_01.fp16.engine", "precision": "fp16", "trt_version": "10.3", "compute_capability": value}
    edit_manifest(artifact_copy, lambda m: m["units"][0].update(engines=[engine]))
    with pytest.raises(ArtifactError, match=r"units\[seg_01\]\.engines\[0\]\.compute_capability must be a string"):
        Artifact.load(artifact_copy)
    res = runner.invoke(app, ["doctor", str(artifact_copy)])
    assert res.exit_code == 2 and "compute_capability must be a string" in res.output.replace("\n", ""), res.output
