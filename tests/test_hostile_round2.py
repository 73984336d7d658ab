"""Hostile input, round 2 (issue 29): each class of failure fixed once, at its root. Per class: a
test per example of the issue, and one sweep showing that the mechanism covers the class.

Mechanisms: markup off on stdout + `util.esc` on stderr (1); `util.check_output_path` in
`atomic_write` and before every command's work (2); `runtime.artifact.Artifact.load` (4); the
Preprocessor's dtype/range rules, `budget_ms` typing, the content id in `write_manifest` (5); the
lifetime shared by derived views (6); chunked predict_arrays, bench's batch bound, frames.npz member
sizes (7); CLI checks before the work (8); stale temporary files removed by `atomic_write` (9).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.errors import ArtifactError, UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.cascade import CascadeClosedError
from edgeexit.runtime.manifest import load_calibration_frames, load_manifest, write_manifest

runner = CliRunner()


def cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


from test_hostile import dead_pid, edit_manifest  # noqa: E402  (the first round's helpers, shared)


def device_node(path):
    """A character device like /dev/null (root can make one), else a FIFO: both are not regular."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return path


def one_line(res) -> str:
    return " ".join(res.output.split())


# == 1. rich markup ==============================================================================
@pytest.mark.parametrize("budget", ["[/]", "[bold]5ms", "5ms\\"])
def test_a_budget_that_is_markup_prints_as_given(artifact_copy, budget):
    res = cli("calibrate", artifact_copy, "--budget", budget, "--backend", "onnxruntime")
    assert res.exit_code == 2 and f"'{budget}'" in res.output


def test_an_out_path_with_markup_is_named_as_given(tiny_run, tmp_path):
    res = cli("export", tiny_run[0] / "absent[/]x.pt", "--out", tmp_path / "m[/].edgeexit")
    assert res.exit_code == 2 and "absent[/]x.pt" in res.output


def test_an_export_into_a_markup_folder_runs_and_names_it_as_given(tiny_run, tmp_path):
    out = tmp_path / "m[/].edgeexit"  # folders "m[" and "].edgeexit"
    res = cli("export", tiny_run[0] / "model.pt", "--out", out, "--parity-samples", "16", "--calib-images", "0")
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").is_file() and f"exported {out}" in res.output.replace("\n", "")


def test_an_artifact_under_a_markup_folder(artifact_copy, tmp_path):
    odd = tmp_path / "a[/]b"  # folders "a[" and "]b"
    odd.mkdir(parents=True)
    shutil.copytree(artifact_copy, odd / "m.edgeexit")
    res = cli("info", odd / "m.edgeexit")
    assert res.exit_code == 0 and "a[/]b" in res.output
    res = cli("run", odd / "absent.edgeexit", "--source", odd)
    assert res.exit_code == 2 and "a[/]b" in res.output


def test_class_names_and_file_names_print_as_given(artifact_copy, test_frames, tmp_path):
    from PIL import Image

    names = ["[/]", "[bold red]Coat", *[f"[link=http://x]c{i}" for i in range(8)]]
    edit_manifest(artifact_copy, lambda m: m.update(class_names=names))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(test_frames[0][i][:, :, 0]).save(folder / f"[red]x{i:02d}.png")
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    res = cli("run", artifact_copy, "--source", folder)
    assert res.exit_code == 0, res.output
    for i in range(12):
        assert f"[red]x{i:02d}.png: {c.predict(test_frames[0][i]).class_name} " in res.output


def test_the_markup_mechanism_covers_every_foreign_string():
    """stdout has markup off; anything put into a stderr message goes through util.esc."""
    from rich.console import Console

    from edgeexit.cli import console, out_console
    from edgeexit.util import esc

    assert out_console._markup is False and console._markup is True
    hostile = ["[/]", "[bold]x", "[red]x.png", "[link=file:///etc/passwd]a[/link]", "\\[x]", "a\\[b]", "[[/]]"]
    for s in hostile:
        rec = Console(record=True, width=400)
        rec.print(f"[bold red]error:[/] {esc(s)} [dim](1s)[/]")
        assert rec.export_text().strip() == f"error: {s} (1s)"
        plain = Console(record=True, width=400, markup=False)
        plain.print(s)
        assert plain.export_text().strip() == s


# == 2. writes that follow whatever is at the path ===============================================
def _json_commands(artifact, run, tmp_path):
    return {
        "train": ["train", "--out", tmp_path / "r"],
        "eval": ["eval", run / "model.pt"],
        "export": ["export", run / "model.pt", "--out", tmp_path / "e.edgeexit"],
        "calibrate": ["calibrate", artifact, "--budget", "50%", "--backend", "onnxruntime"],
        "run": ["run", artifact, "--source", artifact, "--backend", "onnxruntime"],
        "bench": ["bench", artifact, "--backend", "onnxruntime"],
        "info": ["info", artifact],
    }


