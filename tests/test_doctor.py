"""`edgeexit doctor`: what this machine can run, and whether an artifact runs here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

NO_TORCH = (
    "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"  # import torch fails
    "from edgeexit.cli import app\n"
    "app(sys.argv[1:], standalone_mode=True)\n"
)


def doctor(*args):
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, "doctor", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_doctor_without_artifact_reports_this_machine_without_torch():
    res = doctor("--json", "-")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["ok"] is True and d["auto_backend"] == "onnxruntime-cpu"
    assert "CPUExecutionProvider" in d["onnxruntime"]["providers"]
    assert d["tensorrt"]["version"] is None and "tensorrt" in d["tensorrt"]["import_error"]  # verbatim
    assert d["torch_imported"] is False
    assert d["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert set(d["opencv"]["video_backends"]) == {"V4L2", "GStreamer", "FFmpeg"}
    text = doctor()
    assert text.returncode == 0 and "TensorRT      absent: ModuleNotFoundError" in text.stdout


def test_doctor_onnx_artifact_runs_here(artifact_copy):
    res = doctor(artifact_copy, "--json", "-")
    assert res.returncode == 0, res.stderr + res.stdout
    d = json.loads(res.stdout)
    assert d["ok"] is True and d["auto_backend"] == "onnxruntime-cpu" and d["reason"] is None
    assert d["artifact"]["engines"] == [] and d["torch_imported"] is False


@pytest.mark.slow  # two doctor processes on an artifact with foreign engines
def test_doctor_refuses_engines_built_for_another_gpu(artifact_copy):
    manifest_path = artifact_copy / "manifest.json"
    m = json.loads(manifest_path.read_text())
    for u in m["units"]:
        (artifact_copy / f"{u['name']}.fp16.engine").write_bytes(b"\0")
        u["engines"] = [
            {
                "path": f"{u['name']}.fp16.engine",
                "precision": "fp16",
                "trt_version": "10.3.0",
                "device_name": "Orin (nvgpu)",
                "compute_capability": "8.7",
                "batch_profile": {"min": 1, "opt": 1, "max": 8},
            }
        ]
    manifest_path.write_text(json.dumps(m))
    res = doctor(artifact_copy, "--json", "-")
    assert res.returncode == 2, res.stdout
    d = json.loads(res.stdout)
    assert d["ok"] is False and d["auto_backend"] == "onnxruntime-cpu"
    assert "built for Orin (nvgpu) (sm 8.7)" in d["reason"] and d["artifact"]["engines_match"] is False
    text = doctor(artifact_copy)
    assert text.returncode == 2 and "not ok" in text.stdout and "sm 8.7" in text.stdout


def test_doctor_names_the_jetson_venv_case(monkeypatch, tmp_path):
    from edgeexit import doctor as doc

    monkeypatch.setattr(doc, "_system_tensorrt", lambda: "/usr/lib/python3.10/dist-packages")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    py = {"venv": True, "venv_system_site_packages": False}
    out = doc.tensorrt_info(py, {"jetson": True})
    assert out["jetson_venv"] is True and "--system-site-packages" in out["why"] and "JetPack" in out["why"]
    assert "tensorrt" in out["import_error"]


def test_doctor_on_a_broken_artifact_is_a_one_line_error(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    res = doctor(tmp_path / "missing.edgeexit")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_doctor_json_takes_a_file_like_every_command_and_dash_prints_it(tmp_path):
    out = tmp_path / ("a-folder-name-long-enough-that-the-path-is-wider-than-a-terminal" * 2) / "report.json"
    out.parent.mkdir()
    res = doctor("--json", out)
    assert res.returncode == 0, res.stderr
    # the text report, and the file as for any --json, its path on one line whatever its length
    assert "Python" in res.stdout and f"wrote {out}" in res.stderr
    d = json.loads(out.read_text())
    assert d["ok"] is True and d["auto_backend"] == "onnxruntime-cpu"
    assert d.keys() == json.loads(doctor("--json", "-").stdout).keys()
    res = doctor("--json", tmp_path)  # a folder is refused before anything runs, as for every --json
    assert res.returncode == 2 and "--json" in res.stderr and "Traceback" not in res.stderr
    res = doctor("--json")
    assert res.returncode == 2 and "requires an argument" in res.stderr
