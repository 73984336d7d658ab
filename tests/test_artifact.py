"""Malformed artifacts: `Artifact.load` is one validated parse, and nothing but an ArtifactError
naming the field comes out of it (malformed fields, deep nesting, stored frames that do not fit the
model, weights whose config differs, a zip bomb or a FIFO as frames); artifacts written by earlier
versions still load with typed fields.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal

import numpy as np
import pytest
from conftest import cli, edit_manifest

from edgeexit.errors import ArtifactError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.manifest import load_calibration_frames


# -- malformed artifacts: one validated parse --------------------------------------------------------
def _head_outputs_null(m):
    m["units"][1]["outputs"][0]["shape"] = [None, None]


def _second_engine(m):
    m["units"][0]["engines"] = [{"path": "seg_01.fp16.engine"}]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: m.update(calibration={"latency": [1]}), "calibration.latency must be an object"),
        (lambda m: m.update(calibration={"policy": ["max_softmax"]}), "policy"),
        (lambda m: m.update(model={}), "model.config must be an object"),
        (_second_engine, "engines\\[0\\].precision must be one of"),
        (_head_outputs_null, "must give the number of classes"),
        (lambda m: m["units"][1]["outputs"][0].update(shape=None), "outputs must list"),
        (lambda m: m["units"][2].update(onnx="seg_01.onnx"), "which units\\[seg_01\\].files.fp32 names too"),
        (lambda m: m["units"][1].update(outputs=m["units"][1]["outputs"][::-1]), "must be \\[logits, confidence\\]"),
        (
            lambda m: m["units"][0].update(outputs=m["units"][0]["outputs"][::-1]),
            "are not seg_01's outputs|must be seg_01's last output",
        ),
        (lambda m: m["preprocessing"].update(input_size=[32, 32]), "seg_01 takes"),
        (lambda m: m["preprocessing"].update(in_chans=3, mean=[0.5] * 3, std=[0.5] * 3), "seg_01 takes"),
        (lambda m: m["preprocessing"].update(std=[1e-50]), "not finite in float32"),
        (lambda m: m["preprocessing"].update(mean=[1e39]), "not finite in float32"),
        (lambda m: m["model"]["config"].update(exits=4), "model.config.exits is 4"),
        (lambda m: m["model"]["config"].update(width="wide"), "model.config.width"),
        (lambda m: m.update(schema_version=True), "schema_version"),
    ],
)
def test_malformed_artifacts_are_refused_at_load_naming_the_field(artifact_copy, change, match):
    edit_manifest(artifact_copy, change)
    with pytest.raises(ArtifactError, match=match):
        Artifact.load(artifact_copy)
    res = cli("run", artifact_copy, "--source", artifact_copy, "--backend", "onnxruntime")
    assert res.exit_code == 2, res.output


def test_a_deeply_nested_field_is_refused_without_recursion(artifact_copy):
    text = (artifact_copy / "manifest.json").read_text()
    deep = "[" * 100_000 + "]" * 100_000
    (artifact_copy / "manifest.json").write_text(text[:-1].rstrip().rstrip("}") + f', "x": {deep}}}')
    with pytest.raises(ArtifactError, match="nests deeper than"):
        Artifact.load(artifact_copy)
    assert cli("info", artifact_copy).exit_code == 2


def _rewrite_frames(artifact, data: bytes, **info):
    (artifact / "calibration" / "frames.npz").write_bytes(data)
    edit_manifest(
        artifact,
        lambda m: m["calibration_frames"].update(sha256=hashlib.sha256(data).hexdigest(), **info),
    )


def test_a_truncated_frames_file_is_an_artifact_error(artifact_copy):
    data = (artifact_copy / "calibration" / "frames.npz").read_bytes()
    _rewrite_frames(artifact_copy, data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a calibration-frames file"):
        load_calibration_frames(Artifact.load(artifact_copy))


def test_a_pickled_frames_member_is_refused(artifact_copy):
    buf = io.BytesIO()
    objs = np.array([{"a": 1}] * 4, dtype=object)
    np.savez(buf, frames=objs, labels=np.zeros(4, np.int64), calibration=np.arange(2), verification=np.arange(2, 4))
    _rewrite_frames(artifact_copy, buf.getvalue())
    with pytest.raises(ArtifactError, match="not a calibration-frames file"):
        load_calibration_frames(Artifact.load(artifact_copy))


def _stored(artifact):
    with np.load(artifact / "calibration" / "frames.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.update(frames=d["frames"][:, :5, :5]), "frames are \\[5, 5, 1\\]"),
        (lambda d: d["labels"].__setitem__(0, 99), "labels must be integers 0..9"),
        (lambda d: d.update(verification=d["calibration"]), "verification indices include calibration images"),
        (lambda d: d.update(calibration=np.concatenate([d["calibration"][:2]] * 2)), "repeat an image"),
    ],
)
def test_stored_frames_that_do_not_fit_the_model_are_refused(artifact_copy, change, match):
    d = _stored(artifact_copy)
    change(d)
    buf = io.BytesIO()
    np.savez_compressed(buf, **d)
    _rewrite_frames(artifact_copy, buf.getvalue())
    with pytest.raises(ArtifactError, match=match):
        load_calibration_frames(Artifact.load(artifact_copy))
    res = cli("calibrate", artifact_copy, "--budget", "50%", "--backend", "onnxruntime")
    assert res.exit_code == 2, res.output


def test_weights_whose_config_differs_from_the_manifest_are_refused_before_building(artifact_copy):
    import torch

    blob = torch.load(artifact_copy / "weights.pt", weights_only=True)
    blob["config"]["width"] = 20.0
    torch.save(blob, artifact_copy / "weights.pt")
    with pytest.raises(ArtifactError, match="config width is 20.0 but the manifest's model.config.width is 0.0625"):
        Cascade.load(artifact_copy, backend="torch")


def test_an_artifact_of_an_earlier_version_loads_with_typed_fields(artifact_copy):
    """Backward compatible: the fields earlier schema-1 exports lacked are optional."""

    def old(m):
        for key in ("calibration_frames", "quantization", "edgeexit_version", "created", "split"):
            m.pop(key, None)
        for u in m["units"]:
            for key in ("engines", "onnx_int8", "macs", "flops", "params", "exit_index", "tap"):
                u.pop(key, None)
            for t in u["inputs"] + u["outputs"]:
                t.pop("dtype", None)
        m["preprocessing"].pop("channel_order", None)
        m["preprocessing"].pop("resize", None)

    edit_manifest(artifact_copy, old)
    (artifact_copy / "calibration" / "frames.npz").unlink()
    a = Artifact.load(artifact_copy)
    assert a.num_exits == 8 and a.model.num_classes == 10 and len(a.class_names) == 10
    assert a.segment(0).files["fp32"] == artifact_copy / "seg_01.onnx" and a.segment(0).engines == ()
    assert a.preprocessing.input_size == (28, 28) and a.calibration is None and a.calibration_frames is None
    assert a.head(7).outputs[0].shape == (None, 10)
    with pytest.raises(AttributeError):
        a.model = None  # frozen
    assert Cascade.load(artifact_copy, backend="onnxruntime").num_exits == 8
    # written back (what calibrate does), an earlier manifest keeps its meaning: absent blocks stay absent
    written = a.to_json()
    assert not {"calibration_frames", "quantization", "created"} & set(written)
    assert written["units"][0]["onnx"] == "seg_01.onnx" and written["units"][0]["inputs"][0]["dtype"] == "float32"
    assert a.with_calibration(None).units == a.units


# -- one artifact model: what is read is what is written ---------------------------------------------
def _round_trip(folder):
    """The manifest on disk, and what `Artifact.load` of it writes back."""
    return json.loads((folder / "manifest.json").read_text()), Artifact.load(folder).to_json()


def test_an_exported_artifact_writes_back_the_manifest_on_disk(tiny_artifact):
    raw, written = _round_trip(tiny_artifact)
    assert written == raw
    art = Artifact.load(tiny_artifact)
    assert [u.to_json(tiny_artifact) for u in art.units] == raw["units"]  # the typed units, serialised
    assert art.model.to_json() == raw["model"] and art.preprocessing.to_json() == raw["preprocessing"]
    assert art.calibration_frames.to_json(tiny_artifact) == raw["calibration_frames"]
    assert art.with_calibration(None).to_json() == raw  # uncalibrated written as uncalibrated


def test_every_flavour_engine_and_calibration_round_trips(artifact_copy):
    """FP16 and INT8 files, TensorRT engine entries and a calibration: each written by the typed model
    (`Unit.with_file`, `Artifact.with_engines`, `Artifact.with_calibration`) reads back as written."""
    from edgeexit.export.onnx_units import write_fp16_units
    from edgeexit.export.tensorrt import engine_entry, engine_filename, profile_shapes
    from edgeexit.runtime.artifact import Engine
    from edgeexit.runtime.manifest import write_calibration, write_manifest

    art = Artifact.load(artifact_copy)
    units = write_fp16_units(artifact_copy, art.units)
    units = [u.with_file("int8", u.file("fp16"), int8_bytes=1) for u in units]  # a stand-in INT8 file
    m = {**art.to_json(), "units": [u.to_json(artifact_copy) for u in units]}
    write_manifest(art, m)
    raw, written = _round_trip(artifact_copy)
    assert written == raw and raw["units"][0]["onnx_fp16"] == "seg_01.fp16.onnx"
    assert raw["units"][0]["int8_bytes"] == 1 and raw["units"][1]["onnx_fp16"] == "head_01.onnx"
    art = Artifact.load(artifact_copy)
    device = {"name": "sim", "compute_capability": "8.7"}
    engines = []
    for u in art.units:
        path = artifact_copy / engine_filename(u.name, "fp16")
        path.write_bytes(b"plan")
        shapes = profile_shapes([t.to_json() for t in u.inputs], 8)
        engines.append(Engine(path, "fp16", engine_entry(path.name, "fp16", "10.3.0", device, shapes), 8))
    write_manifest(art, art.with_engines("fp16", engines, {"passed": True}).to_json())
    raw, written = _round_trip(artifact_copy)
    assert written == raw and raw["units"][3]["engines"][0]["path"] == "head_02.fp16.engine"
    assert raw["engine_parity"] == {"passed": True} and Artifact.load(artifact_copy).units[0].engines[0].max_batch == 8
    skip = [0.5] * 7 + [0.0]
    block = {"thresholds": skip, "policy": "max_softmax", "note": "kept whole", "predicted": {"accuracy": 0.8}}
    art = Artifact.load(artifact_copy)
    write_calibration(art, art.with_calibration(block).calibration)  # a typed Calibration, written
    raw, written = _round_trip(artifact_copy)
    assert written == raw and raw["calibration"] == block and len(raw["units"][0]["engines"]) == 1


@pytest.mark.slow
def test_artifact_load_never_raises_anything_but_artifact_error(artifact_copy):
    """The mechanism covers the class: every field of the manifest (top level, model, preprocessing,
    a segment, a head, a tensor, calibration) replaced by a value of each wrong type either loads or
    is an ArtifactError; never a KeyError, TypeError, AttributeError or RecursionError."""
    original = json.loads((artifact_copy / "manifest.json").read_text())
    original["calibration"] = {
        "thresholds": [0.9] * 8,
        "policy": "max_softmax",
        "backend": "onnxruntime-cpu",
        "ladder": [{"thresholds": [0.9] * 8, "predicted_ms": 1.0, "predicted_accuracy": 0.5}],
        "latency": {"units": {u["name"]: {"p95_ms": 0.1} for u in original["units"]}},
    }
    wrong = [None, True, 0, -1, 1.5, "x", [], [1], {}, {"a": 1}, [None]]
    places = [
        ((), list(original)),
        (("model",), list(original["model"])),
        (("model", "config"), list(original["model"]["config"])),
        (("preprocessing",), list(original["preprocessing"])),
        (("units", 0), list(original["units"][0])),
        (("units", 1), list(original["units"][1])),
        (("units", 1, "outputs", 0), ["name", "shape", "dtype"]),
        (("units", 0, "inputs", 0), ["name", "shape", "dtype"]),
        (("calibration", "ladder", 0), ["thresholds", "predicted_ms", "predicted_accuracy"]),
        (("calibration", "latency"), ["units"]),
        (("calibration", "latency", "units"), ["seg_01"]),
        (("calibration",), list(original["calibration"])),
        (("calibration_frames",), list(original["calibration_frames"])),
    ]
    tried = 0
    for where, keys in places:
        for key in keys:
            for value in wrong:
                m = json.loads(json.dumps(original))
                node = m
                for step in where:
                    node = node[step]
                node[key] = value
                (artifact_copy / "manifest.json").write_text(json.dumps(m))
                try:
                    Artifact.load(artifact_copy)
                except ArtifactError:
                    pass
                tried += 1
    assert tried > 500


def test_a_zip_bomb_as_frames_is_refused_unread(artifact_copy):
    buf = io.BytesIO()
    big = np.zeros((4000, 100, 100, 1), np.uint8)  # 40 MB of zeros, ~40 KB compressed
    np.savez_compressed(
        buf, frames=big, labels=np.zeros(4000, np.int64), calibration=np.arange(2), verification=np.arange(2, 4)
    )
    data = buf.getvalue()
    assert len(data) < 1_000_000
    _rewrite_frames(artifact_copy, data)
    with pytest.raises(ArtifactError, match="decompression bomb"):
        load_calibration_frames(Artifact.load(artifact_copy))


def test_a_fifo_as_frames_is_refused_without_blocking(artifact_copy):
    frames = artifact_copy / "calibration" / "frames.npz"
    frames.unlink()
    os.mkfifo(frames)
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on a FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(ArtifactError, match="FIFO"):
            load_calibration_frames(Artifact.load(artifact_copy))
    finally:
        signal.alarm(0)
