"""The device journey as a user walks it, on the SIMULATED TensorRT / CUDA (tests/fake_gpu/) of
each API surface: export on a "desktop" with torch (every ONNX flavour, no engines), copy the
artifact, then on the "device" — a process where torch, torchvision, onnx, onnxslim and edgeexit's
dataset and training modules cannot be imported (tests/sim_device.py) — build the engines, calibrate,
run and ask doctor. A simulation: it checks edgeexit's logic and imports, not TensorRT.

Set EDGEEXIT_JOURNEY_DIR to keep each surface's transcript there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.sim, pytest.mark.slow]

SIM_DEVICE = Path(__file__).resolve().parent / "sim_device.py"
SURFACES = ["8.6.1", "10.3.0", "11.4.0"]


@pytest.fixture(scope="module")
def desktop_artifact(tiny_run, tmp_path_factory):
    """`edgeexit export model.pt --half --int8` on the desktop: every ONNX flavour, no engines."""
    from edgeexit.export.exporter import export_checkpoint

    dest = tmp_path_factory.mktemp("desktop") / "model.edgeexit"
    m, _ = export_checkpoint(
        tiny_run[0] / "model.pt", out=dest, half=True, int8=True, int8_images=64, int8_tolerance=0.05,
        parity_images=64)  # fmt: skip
    assert all(u["onnx_fp16"] and u["onnx_int8_trt"] and not u["engines"] for u in m["units"])
    trt_int8 = m["quantization"]["trt_parity"]  # the TensorRT INT8 flavour ran (ONNX Runtime CPU) before shipping
    assert trt_int8["checked"] and trt_int8["passed"] and len(trt_int8["exits"]) == 8 and trt_int8["frames"] >= 100
    return dest


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory, test_frames):
    from PIL import Image

    folder = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(test_frames[0][:12]):
        Image.fromarray(f[:, :, 0]).save(folder / f"{i:03d}.png")
    return folder


def device(version: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "140", "NO_COLOR": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, str(SIM_DEVICE), version, "--integrated", "--", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.parametrize("version", SURFACES)
def test_a_device_without_torch_builds_its_engines_calibrates_runs_and_passes_doctor(
    desktop_artifact, frame_folder, tmp_path, version
):
    art = tmp_path / "device" / "model.edgeexit"
    shutil.copytree(desktop_artifact, art)  # "copy the artifact to the Jetson"
    transcript = []

    def step(*args, expect: int = 0) -> subprocess.CompletedProcess:
        r = device(version, *args, cwd=tmp_path)
        transcript.append(f"$ edgeexit {' '.join(map(str, args))}   # exit {r.returncode}\n{r.stdout}{r.stderr}")
        assert r.returncode == expect, r.stdout + r.stderr
        assert "sim-device: blocked imports: none" in r.stderr, r.stderr
        return r

    try:
        step("engines", art)
        step("engines", art, "--half")
        step("engines", art, "--int8")
        step("engines", art, expect=2)  # fp32 engines already run here: only --force rebuilds them
        m = json.loads((art / "manifest.json").read_text())
        for u in m["units"]:
            assert sorted(e["precision"] for e in u["engines"]) == ["fp16", "fp32", "int8"]
            assert {e["trt_version"] for e in u["engines"]} == {version}
            assert all((art / e["path"]).is_file() and "/" not in e["path"] for e in u["engines"])
        gate = m["engine_parity"]
        assert gate["passed"] and gate["precision"] == "int8" and gate["frames"] == m["calibration_frames"]["count"]
        assert not list(art.glob(".engines-*"))  # the build folder is gone
        # a budget of the whole model: on the simulation every call costs Python time, so the cheapest
        # cascade is close to the full model and a tighter share can fall below it on a loaded machine
        step("calibrate", art, "--budget", "100%", "--images", "150", "--repeats", "30")
        assert json.loads((art / "manifest.json").read_text())["calibration"]["backend"] == "tensorrt"
        r = step("run", art, "--source", frame_folder, "--max-frames", "12")
        assert "tensorrt" in r.stdout + r.stderr
        r = step("doctor", art, "--json", "-")
        report = json.loads(r.stdout)
        assert report["ok"] and report["artifact"]["auto_backend"] == "tensorrt"
        assert report["artifact"]["engines_match"] is True
    finally:
        head = f"# simulated TensorRT {version} (integrated GPU, TF32 on), torch/onnx unimportable\n"
        text = head + "\n".join(transcript)
        keep = os.environ.get("EDGEEXIT_JOURNEY_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"journey-{version}.txt").write_text(text)
    assert np.isfinite(gate["max_abs_confidence_diff"])
