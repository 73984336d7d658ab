"""The calibration block is typed all the way at load (runtime/artifact.py): predicted and measured
figures, the full model's predicted latency and the engines' fingerprints are numbers or strings of
the right kind, or the artifact is refused naming the field — in the API (`Artifact.load`,
`Cascade.load(budget_ms=...)`) and in the CLI (`run --budget`, `doctor`) alike, exit 2."""

from __future__ import annotations

import pytest
from conftest import edit_manifest
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


def test_the_typed_block_is_what_the_controller_and_run_budget_read(artifact_copy):
    """metric, the full model, the verification run, its ladder-scale reference and the rungs'
    measurements are fields; a figure that is not a positive number reads as not measured."""
    reference = {"mean_ms": 0.9, "p95_ms": 1.2, "frames": 300, "block_sd": 0.04, "block_frames": 50}
    rungs = [dict(LADDER[0], measured={"mean_ms": 1.9, "p95_ms": 2.4}, exit_ms=[None] * 7 + [1.9]),
             dict(LADDER[1], measured={"mean_ms": -1.0, "p95_ms": 1.0}, exit_ms=[1.0] * 8)]  # fmt: skip
    calibrated(artifact_copy, metric="p95", ladder=rungs,
               measured={"mean_ms": 1.1, "p95_ms": 1.4, "reference": reference})  # fmt: skip
    cal = Artifact.load(artifact_copy).calibration
    assert (cal.metric, cal.full_model_ms, cal.predicted_ms, cal.predicted_accuracy) == ("p95", 2.0, 1.0, 0.7)
    assert cal.measured.of("p95") == 1.4 and cal.reference.of("p95") == 1.2 and cal.reference.block_frames == 50
    assert cal.ladder[0].measured.mean_ms == 1.9 and cal.ladder[0].exit_ms[-1] == 1.9
    assert cal.ladder[1].measured is None and cal.ladder[1].exit_ms is None  # -1 ms: not a measurement


def test_calibration_is_checked_before_it_is_written(artifact_copy):
    from edgeexit.runtime.manifest import write_calibration

    before = (artifact_copy / "manifest.json").read_text()
    with pytest.raises(ArtifactError, match=r"calibration thresholds must be 8 finite numbers"):
        write_calibration(Artifact.load(artifact_copy), {"thresholds": [0.5] * 3})
    assert (artifact_copy / "manifest.json").read_text() == before
    block = {"thresholds": [0.5] * 7 + [0.0], "predicted": {"mean_ms": float("nan")}}  # NaN: written as null
    write_calibration(Artifact.load(artifact_copy), block)
    assert Artifact.load(artifact_copy).calibration.predicted_ms is None


@pytest.mark.parametrize("value", [8.7, 87, ["8", "7"]])
def test_engine_fingerprints_of_another_type_are_refused_naming_the_field(artifact_copy, value):
    (artifact_copy / "seg_01.fp16.engine").write_bytes(b"\0" * 16)
    engine = {"path": "seg_01.fp16.engine", "precision": "fp16", "trt_version": "10.3", "compute_capability": value}
    edit_manifest(artifact_copy, lambda m: m["units"][0].update(engines=[engine]))
    with pytest.raises(ArtifactError, match=r"units\[seg_01\]\.engines\[0\]\.compute_capability must be a string"):
        Artifact.load(artifact_copy)
    res = runner.invoke(app, ["doctor", str(artifact_copy)])
    assert res.exit_code == 2 and "compute_capability must be a string" in res.output.replace("\n", ""), res.output


def test_an_engine_batch_profile_is_a_positive_batch_or_refused_naming_the_field(artifact_copy):
    (artifact_copy / "seg_01.fp32.engine").write_bytes(b"\0" * 16)
    engine = {"path": "seg_01.fp32.engine", "precision": "fp32", "batch_profile": {"min": 1, "opt": 1, "max": 8}}
    edit_manifest(artifact_copy, lambda m: m["units"][0].update(engines=[engine]))
    assert Artifact.load(artifact_copy).units[0].engines[0].max_batch == 8
    engine["batch_profile"]["max"] = "8"
    edit_manifest(artifact_copy, lambda m: m["units"][0].update(engines=[engine]))
    with pytest.raises(ArtifactError, match=r"units\[seg_01\]\.engines\[0\]\.batch_profile\.max must be a positive"):
        Artifact.load(artifact_copy)
