"""What this device is: CPU model, Jetson power mode, and the fingerprint calibration records."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def jetson_power_mode() -> str | None:
    """`nvpmodel -q` on a Jetson (its power mode decides the clocks); None elsewhere."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return " / ".join(lines[:2]) or None


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
    mode = jetson_power_mode()
    if mode:
        fp["jetson_power_mode"] = mode
    return fp