@pytest.mark.parametrize("target", ["folder", "device"])
@pytest.mark.parametrize("command", ["train", "eval", "export", "calibrate", "run", "bench", "info"])
def test_every_commands_json_onto_a_folder_or_a_device_is_refused(artifact_copy, tiny_run, tmp_path, command, target):
    """The mechanism covers the class: every command, --json onto a folder and a device node."""
    path = tmp_path / "t"
    path.mkdir() if target == "folder" else device_node(path)
    before = os.stat(path)
    res = cli(*_json_commands(artifact_copy, tiny_run[0], tmp_path)[command], "--json", path)
    assert res.exit_code == 2, res.output
    assert "--json" in res.output and (
        "is a folder" in res.output or "is a device" in one_line(res) or "FIFO" in res.output
    )
    after = os.stat(path)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    if target == "folder":
        assert list(path.iterdir()) == []
    assert not (tmp_path / "r").exists() and not (tmp_path / "e.edgeexit").exists()  # no work done


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_plot_onto_a_folder_or_device(artifact_copy, tiny_run, tmp_path, command):
    args = _json_commands(artifact_copy, tiny_run[0], tmp_path)[command]
    for path in (tmp_path / "d", device_node(tmp_path / "n")):
        if not path.exists():
            path.mkdir()
        res = cli(*args, "--plot", path)
        assert res.exit_code == 2 and "--plot" in res.output, res.output


