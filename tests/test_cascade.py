"""The cascade with input it must not misread or outlive: dtypes and ranges of frames (the
Preprocessor's rules), `budget_ms` typing, a calibration never written into an artifact replaced
meanwhile (the content id), the lifetime derived views share with their parent, and bounded memory
(chunked predict_arrays, bench's batch bound).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import cli, edit_manifest
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.errors import ArtifactError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.cascade import CascadeClosedError
from edgeexit.runtime.manifest import write_calibration


# -- silent wrong results ----------------------------------------------------------------------------
def test_predict_batch_takes_the_dtypes_predict_takes(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    x = np.stack([c.preprocessor(f) for f in test_frames[0][:4]])
    for dtype in (np.int32, np.bool_, np.int64):
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.predict(x[0].astype(dtype))
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.predict_batch(x.astype(dtype))
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.predict_arrays(x.astype(dtype))


def manifest_reads(monkeypatch) -> list[str]:
    """Records, from here on, every read of a manifest.json and every typed build of one."""
    from pathlib import Path

    from edgeexit.runtime import artifact

    calls: list[str] = []
    read_text, build = Path.read_text, artifact._build

    def counted_read(self, *a, **kw):
        if self.name == "manifest.json":
            calls.append("read")
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", counted_read)
    monkeypatch.setattr(artifact, "_build", lambda folder, m: calls.append("build") or build(folder, m))
    return calls


@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "torch"])
def test_a_load_reads_and_checks_the_manifest_once_on_every_backend(artifact_copy, backend, monkeypatch):
    calls = manifest_reads(monkeypatch)
    with Cascade.load(artifact_copy, backend=backend) as c:
        assert c.artifact.num_exits == 8
    assert calls == ["read", "build"]


def test_one_out_of_range_value_in_a_normalised_frame_is_refused(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    x = c.preprocessor(test_frames[0][0]).copy()
    assert c.predict(x).label == c.predict(test_frames[0][0]).label
    x[0, 3, 3] = 50.0
    for call in (c.predict, lambda v: c.predict_batch([v]), lambda v: c.predict_arrays(v[None])):
        with pytest.raises(ValueError, match="must be normalised"):
            call(x)


def _with_ladder(artifact):
    edit_manifest(
        artifact,
        lambda m: m.update(
            calibration={
                "thresholds": [0.9] * 7 + [0.0],
                "ladder": [
                    {"thresholds": [2.0] * 7 + [0.0], "predicted_ms": 2.0, "predicted_accuracy": 0.8},
                    {"thresholds": [0.9] * 7 + [0.0], "predicted_ms": 1.0, "predicted_accuracy": 0.7},
                ],
            }
        ),
    )


def test_budget_ms_refuses_bools_and_takes_numpy_numbers(artifact_copy):
    _with_ladder(artifact_copy)
    for bad in (True, False, np.bool_(True), "5", float("nan")):
        with pytest.raises(ValueError, match="budget_ms must be a positive number"):
            Cascade.load(artifact_copy, backend="onnxruntime", budget_ms=bad)
    for good in (np.float32(5.0), np.int64(5), 5, 5.0):
        c = Cascade.load(artifact_copy, backend="onnxruntime", budget_ms=good)
        assert c.controller.budget_ms == 5.0


@pytest.mark.slow
def test_calibration_is_not_written_into_an_artifact_replaced_meanwhile(artifact_copy, tiny_run):
    """A calibrate finishing after `export --force` replaced its artifact writes nothing."""
    from edgeexit.export.exporter import export_checkpoint

    art = Artifact.load(artifact_copy)  # what calibrate holds while it works
    export_checkpoint(tiny_run[0] / "model.pt", out=artifact_copy, force=True, parity_images=16, calib_images=0)
    fresh = (artifact_copy / "manifest.json").read_text()
    with pytest.raises(ArtifactError, match="replaced by another export"):
        write_calibration(art, {"thresholds": [0.5] * 8})
    assert (artifact_copy / "manifest.json").read_text() == fresh
    write_calibration(Artifact.load(artifact_copy), {"thresholds": [0.5] * 8})  # the same export, read again
    assert Artifact.load(artifact_copy).calibration.thresholds == (0.5,) * 8


# -- closing and concurrency -------------------------------------------------------------------------
def test_every_call_after_close_is_cascade_closed_error(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    view = c.derive([0.5] * 8)
    x = c.preprocessor(test_frames[0][0])
    c.close()
    for target in (c, view):
        for call in (
            lambda t: t.predict(test_frames[0][0]),
            lambda t: t.predict_batch([test_frames[0][0]]),
            lambda t: t.predict_arrays(x[None]),
            lambda t: t.exit_statistics(x[None]),
            lambda t: t.set_thresholds([0.5] * 8),
            lambda t: t.derive([0.4] * 8),
            lambda t: t.profile(x, repeats=1, min_seconds=0),
        ):
            with pytest.raises(CascadeClosedError):
                call(target)
    assert view.closed and c.closed


def test_a_view_predicting_while_its_parent_closes(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    view = c.derive([2.0] * 7 + [0.0], fuse=False)
    frames = test_frames[0][:64]
    errors, started = [], threading.Event()

    def loop():
        try:
            while True:
                started.set()
                view.predict_batch(list(frames))
                view.predict(frames[0])
        except Exception as e:  # noqa: BLE001 - the type is the point
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    started.wait(10)
    c.close()
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], CascadeClosedError), errors


@pytest.mark.slow
def test_calibrate_while_run_loops_on_the_same_artifact(artifact_copy, test_frames):
    from edgeexit.calibrate.run import run_calibration

    c = Cascade.load(artifact_copy, backend="onnxruntime")
    stop, errors, count = threading.Event(), [], [0]

    def loop():
        try:
            while not stop.is_set():
                c.predict(test_frames[0][count[0] % 100])
                count[0] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        # the promise mode: no budget that timing noise under the running loop could make infeasible
        run_calibration(
            artifact_copy, max_drop=0.01, backend="onnxruntime", repeats=5, verify_images=40, images=40, ladder_steps=2
        )
    finally:
        stop.set()
        t.join(30)
    assert not errors and count[0] > 0
    assert Cascade.load(artifact_copy, backend="onnxruntime").artifact.calibration.thresholds


# -- unbounded memory --------------------------------------------------------------------------------
def test_predict_arrays_runs_in_chunks(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=[2.0] * 7 + [0.0], fuse=False)
    x = np.stack([c.preprocessor(f) for f in test_frames[0][:600]]).astype(np.float64)
    sizes = []
    original = c.runner.from_host
    c.runner.from_host = lambda a: (sizes.append(len(a)), original(a))[1]
    out = c.predict_arrays(x)
    assert max(sizes) <= Cascade.CHUNK and sum(sizes) == 600
    labels = [p.label for p in c.predict_batch(list(test_frames[0][:600]))]
    assert out["label"].tolist() == labels


def test_bench_batch_is_bounded_by_every_units_outputs(artifact_copy):
    from edgeexit.bench import _memory_batch_limit

    c = Cascade.load(artifact_copy, backend="onnxruntime")
    limit = _memory_batch_limit(c)
    every_output = sum(int(np.prod(o.shape[1:])) for u in c.artifact.units for o in u.outputs)
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert limit * every_output * 4 * 4 <= avail / 4 * 1.2
    res = cli("bench", artifact_copy, "--backend", "onnxruntime", "--batch", str(limit * 2))
    assert res.exit_code == 2 and "--batch must be within 1.." in res.output


def _poison_head(artifact, exit_index: int, value: float) -> None:
    """Every weight of one exit's head set to ``value`` (NaN or infinity), as an overflowing FP16
    engine or a diverged checkpoint would leave it."""
    import onnx
    from onnx import numpy_helper

    path = artifact / f"head_{exit_index:02d}.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(np.full_like(arr, value), init.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_answer_is_an_error_never_a_class(artifact_copy, test_frames, tmp_path, value):
    from PIL import Image

    from edgeexit.runtime.cascade import NonFiniteOutputError

    frames, _ = test_frames
    _poison_head(artifact_copy, 8, value)
    with Cascade.load(artifact_copy, backend="onnxruntime") as cascade:  # no thresholds: exit 8 answers
        with pytest.raises(NonFiniteOutputError, match="exit 8 answered this frame with a non-finite"):
            cascade.predict(frames[0])
        with pytest.raises(NonFiniteOutputError, match=r"exit 8 answered 3 frame\(s\) of the batch"):
            cascade.predict_batch(frames[:3])
        # calibration's exit statistics refuse it too, naming the exit and how many frames
        x = np.stack([cascade.preprocessor(f) for f in frames[:5]])
        with pytest.raises(NonFiniteOutputError, match=r"exit 8 answered 5 frame\(s\) of 5 images"):
            cascade.exit_statistics(x)
        # the earlier exits are intact: a plan that answers at exit 2 still classifies
        cascade.set_thresholds([0.0] + [1.0] * 7)
        assert cascade.predict(frames[0]).exit_index == 1
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(frames[0][:, :, 0]).save(folder / "a.png")
    res = CliRunner().invoke(app, ["run", str(artifact_copy), "--source", str(folder), "--backend", "onnxruntime"])
    assert res.exit_code == 2, res.output
    assert "non-finite confidence" in res.output and "Traceback" not in res.output
    # calibration decides on every exit's confidence: a poisoned exit is refused, not skipped
    res = CliRunner().invoke(
        app, ["calibrate", str(artifact_copy), "--budget", "50%", "--backend", "onnxruntime", "--images", "40",
              "--verify-images", "40", "--repeats", "4", "--accept-load"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "exit 8 answered" in res.output and "non-finite" in res.output and "Traceback" not in res.output
    assert Artifact.load(artifact_copy).calibration is None  # nothing written


def test_cached_exit_statistics_are_per_precision_and_checked_like_fresh_ones(artifact_copy, test_frames):
    """calibrate keeps each artifact's exit statistics in a cache file: another precision's units get
    another file (FP16/INT8 confidences are not FP32's), and a cached NaN is refused as a fresh one is."""
    from dataclasses import replace
    from types import SimpleNamespace

    from edgeexit.calibrate.options import CalibrationOptions
    from edgeexit.calibrate.run import _stats_cached, stats_key
    from edgeexit.runtime.cascade import NonFiniteOutputError

    opts = CalibrationOptions(budget_fraction=0.5)
    with Cascade.load(artifact_copy, backend="onnxruntime") as fp32:
        key = stats_key(fp32, opts, "fashion-mnist", 100, 100)
        int8 = SimpleNamespace(runner=SimpleNamespace(info=replace(fp32.runner.info, precision="int8")),
                               artifact=fp32.artifact)  # fmt: skip
        assert stats_key(int8, opts, "fashion-mnist", 100, 100) != key
        assert stats_key(fp32, opts, "fashion-mnist", 100, 100) == key
        x = np.stack([fp32.preprocessor(f) for f in test_frames[0][:6]])
        fresh = _stats_cached(fp32, artifact_copy, key, x)
        assert fresh["confidence"].shape == (6, 8) and np.isfinite(fresh["confidence"]).all()
        again = _stats_cached(fp32, artifact_copy, key, x)
        assert np.array_equal(again["confidence"], fresh["confidence"])
        poisoned = fresh["confidence"].copy()
        poisoned[2:4, 3] = np.nan
        np.savez_compressed(artifact_copy / f"calibration_stats.{key}.npz", confidence=poisoned,
                            prediction=fresh["prediction"])  # fmt: skip
        with pytest.raises(NonFiniteOutputError, match=r"exit 4 answered 2 frame\(s\) of 6 images"):
            _stats_cached(fp32, artifact_copy, key, x)
        # a file for other frames (another count) is recomputed, not trusted
        np.savez_compressed(artifact_copy / f"calibration_stats.{key}.npz", confidence=poisoned[:5],
                            prediction=fresh["prediction"][:5])  # fmt: skip
        assert np.array_equal(_stats_cached(fp32, artifact_copy, key, x)["confidence"], fresh["confidence"])
