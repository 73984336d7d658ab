"""Hostile files and careless hands: every case is a clear error, with nothing executed,
nothing read or written outside where it belongs, and nothing lost. One test per case; the table
in docs/lab-notebook.md §3 maps each to the behaviour before the fix.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import cli, dead_pid, edit_manifest

from edgeexit.errors import ArtifactError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact

K = 8


# -- path escape --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "sub/../../outside.onnx"])
def test_a_manifest_cannot_name_a_file_outside_the_artifact(artifact_copy, name):
    (artifact_copy.parent / "outside.onnx").write_bytes((artifact_copy / "seg_01.onnx").read_bytes())
    edit_manifest(artifact_copy, lambda m: m["units"][0].update(onnx=name))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        Cascade.load(artifact_copy, backend="onnxruntime")
    res = cli("run", artifact_copy, "--source", artifact_copy)
    assert res.exit_code == 2 and "outside the artifact" in res.output


def test_a_symlinked_unit_that_leads_outside_is_refused(artifact_copy):
    outside = artifact_copy.parent / "elsewhere.onnx"
    shutil.copy(artifact_copy / "seg_02.onnx", outside)
    (artifact_copy / "seg_02.onnx").unlink()
    os.symlink(outside, artifact_copy / "seg_02.onnx")
    with pytest.raises(ArtifactError, match="resolves outside"):
        Artifact.load(artifact_copy)


def test_the_torch_backend_weights_must_be_inside(artifact_copy):
    edit_manifest(artifact_copy, lambda m: m.update(weights="/etc/passwd"))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        Cascade.load(artifact_copy, backend="torch")


def test_a_fused_folder_that_is_a_symlink_is_neither_read_nor_written(artifact_copy, test_frames):
    outside = artifact_copy.parent / "attacker"
    outside.mkdir()
    shutil.rmtree(artifact_copy / "fused", ignore_errors=True)  # other tests may have built graphs
    os.symlink(outside, artifact_copy / "fused")
    th = [0.9, 2.0, 2.0, 0.8, 2.0, 2.0, 2.0, 0.0]
    c = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th)
    c.predict(test_frames[0][0])
    assert list(outside.iterdir()) == []


# -- silent wrong results -----------------------------------------------------------------------
def test_a_stale_fused_graph_is_not_used_with_new_units(artifact_copy, test_frames):
    """A new export copied over an old one (rsync without --delete) keeps the old fused/ files."""
    import onnx
    from onnx import numpy_helper

    frames = test_frames[0][:200]
    th = [0.9, 2.0, 2.0, 0.8, 2.0, 2.0, 2.0, 0.0]
    Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th)  # builds and caches fused/
    old_cache = sorted(p.name for p in (artifact_copy / "fused").iterdir())
    model = onnx.load(str(artifact_copy / "seg_03.onnx"))  # "a new export": other weights in seg_03
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(artifact_copy / "seg_03.onnx"))
    fused = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th).predict_batch(frames)
    plain = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th, fuse=False).predict_batch(frames)
    assert [(p.label, p.exit_index) for p in fused] == [(p.label, p.exit_index) for p in plain]
    assert sorted(p.name for p in (artifact_copy / "fused").iterdir()) != old_cache


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: m["preprocessing"].update(std=[0.0]), "std must be 1 positive"),
        (lambda m: m["preprocessing"].update(mean=[float("nan")]), "not valid JSON|mean must be"),
        (lambda m: m["preprocessing"].update(input_size=[28]), "input_size"),
        (lambda m: m.update(class_names=["a", "b", "c"]), "3 class_names but the model has 10"),
        (lambda m: m.update(class_names="abc"), "class_names must be"),
    ],
)
def test_bad_preprocessing_and_class_names_are_refused_at_load(artifact_copy, change, match):
    edit_manifest(artifact_copy, change)
    with pytest.raises(ArtifactError, match=match):
        Cascade.load(artifact_copy, backend="onnxruntime")


@pytest.mark.parametrize("budget", ["1e999ms", "inf%", "nan%", "1e400%", "0ms"])
def test_non_finite_budgets_are_refused_and_the_manifest_stays_strict_json(artifact_copy, budget):
    res = cli("calibrate", artifact_copy, "--budget", budget, "--backend", "onnxruntime")
    assert res.exit_code == 2, res.output
    json.loads((artifact_copy / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_json_writer_writes_non_finite_numbers_as_null_and_names_them(capsys):
    import json

    from edgeexit.util import strict_json

    text = strict_json({"x": float("inf"), "y": [1.0, float("nan")], "z": 2.5})
    assert json.loads(text) == {"x": None, "y": [1.0, None], "z": 2.5}  # any JSON parser reads it
    err = capsys.readouterr().err
    assert "2 non-finite number(s) written as null" in err and "x" in err and "y" in err


def test_deadlines_must_be_numbers_at_least_zero(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    c.set_unit_latency({u.name: 0.1 for u in c.artifact.units})
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="deadline_ms must be a number >= 0"):
            c.predict(test_frames[0][0], deadline_ms=bad)
    assert c.predict(test_frames[0][0], deadline_ms=0.0).exit_index == 1  # 0: answer from exit 1
    res = cli("run", artifact_copy, "--source", artifact_copy, "--deadline-ms", "nan")
    assert res.exit_code == 2 and "--deadline-ms" in res.output


@pytest.mark.parametrize(
    "args,match",
    [
        (["run", "{a}", "--source", "{a}", "--max-frames", "-3"], "--max-frames must be at least 1"),
        (["calibrate", "{a}", "--budget", "50%", "--images", "-100"], "--images must be at least 20"),
        (["calibrate", "{a}", "--budget", "50%", "--limit", "0"], "--images must be at least 20"),  # earlier spelling
        (["calibrate", "{a}", "--budget", "50%", "--repeats", "0"], "--repeats must be at least 1"),
        (["calibrate", "{a}", "--budget", "50%", "--metric", "p99"], "--metric must be mean or p95"),
        (["bench", "{a}", "--backend", "onnxruntime", "--batch", "0"], "--batch must be within 1.."),
        (["bench", "{a}", "--backend", "onnxruntime", "--batch", "100000000"], "--batch must be within 1.."),
        (["bench", "{a}", "--backend", "onnxruntime", "--repeats", "-5"], "--repeats must be at least 1"),
        (["train", "--train-images", "0", "--out", "{t}/r"], "--train-images must be at least 1"),
        (["train", "--eval-images", "0", "--out", "{t}/r"], "--eval-images must be at least 1"),
        (["train", "--val-size", "0", "--out", "{t}/r"], "--val-size must be at least 1"),
        (["train", "--val-size", "99999999", "--out", "{t}/r"], "--val-size 99999999 is more than half"),
        (["train", "--epochs", "0", "--out", "{t}/r"], "--epochs must be at least 1"),
        (["train", "--out", "{a}/manifest.json/sub"], "a file is in the way"),
        (["quickstart", "--epochs", "0"], "--epochs must be at least 1"),
        (["quickstart", "--out", "."], "must be a folder of its own"),
        (["export", "{t}/model.pt", "--batch", "0"], "--batch must be within 1..4096"),
    ],
)
def test_out_of_range_numbers_are_refused_with_the_range(artifact_copy, tmp_path, args, match):
    res = cli(*[a.format(a=artifact_copy, t=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert match in res.output


def test_eval_limit_zero_is_refused(tiny_run):
    res = cli("eval", tiny_run[0] / "model.pt", "--images", "0")
    assert res.exit_code == 2 and "--images must be at least 1" in res.output


# -- frames -------------------------------------------------------------------------------------
def test_frames_that_used_to_be_misread(artifact_copy, test_frames, tmp_path):
    from PIL import Image

    c = Cascade.load(artifact_copy, backend="onnxruntime")
    frame = test_frames[0][0]
    with pytest.raises(ValueError, match="one frame\\? wrap it in a list"):
        c.predict_batch(np.repeat(frame, 3, axis=2))  # one HxWx3 frame, not 28 frames
    x = c.preprocessor(frame)
    with pytest.raises(ValueError, match="NaN"):
        c.predict_arrays(np.stack([x, np.full_like(x, np.nan)]))
    with pytest.raises(ValueError, match="must be normalised"):
        c.predict(frame.transpose(2, 0, 1).astype(np.float32))  # 0..255 floats, not normalised
    assert c.predict(x).label == c.predict(frame).label
    # a 16-bit PNG is scaled to 8 bits, not clipped: it classifies like its 8-bit original
    gray = frame[:, :, 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    res = cli("run", artifact_copy, "--source", tmp_path, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert f"deep.png: {c.predict(gray).class_name} " in res.output


# -- leftovers of interrupted runs --------------------------------------------------------------
@pytest.mark.slow
def test_an_interrupted_runs_leftovers_are_cleaned_by_the_next_run(tiny_run, tmp_path):
    from edgeexit.export.exporter import export_checkpoint

    pid = dead_pid()
    dest = tmp_path / "m.edgeexit"
    partial = tmp_path / f".m.edgeexit.{pid}.abc123.partial"
    partial.mkdir()
    (partial / "seg_01.onnx").write_bytes(b"half")
    old = tmp_path / f".m.edgeexit.old-{pid}"
    old.mkdir()
    live = tmp_path / f".m.edgeexit.{os.getpid()}.zzz.partial"  # a live run's folder stays
    live.mkdir()
    export_checkpoint(tiny_run[0] / "model.pt", out=dest, parity_images=16)
    assert not partial.exists() and not old.exists() and live.exists()
    stale = [dest / f".manifest.json.{pid}.x1.tmp", dest / f".calibration.png.{pid}.x2.tmp"]
    for p in stale:
        p.write_bytes(b"")
    from edgeexit.calibrate.run import run_calibration

    # the promise mode: a budget fraction of a tiny model can fall below its cheapest cascade by timing noise
    run_calibration(
        dest, max_drop=0.01, backend="onnxruntime", repeats=30, verify_images=50, iso_accuracy=False, ladder_steps=2
    )
    assert not any(p.exists() for p in stale)
    assert not [p for p in dest.rglob(".*") if p.name.endswith((".tmp", ".partial"))]
    assert (dest / "calibration.png").stat().st_size > 1000


# -- careless training --------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_with_other_settings_names_the_setting(tmp_path):
    from conftest import tiny_config

    from edgeexit.errors import UserError
    from edgeexit.train.trainer import train

    out = tmp_path / "r"
    train(tiny_config(out, epochs=1, train_images=256), progress=False)
    cfg = tiny_config(out, epochs=2, train_images=256, width=0.125, resume=True)
    with pytest.raises(UserError, match="trained with --width 0.0625, not 0.125"):
        train(cfg, progress=False)


def test_a_pickled_checkpoint_is_refused_with_a_whole_sentence(tmp_path):
    import torch

    bad = tmp_path / "model.pt"
    torch.save({"format": "edgeexit-checkpoint", "obj": open}, bad)
    res = cli("eval", bad)
    assert res.exit_code == 2
    assert "refuses it, because unpickling it could run code" in res.output.replace("\n", " ")


# -- a broader sweep: every malformed manifest field and odd argument is exit 2, never a raw exception
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: m["units"][0].pop("kind"), "must have kind 'segment'"),
        (lambda m: m["units"][0].pop("inputs"), "inputs must list"),
        (lambda m: m["units"][2].update(outputs="x"), "outputs must list"),
        (lambda m: m.update(calibration={"thresholds": [0.5]}), "thresholds must be 8 finite numbers"),
        (lambda m: m.update(calibration={"thresholds": ["a"] * 8}), "thresholds must be 8 finite numbers"),
        (lambda m: m.update(calibration={"policy": "magic"}), "policy 'magic'"),
        (lambda m: m.update(calibration={"latency": {"units": {"seg_01": 1}}}), "p95_ms for every unit"),
        (lambda m: m.update(calibration=[1]), "calibration is not an object"),
        (lambda m: m.update(model=None), "model must be an object"),
        (lambda m: m.update(units=5), "units must be a list"),
    ],
)
def test_malformed_manifests_are_exit_2(artifact_copy, change, match):
    edit_manifest(artifact_copy, change)
    res = cli("run", artifact_copy, "--source", artifact_copy, "--backend", "onnxruntime")
    assert res.exit_code == 2 and match in res.output, res.output


def test_a_corrupt_unit_file_is_exit_2(artifact_copy):
    (artifact_copy / "seg_03.onnx").write_bytes(b"garbage")
    res = cli("run", artifact_copy, "--source", artifact_copy, "--backend", "onnxruntime")
    assert res.exit_code == 2 and "cannot be loaded by ONNX Runtime" in res.output


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--device", "tpu", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["run", "{a}", "--source", ""], "--source is empty"),
    ],
)
def test_odd_arguments_are_exit_2(artifact_copy, tmp_path, args, match):
    res = cli(*[a.format(a=artifact_copy, t=tmp_path) for a in args])
    assert res.exit_code == 2 and match in res.output, res.output


def test_calibrating_an_artifact_without_a_recorded_split_says_what_to_do(artifact_copy):
    edit_manifest(artifact_copy, lambda m: (m.pop("split"), m.pop("calibration_frames")))
    res = cli("calibrate", artifact_copy, "--budget", "50%", "--backend", "onnxruntime")
    assert res.exit_code == 2 and "--split test" in res.output


@pytest.mark.parametrize(
    "args,match",
    [
        (["export", "{t}/model.pt", "--int8", "--int8-images", "0"], "--int8-images must be within 16..10000"),
        (["export", "{t}/model.pt", "--int8", "--int8-method", "magic"], "--int8-method must be one of"),
        (["run", "{a}", "--source", "{a}", "--precision", "int4"], "precision must be fp32 or int8"),
        (["run", "{a}", "--source", "{a}", "--budget", "nan"], "cannot read budget"),
        (["run", "{a}", "--source", "{a}", "--budget", "-2ms"], "cannot read budget"),
        (["train", "--stem", "resnet", "--out", "{t}/r"], "--stem must be cifar or imagenet"),
        (["train", "--data", "{t}", "--image-size", "5", "--out", "{t}/r"], "--image-size must be within 8..1024"),
        (["train", "--init", "{t}/absent.pth", "--out", "{t}/r"], "hub/checkpoints"),
        (["calibrate", "{a}", "--max-drop", "1.5"], "--max-drop must be within 0pt..100pt"),
        (["calibrate", "{a}", "--max-drop", "0.5pt", "--confidence", "0.2"], "--confidence must be within"),
    ],
)
def test_options_of_this_round_refuse_absurd_values(artifact_copy, tmp_path, args, match):
    res = cli(*[a.format(a=artifact_copy, t=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert match in res.output