def test_run_save_video_onto_a_device(artifact_copy, tmp_path):
    res = cli("run", artifact_copy, "--source", artifact_copy, "--save-video", device_node(tmp_path / "v.mp4"))
    assert res.exit_code == 2 and "--save-video" in res.output


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    from edgeexit.util import atomic_write_text

    folder = tmp_path / "d"
    folder.mkdir()
    node = device_node(tmp_path / "n")
    os.symlink(node, tmp_path / "link")
    for target in (folder, node, tmp_path / "link"):
        with pytest.raises(UserError, match="nothing was written"):
            atomic_write_text(target, "x")
    assert stat.S_ISCHR(os.stat(node).st_mode) or stat.S_ISFIFO(os.stat(node).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_quickstart_refuses_an_existing_run_without_force(tiny_run, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    shutil.copy(tiny_run[0] / "model.pt", out / "model.pt")
    before = (out / "model.pt").read_bytes()
    res = cli("quickstart", "--out", out)
    assert res.exit_code == 2 and "--force" in res.output
    assert (out / "model.pt").read_bytes() == before


# == 4. malformed artifacts: one validated parse ================================================
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
        load_manifest(artifact_copy)
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
        load_calibration_frames(load_manifest(artifact_copy))


def test_a_pickled_frames_member_is_refused(artifact_copy):
    buf = io.BytesIO()
    objs = np.array([{"a": 1}] * 4, dtype=object)
    np.savez(buf, frames=objs, labels=np.zeros(4, np.int64), calibration=np.arange(2), verification=np.arange(2, 4))
    _rewrite_frames(artifact_copy, buf.getvalue())
    with pytest.raises(ArtifactError, match="not a calibration-frames file"):
        load_calibration_frames(load_manifest(artifact_copy))


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
        load_calibration_frames(load_manifest(artifact_copy))
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


# == 5. silent wrong results =====================================================================
def test_predict_batch_takes_the_dtypes_predict_takes(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    x = np.stack([c.preprocess(f) for f in test_frames[0][:4]])
    for dtype in (np.int32, np.bool_, np.int64):
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.predict(x[0].astype(dtype))
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.predict_batch(x.astype(dtype))
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.predict_arrays(x.astype(dtype))


def test_one_out_of_range_value_in_a_normalised_frame_is_refused(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    x = c.preprocess(test_frames[0][0]).copy()
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


def test_calibration_is_not_written_into_an_artifact_replaced_meanwhile(artifact_copy, tiny_run):
    """A calibrate finishing after `export --force` replaced its artifact writes nothing."""
    from edgeexit.export.exporter import export_checkpoint

    manifest = load_manifest(artifact_copy)  # what calibrate holds while it works
    export_checkpoint(tiny_run[0] / "model.pt", out=artifact_copy, force=True, parity_samples=16, calib_images=0)
    fresh = (artifact_copy / "manifest.json").read_text()
    manifest["calibration"] = {"thresholds": [0.5] * 8}
    with pytest.raises(ArtifactError, match="replaced by another export"):
        write_manifest(artifact_copy, manifest)
    assert (artifact_copy / "manifest.json").read_text() == fresh
    again = load_manifest(artifact_copy)  # the same export, read again: writes
    again["calibration"] = None
    write_manifest(artifact_copy, again)


# == 6. closing and concurrency ==================================================================
def test_every_call_after_close_is_cascade_closed_error(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    view = c.derive([0.5] * 8)
    x = c.preprocess(test_frames[0][0])
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
            artifact_copy, max_drop=0.01, backend="onnxruntime", repeats=5, verify_limit=40, limit=40, ladder_steps=2
        )
    finally:
        stop.set()
        t.join(30)
    assert not errors and count[0] > 0
    assert Cascade.load(artifact_copy, backend="onnxruntime").manifest["calibration"]["thresholds"]


# == 7. unbounded memory =========================================================================
def test_predict_arrays_runs_in_chunks(artifact_copy, test_frames):
    c = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=[2.0] * 7 + [0.0], fuse=False)
    x = np.stack([c.preprocess(f) for f in test_frames[0][:600]]).astype(np.float64)
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
    every_output = sum(int(np.prod(o["shape"][1:])) for u in c.manifest["units"] for o in u["outputs"])
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert limit * every_output * 4 * 4 <= avail / 4 * 1.2
    res = cli("bench", artifact_copy, "--backend", "onnxruntime", "--batch", str(limit * 2))
    assert res.exit_code == 2 and "--batch must be within 1.." in res.output


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
        load_calibration_frames(load_manifest(artifact_copy))


def test_a_fifo_as_frames_is_refused_without_blocking(artifact_copy):
    frames = artifact_copy / "calibration" / "frames.npz"
    frames.unlink()
    os.mkfifo(frames)
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked on a FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(ArtifactError, match="FIFO"):
            load_calibration_frames(load_manifest(artifact_copy))
    finally:
        signal.alarm(0)


# == 8. exit 2 with the input named, before the work =============================================
@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--width", "1000", "--out", "{t}/r"], "--width 1000 needs about"),
        (["train", "--device", "mps", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--device", "meta", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--device", "cpu:5", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--out", "/dev/null"], "a file is in the way"),
        (["eval", "{t}/model.pt", "--device", "meta"], "--device must be"),
    ],
)
def test_user_mistakes_are_found_before_the_work(tmp_path, args, match):
    res = cli(*[a.format(t=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert match in one_line(res)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_found_before_an_epoch(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    res = cli("train", "--out", out / "r")
    assert res.exit_code == 2 and "not writable" in res.output


def test_a_deadline_on_an_artifact_not_calibrated_on_this_backend(artifact_copy, test_frames, tmp_path):
    from PIL import Image

    Image.fromarray(test_frames[0][0][:, :, 0]).save(tmp_path / "a.png")
    res = cli("run", artifact_copy, "--source", tmp_path, "--deadline-ms", "5", "--backend", "onnxruntime")
    assert res.exit_code == 2 and "calibrate the artifact on this backend" in one_line(res)


# == 9. leftovers after kill -9 ==================================================================
def test_the_next_write_removes_a_killed_writers_temporary_files(tmp_path):
    from edgeexit.util import atomic_write_text

    pid = dead_pid()
    stale = [tmp_path / f".model.pt.{pid}.ab12cd.tmp", tmp_path / f".eval.json.{pid}.x.tmp"]
    live = tmp_path / f".model.pt.{os.getpid()}.zz.tmp"  # a live writer's file stays
    other = tmp_path / f".other.json.{pid}.x.tmp"  # another name: its own next write cleans it
    for p in (*stale, live, other):
        p.write_text("half")
    atomic_write_text(tmp_path / "model.pt", "x")
    atomic_write_text(tmp_path / "eval.json", "x")
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()


def test_a_cli_json_write_cleans_its_leftovers(artifact_copy, tmp_path):
    """The mechanism covers the class: every file is written by atomic_write (checkpoints, plots,
    stats, manifests, --json), which removes its dead writers' temporaries."""
    pid = dead_pid()
    stale = tmp_path / f".info.json.{pid}.q1.tmp"
    stale.write_text("{")
    res = cli("info", artifact_copy, "--json", tmp_path / "info.json")
    assert res.exit_code == 0 and not stale.exists()
    assert "_folder" not in json.loads((tmp_path / "info.json").read_text())


# --- class 8, the last examples: --source digits that are not a camera index, a damaged --init ----------


@pytest.mark.parametrize("source", ["²", "٣", "99999999999999999999", "1024"])
def test_source_that_is_not_a_camera_index_is_one_line_exit_2(artifact_copy, source):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    res = CliRunner().invoke(app, ["run", str(artifact_copy), "--source", source])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "Traceback" not in res.output and last.startswith("error:") and source in res.output


def test_camera_index_reads_ascii_digits_only():
    from edgeexit.errors import UserError
    from edgeexit.runtime.sources import camera_index

    assert camera_index("0") == 0 and camera_index("12") == 12
    assert camera_index("²") is None and camera_index("clip.mp4") is None and camera_index("rtsp://h/x") is None
    with pytest.raises(UserError, match="0..1023"):
        camera_index("99999999999999999999")


def test_a_nan_init_file_is_named_not_blamed_on_the_learning_rate(tmp_path):
    import torch

    from edgeexit.errors import UserError
    from edgeexit.models.pretrained import load_init_file

    sd = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.tensor([0.0, float("nan")])}
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match="NaN or infinite.*fc.bias.*not the learning rate"):
        load_init_file(path)
    sd["fc.bias"] = torch.zeros(2)
    torch.save(sd, path)
    assert set(load_init_file(path)) == {"conv1.weight", "fc.bias"}
