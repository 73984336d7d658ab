"""INT8 units: Q/DQ export, accuracy parity, and the runtime running them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact


@pytest.fixture(scope="module")
def int8_artifact(tiny_run, tmp_path_factory):
    from edgeexit.export.exporter import export_checkpoint

    dest = tmp_path_factory.mktemp("int8") / "model.edgeexit"
    export_checkpoint(tiny_run[0] / "model.pt", out=dest, parity_images=64, int8=True, int8_images=128)
    return dest


@pytest.mark.slow
def test_int8_units_are_written_and_checked_by_accuracy(int8_artifact):
    m = Artifact.load(int8_artifact).to_json()
    assert m == json.loads((int8_artifact / "manifest.json").read_text())  # the typed INT8 units, read as written
    q = m["quantization"]
    assert q["format"] == "QDQ" and q["images"] == 128 and q["parity"]["passed"]
    assert len(q["parity"]["exits"]) == 8 and q["parity"]["images"] == 472  # the other held-out images
    for u in m["units"]:
        assert (int8_artifact / u["onnx_int8"]).is_file()
    import onnx

    assert m["units"][1]["onnx_int8"] == m["units"][1]["onnx"]  # heads stay FP32 (measured faster)
    ops = {n.op_type for n in onnx.load(str(int8_artifact / m["units"][0]["onnx_int8"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.slow
def test_convs_reading_few_channels_stay_fp32(int8_artifact):
    """A conv reading <= 4 channels (the stem on a gray or RGB image; the tiny model's 4-channel first
    stage) stays FP32, measured faster there; every other conv is quantized."""
    import onnx

    from edgeexit.export.quantize import narrow_input_convs

    segments = [u for u in Artifact.load(int8_artifact).to_json()["units"] if u["kind"] == "segment"]
    for unit in (segments[0], segments[3]):  # tiny model: 1 -> 4 -> 4 channels, then 8 channels
        fp32 = onnx.load(str(int8_artifact / unit["onnx"])).graph
        widths = {t.name: t.dims[1] for t in fp32.initializer if len(t.dims) == 4}
        convs = [n for n in fp32.node if n.op_type == "Conv"]
        narrow = set(narrow_input_convs(int8_artifact / unit["onnx"]))
        assert narrow == {n.name for n in convs if widths[n.input[1]] <= 4}
        graph = onnx.load(str(int8_artifact / unit["onnx_int8"])).graph
        producers = {o: n.op_type for n in graph.node for o in n.output}
        for node in (n for n in graph.node if n.op_type == "Conv"):
            weight_quantized = producers.get(node.input[1]) == "DequantizeLinear"
            assert weight_quantized == (node.name not in narrow), node.name
    assert narrow_input_convs(int8_artifact / segments[0]["onnx"]) and not narrow_input_convs(
        int8_artifact / segments[3]["onnx"]
    )


@pytest.mark.slow
def test_the_runtime_runs_int8_units_close_to_fp32(int8_artifact, test_frames):
    frames, labels = test_frames
    th = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]
    fp32 = Cascade.load(int8_artifact, backend="onnxruntime", thresholds=th).predict_batch(frames)
    c8 = Cascade.load(int8_artifact, backend="onnxruntime", thresholds=th, precision="int8")
    assert c8.backend_info["precision"] == "int8"
    int8 = c8.predict_batch(frames)
    acc32 = np.mean([p.label == y for p, y in zip(fp32, labels, strict=True)])
    acc8 = np.mean([p.label == y for p, y in zip(int8, labels, strict=True)])
    assert abs(acc32 - acc8) <= 0.02
    assert np.mean([a.label == b.label for a, b in zip(fp32, int8, strict=True)]) >= 0.9
    single = [c8.predict(f).label for f in frames[:50]]  # fused INT8 groups on the frame path
    assert single == [p.label for p in int8[:50]]


def test_int8_is_refused_where_it_does_not_exist(artifact_copy):
    from edgeexit.errors import ArtifactError, UserError

    with pytest.raises(ArtifactError, match="--int8"):
        Cascade.load(artifact_copy, backend="onnxruntime", precision="int8")
    with pytest.raises(UserError, match="fp32 only"):
        Cascade.load(artifact_copy, backend="torch", precision="int8")


@pytest.mark.slow
def test_run_and_bench_take_the_precision(int8_artifact, tmp_path):
    import json

    from typer.testing import CliRunner

    from edgeexit.cli import app

    res = CliRunner().invoke(
        app,
        [
            "bench",
            str(int8_artifact),
            "--backend",
            "onnxruntime",
            "--precision",
            "int8",
            "--repeats",
            "5",
            "--images",
            "0",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["precision"] == "int8"


@pytest.mark.slow
def test_the_nine_exit_layout_trains_exports_and_runs(tmp_path, test_frames):
    """exits=9 (a cheap first exit inside block 1) end to end: train, export with INT8 units,
    calibrate-free cascade with fused exit groups equal to unit by unit, FP32 and INT8."""
    from conftest import tiny_config

    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.train.trainer import train

    train(tiny_config(tmp_path / "run", exits=9, train_images=512), progress=False)
    art = tmp_path / "nine.edgeexit"
    # a 512-image model is unsure of many frames: its S8S8 TensorRT flavour can lose ~1.3 pt where the
    # S8U8 units lose under 1; this test is about the 9-exit layout, so 3 pt is the INT8 bar here
    export_checkpoint(
        tmp_path / "run" / "model.pt", out=art, parity_images=64, int8=True, int8_images=64, int8_tolerance=0.03
    )
    m = Artifact.load(art).to_json()
    assert len(m["units"]) == 18 and m["model"]["num_exits"] == 9 and m["model"]["config"]["exits"] == 9
    assert m["parity"]["max_abs_logit_diff"] <= m["parity"]["tolerance"] and m["quantization"]["parity"]["passed"]
    # the TensorRT flavour ran too, judged as the ONNX Runtime INT8 units are (accuracy within --int8-tolerance),
    # with the comparator's agreement verdict kept beside it
    trt = m["quantization"]["trt_parity"]
    assert trt["checked"] and trt["passed"] and trt["max_drop_pt"] <= 3 + 1e-9
    assert isinstance(trt["agreement_passed"], bool) and len(trt["exits"]) == 9
    assert m["units"][0]["flops"] < m["units"][2]["flops"]  # the first segment is the cheap one
    frames, _ = test_frames
    th = [0.9, 2.0, 0.8, 2.0, 0.7, 2.0, 2.0, 2.0, 0.0]
    for precision in ("fp32", "int8"):
        fused = Cascade.load(art, backend="onnxruntime", thresholds=th, precision=precision)
        plain = Cascade.load(art, backend="onnxruntime", thresholds=th, precision=precision, fuse=False)
        a, b = fused.predict_batch(frames[:200]), plain.predict_batch(frames[:200])
        assert [(p.label, p.exit_index) for p in a] == [(p.label, p.exit_index) for p in b]
        assert [fused.predict(f).exit_index for f in frames[:30]] == [p.exit_index for p in a[:30]]
