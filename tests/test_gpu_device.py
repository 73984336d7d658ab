"""Device fingerprint pieces of the GPU path (the GPU without torch or TensorRT, nvpmodel, arm64
CPUs); no GPU needed."""

from __future__ import annotations

import types

from edgeexit.runtime import device


def test_nvpmodel_output_with_warnings_first_gives_the_same_mode():
    clean = "NV Power Mode: MAXN\n0\n"
    noisy = "NVPM WARN: Golden image context is already created\nNVPM WARN: fan mode is not set\n" + clean
    assert device.parse_nvpmodel(clean) == device.parse_nvpmodel(noisy) == "MAXN / 0"
    assert device.parse_nvpmodel("NVPM ERROR: failed\n") is None


def test_onnxruntime_cuda_fingerprint_names_the_gpu(monkeypatch):
    monkeypatch.setattr(device, "gpu_identity", lambda: {"name": "Orin", "compute_capability": "8.7"})
    info = types.SimpleNamespace(name="onnxruntime-cuda", version="1.2", precision="fp32", device="CUDA", extra={})
    fp = device.fingerprint(info)
    assert fp["gpu"] == "Orin" and fp["compute_capability"] == "8.7"


def test_arm64_cpu_name_is_the_board_not_aarch64(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    monkeypatch.setattr(device, "_read", lambda p: "NVIDIA Jetson AGX Orin Developer Kit" if "model" in p else None)
    assert device.cpu_name() == "NVIDIA Jetson AGX Orin Developer Kit"
    monkeypatch.setattr(device, "_read", lambda p: None)
    assert "CPU part 0xd42" in device.cpu_name()
