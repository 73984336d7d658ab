"""The command line as a user meets it: help, exit codes, one-line errors, JSON contracts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeexit.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_help_is_fast_and_imports_no_heavy_library():
    code = (
        "import sys; from edgeexit.cli import app; assert not {'torch','onnx','onnxruntime','cv2'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "eval", "export", "calibrate", "run", "bench", "info", "quickstart"):
        assert cmd in res.output


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--data", "mnist-9000"], "unknown dataset"),
        (["train", "--method", "magic"], "unknown --method"),
        (["train", "--exits", "6"], "--exits must be 4, 8 or 9"),
        (["train", "--data", "cifar10", "--data-dir", "/nonexistent"], "cifar-10-batches-py"),
        (["eval", "/nonexistent/model.pt"], "checkpoint not found"),
        (["export", "/nonexistent/model.pt"], "checkpoint not found"),
        (["export", "x.pt", "--format", "tflite"], "--format must be one of onnx, engine"),
        (["calibrate", "/nonexistent.edgeexit", "--budget", "5ms"], "does not exist"),
        (["run", "/nonexistent.edgeexit"], "does not exist"),
        (["info", "/nonexistent.edgeexit"], "does not exist"),
    ],
)
def test_bad_usage_is_exit_2_with_a_one_line_reason(args, match):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) <= 3


def test_corrupt_checkpoint_is_exit_2(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00garbage")
    res = runner.invoke(app, ["eval", str(bad)])
    assert res.exit_code == 2 and "not a readable edgeexit checkpoint" in res.output
    torch.save({"format": "something-else"}, bad)
    res = runner.invoke(app, ["export", str(bad)])
    assert res.exit_code == 2 and "not an edgeexit checkpoint" in res.output


@pytest.mark.slow
def test_eval_json_contract(tiny_run, tmp_path):
    out = tmp_path / "e.json"
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_run[0] / "model.pt"),
            "--limit-eval",
            "500",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "b.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    e = json.loads(out.read_text())
    assert e["split"] == "test" and len(e["exits"]) == 8
    assert {"exit", "accuracy", "cumulative_flops"} <= set(e["exits"][0])
    assert e["exits"][-1]["cumulative_flops"] > e["exits"][0]["cumulative_flops"]
    assert all(0 <= x["accuracy"] <= 1 for x in e["exits"])
    b = e["budgeted"]
    assert len(b) > 10 and {"expected_flops", "accuracy"} <= set(b[0])
    assert b[0]["expected_flops"] <= b[-1]["expected_flops"]
    assert (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.slow
def test_train_command_writes_a_loadable_checkpoint(tmp_path, fashion_test):
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            "fashion-mnist",
            "--method",
            "sd",
            "--exits",
            "4",
            "--width",
            "0.0625",
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--limit-eval",
            "200",
            "--val-size",
            "500",
            "--out",
            str(tmp_path / "r"),
            "--json",
            str(tmp_path / "t.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    ckpt = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert ckpt["config"]["exits"] == 4 and ckpt["method"] == "sd"
    assert json.loads((tmp_path / "t.json").read_text())["history"][0]["epoch"] == 1


def test_run_json_on_a_folder_and_a_video(tiny_artifact, test_frames, tmp_path):
    import cv2

    frames, _ = test_frames
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        cv2.imwrite(str(folder / f"{i:02d}.png"), frames[i][:, :, 0])
    out = tmp_path / "run.json"
    res = runner.invoke(
        app, ["run", str(tiny_artifact), "--source", str(folder), "--backend", "onnxruntime", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["frames"] == 12 and sum(r["exit_histogram"].values()) == 12
    assert {"mean", "p95"} <= set(r["latency_ms"])
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (56, 56))
    for f in frames[:15]:
        w.write(cv2.cvtColor(np.kron(f[:, :, 0], np.ones((2, 2), np.uint8)), cv2.COLOR_GRAY2BGR))
    w.release()
    res = runner.invoke(
        app,
        [
            "run",
            str(tiny_artifact),
            "--source",
            str(video),
            "--quiet",
            "--max-frames",
            "10",
            "--save-video",
            str(tmp_path / "out.mp4"),
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["frames"] == 10 and (tmp_path / "out.mp4").stat().st_size > 0
    res = runner.invoke(app, ["run", str(tiny_artifact), "--source", str(tmp_path / "nothing.mp4")])
    assert res.exit_code == 2 and "not a folder, a video file or a camera index" in res.output


def test_bench_json_contract(tiny_artifact, tmp_path):
    out = tmp_path / "b.json"
    res = runner.invoke(
        app,
        [
            "bench",
            str(tiny_artifact),
            "--backend",
            "onnxruntime",
            "--repeats",
            "30",
            "--images",
            "50",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    b = json.loads(out.read_text())
    assert {"backend", "device", "units", "full_cascade_ms", "early_exit_ms"} <= set(b)
    assert [u["name"] for u in b["units"]][:2] == ["seg_01", "head_01"]
    assert all(u["p95_ms"] >= u["p50_ms"] > 0 for u in b["units"])
    assert b["early_exit"]["samples"] == 50


def test_camera_app_example_runs_on_a_video_file(tiny_artifact, test_frames, tmp_path):
    import cv2

    frames, _ = test_frames
    video = tmp_path / "cam.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for f in frames[:20]:
        w.write(cv2.resize(cv2.cvtColor(f[:, :, 0], cv2.COLOR_GRAY2BGR), (64, 48)))
    w.release()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "camera_app.py"),
            str(tiny_artifact),
            "--source",
            str(video),
            "--max-frames",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("frame")]
    assert len(lines) == 20
    assert "torch imported: False" in proc.stdout
