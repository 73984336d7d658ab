"""What this device is: CPU model, Jetson power mode, and the fingerprint calibration records."""

from __future__ import annotations

import os
import platform
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from edgeexit.util import bounded_text, run_probe


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo; on arm64 (no model name for 64-bit tasks) the board
    model from the device tree (a Jetson's name), else the CPU part id."""
    part = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
                if line.startswith("CPU part") and part is None:
                    part = line.split(":", 1)[1].strip()
    except OSError:
        pass
    model = _read("/proc/device-tree/model")
    if model:
        return model
    if part:
        return f"{platform.machine()} (CPU part {part})"
    return platform.processor() or platform.machine()


def jetson_power_mode() -> str | None:
    """`nvpmodel -q` on a Jetson (its power mode decides the clocks); None elsewhere."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    res = run_probe([exe, "-q"])
    if res is None:
        return None
    mode = parse_nvpmodel(res.text)
    return bounded_text(mode) if mode else None


def parse_nvpmodel(out: str) -> str | None:
    """ "NAME / id" from `nvpmodel -q` as jetson_stats reads it: the line "NV Power Mode: NAME"
    wherever it is (NVPM warnings may come first), and the numeric id on the next line."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        m = re.search(r"NV Power Mode:\s*(.*)", line)
        if m:
            mode = m.group(1).strip()
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{mode} / {nxt}" if nxt.isdigit() else mode
    return None


# Jetson GPU devfreq nodes, as jetson_stats identifies them (jtop/core/gpu.py): by the device-tree
# node name, since an Orin's GPU is /sys/class/devfreq/17000000.ga10b (no "gpu" in the entry name).
JETSON_GPU_NODES = ("gv11b", "gp10b", "ga10b", "gb10b", "gpu")


def _is_gpu_devfreq(entry: Path) -> bool:
    node = _read(str(entry / "device" / "of_node" / "name"))
    if node in JETSON_GPU_NODES:
        return True
    return entry.name.split(".")[-1] in JETSON_GPU_NODES or "gpu" in entry.name


def clocks_locked(sysfs: str = "/sys") -> bool | None:
    """jetson_clocks (or any fixed clocks): min == max for the CPU and GPU frequencies, from sysfs
    without root; None when there is nothing to read. ``sysfs``: the sysfs root (tests)."""
    root = Path(sysfs)
    pairs = []
    for cpu in sorted((root / "devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        pairs.append((_read(str(cpu / "scaling_min_freq")), _read(str(cpu / "scaling_max_freq"))))
    devfreq = root / "class/devfreq"
    for gpu in sorted(devfreq.iterdir()) if devfreq.is_dir() else []:
        if _is_gpu_devfreq(gpu):
            pairs.append((_read(str(gpu / "min_freq")), _read(str(gpu / "max_freq"))))
    pairs = [(a, b) for a, b in pairs if a and b]
    if not pairs:
        return None
    return all(a == b for a, b in pairs)


def gpu_identity() -> dict | None:
    """Name and compute capability of GPU 0 without torch or TensorRT: cuda-python when it
    works, else nvidia-smi."""
    try:
        from edgeexit.runtime.backends.cuda import cuda_device_info

        return cuda_device_info()
    except Exception:  # noqa: BLE001 - any reason: try nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    res = run_probe([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    out = res.text.strip().splitlines() if res is not None and res.returncode == 0 else []
    if not out or "," not in out[0]:
        return None
    name, cc = (bounded_text(v) for v in out[0].rsplit(",", 1))
    return {"name": name, "compute_capability": cc}


def fingerprint(info) -> dict:
    """The device and backend a latency table was measured on (`RunnerInfo` → plain JSON)."""
    fp = {
        "backend": info.name,
        "backend_version": info.version,
        "precision": info.precision,
        "device": info.device,
        "cpu": cpu_name(),
        "cpu_threads": os.cpu_count(),
        "host": platform.node(),
        "machine": platform.machine(),
    }
    if "compute_capability" in info.extra:
        fp["gpu"] = info.device
        fp["compute_capability"] = info.extra["compute_capability"]
    elif info.name == "onnxruntime-cuda":  # ORT names no GPU
        gpu = gpu_identity()
        if gpu:
            fp["gpu"], fp["compute_capability"] = gpu["name"], gpu["compute_capability"]
    mode = jetson_power_mode()
    if mode:
        fp["jetson_power_mode"] = mode
        locked = clocks_locked()
        if locked is not None:
            fp["jetson_clocks_locked"] = locked
        for key, path in (("board", "/proc/device-tree/model"), ("l4t", "/etc/nv_tegra_release")):
            value = _read(path)
            if value:
                fp[key] = value.splitlines()[0][:120]
    # every string here came from the system or a tool: bounded, so a hostile one cannot bloat the manifest
    return {k: bounded_text(v) if isinstance(v, str) else v for k, v in fp.items()}


_FINGERPRINT_KEYS = (
    "backend",
    "backend_version",
    "precision",
    "device",
    "cpu",
    "gpu",
    "compute_capability",
    "jetson_power_mode",
    "jetson_clocks_locked",  # latency is what calibration promises: pinned vs scaling clocks change it
)


def fingerprint_changes(calibrated: Mapping | None, info) -> list[str]:
    """What differs between a calibration's device fingerprint and this device's (`RunnerInfo`
    ``info``), host name aside: one line per key, empty when nothing does (or nothing was recorded)."""
    if not isinstance(calibrated, Mapping):
        return []
    now = fingerprint(info)
    return [
        f"{k}: calibrated {calibrated.get(k)!r}, now {now.get(k)!r}"
        for k in _FINGERPRINT_KEYS
        if (k in calibrated or k in now) and calibrated.get(k) != now.get(k)
    ]
