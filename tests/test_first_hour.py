"""A new user's first hour, on the tiny real artifact: a budget without a unit, a budget above the full
model, recalibration and --restore, `info` in calibrate's words, one speed-up figure per plan, a camera
that never opens, per-frame JSON lines, doctor's camera list, --help text and progress in a log file."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.runtime.artifact import Artifact


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def words(text: str) -> str:
    """The output with rich's line wrapping undone (tables and long lines wrap at the runner's width)."""
    return " ".join(text.split())


CALIBRATE = ("--backend", "onnxruntime", "--repeats", "30", "--verify-images", "100")


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, tmp_path_factory):
    """The tiny artifact calibrated once by the CLI at 150 % of the full model (the JSON kept)."""
    dest = tmp_path_factory.mktemp("first_hour") / "model.edgeexit"
    shutil.copytree(tiny_artifact, dest)
    out = dest.parent / "first.json"
    res = cli("calibrate", dest, "--budget", "150%", *CALIBRATE, "--json", out)
    assert res.exit_code == 0, res.output
    return dest, json.loads(out.read_text()), res.output


@pytest.mark.parametrize("command", ["calibrate", "run", "quickstart"])
def test_a_budget_without_a_unit_is_refused_naming_both_readings(command, tiny_artifact, tmp_path):
    args = {"calibrate": ["calibrate", tiny_artifact], "run": ["run", tiny_artifact, "--source", tmp_path],
            "quickstart": ["quickstart", "--out", tmp_path / "q"]}[command]  # fmt: skip
    res = cli(*args, "--budget", "5")
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "5ms" in errors[0] and "5%" in errors[0] and "no unit" in errors[0], res.output
    assert "Traceback" not in res.output
    if command == "calibrate":
        assert Artifact.load(tiny_artifact).to_json()["calibration"] is None  # nothing was measured or written


@pytest.mark.slow  # a real calibration of the tiny artifact (about 50 s on the loaded 2-core VM)
def test_calibrate_speaks_one_speed_up_per_plan_without_jargon(calibrated):
    _, result, output = calibrated
    text = words(output)
    full, meas = result["full_model"]["measured"], result["measured"]
    figure = f"runs {full['mean_ms'] / meas['mean_ms']:.2f}× as fast"
    assert figure in text
    # the ratios that used to describe the same plan three ways, and the unexplained terms, are gone
    for gone in ("× the full model", "out of fold", "fixed-sequence", " z "):
        assert gone not in text, gone
    assert not re.search(r"speed-up \d", text)
    assert "the most accurate on frames its thresholds were not fitted on" in text
    assert "150% of the full model" in text  # the goal the plan was chosen for, in the table's title
    # the JSON keys stay as they were
    assert {"budget_ms", "thresholds", "full_model", "measured", "cross_fit"} <= set(result)


@pytest.mark.slow  # a real calibration of the tiny artifact (about 50 s on the loaded 2-core VM)
def test_info_prints_thresholds_and_the_goal_as_calibrate_does(calibrated):
    dest, result, _ = calibrated
    res = cli("info", dest)
    assert res.exit_code == 0, res.output
    text = words(res.output)
    n = len(result["thresholds"])
    for k, th in enumerate(result["thresholds"], 1):
        word = "accept all" if k == n else ("skip" if th > 1 else f"{th:.4f}")
        assert f"exit {k} {word}" in text
    assert "[0." not in text and "2.0," not in text  # no raw list with 2.0 standing for "skip"
    assert f"budget {result['budget_ms']:.3f} ms (mean per image, 150% of the full model)" in text
    full, meas = result["full_model"]["measured"], result["measured"]
    assert f"{full['mean_ms'] / meas['mean_ms']:.2f}× as fast as the full model" in text


@pytest.mark.slow  # a real calibration of the tiny artifact (about 50 s on the loaded 2-core VM)
def test_a_budget_above_the_full_model_is_said_loudly(artifact_copy):
    res = cli("calibrate", artifact_copy, "--budget", "1000ms", *CALIBRATE)
    assert res.exit_code == 0, res.output
    text = words(res.output)
    full_ms = Artifact.load(artifact_copy).to_json()["calibration"]["full_model"]["predicted_ms"]
    assert f"warning: the budget 1000.000 ms is above the full model's {full_ms:.3f} ms" in text
    assert "limits nothing" in text and "no speed-up" in text and "--budget 60%" in text


@pytest.mark.slow  # a real calibration of the tiny artifact (about 50 s on the loaded 2-core VM)
def test_recalibration_says_what_it_replaces_and_restore_puts_it_back(calibrated, tmp_path):
    first_dir, first, _ = calibrated
    dest = tmp_path / "model.edgeexit"
    shutil.copytree(first_dir, dest)
    before = Artifact.load(dest).to_json()["calibration"]
    res = cli("calibrate", dest, "--max-drop", "5pt", *CALIBRATE)
    assert res.exit_code == 0, res.output
    text = words(res.output)
    old_words = ", ".join(
        "accept all" if k == len(first["thresholds"]) - 1 else ("skip" if th > 1 else f"{th:.4f}")
        for k, th in enumerate(first["thresholds"])
    )
    assert "replaced the earlier calibration" in text
    goal = f"budget {first['budget_ms']:.3f} ms (mean per image, 150% of the full model)"
    assert f"{goal}; thresholds {old_words}" in text
    assert "--restore" in text and "fixed-sequence" not in text and "× the full model" not in text
    assert "promise (--max-drop 5.00 pt at 95%)" in text and "95% confidence" in text
    second = Artifact.load(dest).to_json()["calibration"]
    assert second["max_drop"]["max_drop"] == pytest.approx(0.05)
    saved = json.loads((dest / "calibration.previous.json").read_text())
    assert saved["calibration"] == before
    # --restore swaps them: the first calibration is back, the second kept for another --restore
    res = cli("calibrate", dest, "--restore")
    assert res.exit_code == 0, res.output
    assert "restored: calibrated" in words(res.output) and "--max-drop 5.00 pt" in words(res.output)
    assert Artifact.load(dest).to_json()["calibration"] == before
    assert json.loads((dest / "calibration.previous.json").read_text())["calibration"] == second
    assert "an earlier calibration is kept" in words(cli("info", dest).output)
    res = cli("calibrate", dest, "--restore", "--budget", "5ms")
    assert res.exit_code == 2 and "without --budget" in res.output


def test_restore_without_an_earlier_calibration_is_exit_2(artifact_copy):
    res = cli("calibrate", artifact_copy, "--restore")
    assert res.exit_code == 2 and "no earlier calibration" in words(res.output)
    assert not re.search(r"Traceback", res.output)


# --- run: a camera that never opens, per-frame JSON lines, preprocessing broken out ---------------------


@pytest.mark.slow  # `edgeexit run` waits out the real open backoff, about 4 s a case
@pytest.mark.parametrize("source", ["0", "7", "http://127.0.0.1:9/none.mjpg"])
def test_a_camera_or_url_that_never_opens_ends_the_run_with_exit_2(tiny_artifact, source):
    import time

    pytest.importorskip("cv2")
    from pathlib import Path

    if source.isdigit() and Path(f"/dev/video{source}").exists():
        pytest.skip(f"this machine has a camera at index {source}")
    t0 = time.perf_counter()
    res = cli("run", tiny_artifact, "--source", source, "--backend", "onnxruntime", "--max-frames", "5")
    took = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    text = words(res.output)
    assert "did not open (5 tries in" in text and "no frames read" in text
    if source.isdigit():
        assert f"camera {source} did not open" in text and "edgeexit doctor" in text
    assert "Traceback" not in res.output
    assert took < 60  # five tries, 0.25 s doubling between them (and at most 5 s each to open a URL)


def _image_folder(root, frames, n):
    """``n`` real test images written as PNG and JPEG files (what a user points --source at)."""
    from PIL import Image

    root.mkdir()
    for i in range(n):
        Image.fromarray(frames[i][:, :, 0]).save(root / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_run_jsonl_writes_one_line_per_frame_with_preprocess_and_cascade_times(tiny_artifact, test_frames, tmp_path):
    import numpy as np
    from PIL import Image

    from edgeexit.runtime import Cascade

    folder = _image_folder(tmp_path / "imgs", test_frames[0], 12)
    lines_path, summary_path = tmp_path / "frames.jsonl", tmp_path / "summary.json"
    res = cli("run", tiny_artifact, "--source", folder, "--backend", "onnxruntime", "--quiet", "--jsonl", lines_path,
              "--json", summary_path)  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in lines_path.read_text().splitlines()]
    assert len(rows) == 12 and [r["frame"] for r in rows] == list(range(12))
    keys = {"source", "frame", "class", "label", "confidence", "exit", "preprocess_ms", "cascade_ms", "total_ms"}
    assert all(keys <= set(r) for r in rows)
    # the same answers as the library on the same decoded files
    cascade = Cascade.load(tiny_artifact, backend="onnxruntime").derive(input_order="RGB")
    files = sorted(folder.iterdir())
    for r, f in zip(rows, files, strict=True):
        p = cascade.predict(np.asarray(Image.open(f)))
        assert (r["label"], r["exit"], r["class"]) == (p.label, p.exit_index, p.class_name)
        assert r["confidence"] == pytest.approx(p.confidence, abs=1e-5)
        assert r["preprocess_ms"] > 0 and r["cascade_ms"] > 0
        assert r["total_ms"] == pytest.approx(r["preprocess_ms"] + r["cascade_ms"], abs=2e-4)
    summary = json.loads(summary_path.read_text())
    assert summary["preprocess_ms"]["mean"] == pytest.approx(np.mean([r["preprocess_ms"] for r in rows]), rel=1e-3)
    assert summary["latency_ms"]["mean"] == pytest.approx(np.mean([r["cascade_ms"] for r in rows]), rel=1e-3)
    assert summary["total_ms"]["mean"] == pytest.approx(np.mean([r["total_ms"] for r in rows]), rel=1e-3)
    assert "preprocessing mean" in words(res.output) and "frame in to answer out mean" in words(res.output)


def test_run_jsonl_over_several_streams_and_their_preprocessing(tiny_artifact, test_frames, tmp_path):
    import numpy as np

    a = _image_folder(tmp_path / "a", test_frames[0], 6)
    b = _image_folder(tmp_path / "b", test_frames[0][6:], 4)
    lines_path, summary_path = tmp_path / "frames.jsonl", tmp_path / "summary.json"
    res = cli("run", tiny_artifact, "--source", a, "--source", b, "--backend", "onnxruntime", "--quiet",
              "--jsonl", lines_path, "--json", summary_path)  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in lines_path.read_text().splitlines()]
    assert sorted((r["source"], r["frame"]) for r in rows) == sorted(
        [(str(a), i) for i in range(6)] + [(str(b), i) for i in range(4)]
    )
    # batched: each frame's own preprocessing is measured (the batch itself gets tensors)
    assert all(r["preprocess_ms"] > 0 and r["cascade_ms"] > 0 and "capture_to_result_ms" in r for r in rows)
    summary = json.loads(summary_path.read_text())
    for stream in summary["streams"]:
        mine = [r["preprocess_ms"] for r in rows if r["source"] == stream["source"]]
        assert stream["preprocess_ms"]["mean"] == pytest.approx(np.mean(mine), rel=1e-3)
        assert stream["total_ms"]["mean"] > stream["inference_latency_ms"]["mean"]
    assert summary["preprocess_ms"]["mean"] == pytest.approx(np.mean([r["preprocess_ms"] for r in rows]), rel=1e-3)


def test_jsonl_lines_are_on_disk_as_each_frame_is_written(tiny_artifact, test_frames, tmp_path):
    from edgeexit.run import JsonLines
    from edgeexit.runtime import Cascade

    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    path = tmp_path / "live.jsonl"
    with JsonLines(path) as lines:
        for i in range(3):
            lines.write("cam", i, cascade.predict(test_frames[0][i]))
            assert len(path.read_text().splitlines()) == i + 1  # read while the file is still open
    res = cli("run", tiny_artifact, "--source", tmp_path, "--jsonl", tmp_path)
    assert res.exit_code == 2 and "--jsonl" in res.output and "folder" in res.output


# --- doctor, --help, progress in a log ------------------------------------------------------------------


def test_doctor_lists_cameras_and_says_when_there_is_none():
    from pathlib import Path

    res = cli("doctor", "--json", "-")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    cams = report["cameras"]
    if any(Path(f"/dev/video{i}").exists() for i in range(10)):
        pytest.skip("this machine has a video device")
    assert cams["found"] == [] and cams["seconds"] < 6
    text = words(cli("doctor").output)
    assert "Cameras no camera found" in text


def test_doctor_gives_one_tensorrt_install_command_for_this_machine():
    from edgeexit.doctor import doctor_text, tensorrt_install_why

    text = "\n".join(doctor_text(json.loads(cli("doctor", "--json", "-").output)))
    assert text.count("pip install 'tensorrt") <= 1 and "JetPack" not in text
    assert "tensorrt-cu12" in tensorrt_install_why({"gpu": "RTX 4090", "driver_cuda": "12.4"})
    cu13 = tensorrt_install_why({"gpu": "H100", "driver_cuda": "13.0"})
    assert "tensorrt-cu13" in cu13 and "cu12" not in cu13
    assert "pip" not in tensorrt_install_why({"gpu": None, "driver_cuda": None})


def test_help_says_what_the_tool_does_and_flags_show_no_bool():
    from edgeexit.clidocs import COMMANDS

    top = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "early-exit cascades calibrated on your device" in top and "MLCSD" not in top.split("Flow:")[0]
    for name in ("", *COMMANDS):
        out = CliRunner().invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in out, name
    assert "--quiet" in CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output


def test_progress_in_a_log_file_is_one_readable_line_per_epoch():
    import io

    from rich.console import Console

    from edgeexit.train.trainer import _progress_bar

    log = io.StringIO()
    console = Console(file=log, width=80)  # not a terminal: a log file, CI, systemd
    with _progress_bar(console, True) as prog:
        for epoch in range(2):
            bar = prog.add_task(f"epoch {epoch + 1}/2", total=625, loss=0.0, ips=0.0)
            for step in range(0, 625, 10):
                prog.update(bar, completed=min(step + 10, 625), loss=0.5 - 0.1 * epoch, ips=3000.0)
            prog.update(bar, description=f"epoch {epoch + 1}/2 val avg 0.81{epoch} final 0.85{epoch}")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "…" not in log.getvalue()
    for epoch, line in enumerate(lines):
        assert line.startswith(f"epoch {epoch + 1}/2 val avg 0.81{epoch} final 0.85{epoch}: 625/625")
        assert f"loss {0.5 - 0.1 * epoch:.3f}" in line and "3000 img/s" in line


def test_a_source_that_dropped_is_given_up_when_the_run_is_bounded_by_frames(tiny_artifact, test_frames, tmp_path):
    """A camera that gave frames and then went away for good: with reconnect_tries (what `run
    --max-frames` sets) the reader gives up after that many failed reconnects in a row, so the run
    ends; without it, it keeps reconnecting (a camera app that lost its camera for a while)."""
    import time

    cv2 = pytest.importorskip("cv2")
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.sources import RECONNECT_TRIES, LiveSource
    from edgeexit.runtime.streams import Streams

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (28, 28))
    for f in test_frames[0][:8]:
        writer.write(cv2.cvtColor(f[:, :, 0], cv2.COLOR_GRAY2BGR))
    writer.release()
    opened = []

    def opener():  # the camera is there once, then never again
        opened.append(1)
        return cv2.VideoCapture(str(video) if len(opened) == 1 else str(tmp_path / "gone.avi"))

    src = LiveSource(str(video), reconnect=True, reconnect_tries=3, backoff_s=(0.01, 0.02), opener=opener)
    src.start()
    t0 = time.perf_counter()
    while src.status != "error" and time.perf_counter() - t0 < 20:
        time.sleep(0.01)
    src.close()
    # three failures in a row: the drop itself, then two reopenings that failed
    assert src.status == "error" and src.captured == 8 and len(opened) == 3
    assert "did not come back (3 tries in" in src.last_error
    # the CLI's streams: bounded by frames → bounded reconnects; the library default keeps reconnecting
    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    with Streams(cascade, ["http://127.0.0.1:9/x"], reconnect_tries=RECONNECT_TRIES) as s:
        assert s.sources[0].reconnect_tries == RECONNECT_TRIES
    with Streams(cascade, ["http://127.0.0.1:9/x"]) as s:
        assert s.sources[0].reconnect_tries is None
