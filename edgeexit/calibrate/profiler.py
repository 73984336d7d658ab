"""On-device latency of every unit, the per-exit decision overhead and the per-frame overhead.

Units are timed one at a time on real inputs (a held-out image pushed through the preceding
units), after a warm-up, for at least ``repeats`` runs or ``min_seconds``, whichever comes first
after ``min_repeats``. GPU backends synchronise after every run so a time is the unit's own.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time

import numpy as np


def _stats(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {
        "p50_ms": float(np.median(a)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "repeats": int(len(a)),
    }


def time_call(fn, sync, repeats: int = 200, min_seconds: float = 1.0, warmup: int = 10, min_repeats: int = 30) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        n = len(times)
        if n >= repeats or (n >= min_repeats and time.perf_counter() - start >= min_seconds):
            break
    return _stats(times)


def profile_units(
    cascade, image: np.ndarray, batch: int = 1, repeats: int = 200, min_seconds: float = 1.0, progress=None
) -> dict:
    """Per-unit latency at ``batch`` (a real preprocessed image repeated), plus decision overhead."""
    be = cascade.backend
    x = np.ascontiguousarray(np.repeat(image[None], batch, axis=0), dtype=np.float32)
    state = be.from_host(x)
    units: dict[str, dict] = {}
    heads = []
    for k in range(cascade.num_exits):
        seg_name, head_name = f"seg_{k + 1:02d}", f"head_{k + 1:02d}"
        s_in = state
        units[seg_name] = time_call(
            lambda s_in=s_in, k=k: be.run_segment(k, s_in), be.synchronize, repeats, min_seconds
        )
        state = be.run_segment(k, state)
        tap = state[-1]
        units[head_name] = time_call(lambda tap=tap, k=k: be.run_head(k, tap), be.synchronize, repeats, min_seconds)
        heads.append(be.run_head(k, tap))
        if progress is not None:
            progress(k + 1)
    # What the cascade does per evaluated exit besides running the head: read the confidence,
    # compare with the threshold.
    head = heads[0]
    th = 0.5
    decision = time_call(lambda: float(cascade._confidence(head)[0]) >= th, lambda: None, repeats, 0.2)
    return {"batch": batch, "units": units, "decision": decision}


def frame_overhead_ms(cascade, frame, unit_p50: dict, repeats: int = 100) -> float:
    """Per-frame cost outside the units (validation, preprocessing, host↔device copy, bookkeeping):
    median end-to-end ``predict`` with every intermediate exit skipped, minus the units it ran."""
    saved, saved_fuse = cascade.thresholds.copy(), cascade.fuse
    try:
        # Unfused, so the overhead is what surrounds the units the cost model adds up (fusion at
        # run time only makes the real cascade faster than predicted).
        cascade.fuse = False
        cascade.set_thresholds([2.0] * (cascade.num_exits - 1) + [0.0])
        lat = time_call(lambda: cascade.predict(frame), cascade.backend.synchronize, repeats, 0.5)["p50_ms"]
    finally:
        cascade.fuse = saved_fuse
        cascade.set_thresholds(saved)
    units = (
        sum(unit_p50[f"seg_{k + 1:02d}"] for k in range(cascade.num_exits)) + unit_p50[f"head_{cascade.num_exits:02d}"]
    )
    return max(0.0, lat - units)


def device_fingerprint(cascade) -> dict:
    be = cascade.backend
    fp = {
        "backend": be.name,
        "backend_version": getattr(be, "version", None),
        "precision": getattr(be, "precision", "fp32"),
        "device": getattr(be, "device_name", None) or str(getattr(be, "device", "")),
        "cpu": _cpu_model(),
        "cpu_threads": os.cpu_count(),
        "host": platform.node(),
        "machine": platform.machine(),
    }
    info = getattr(be, "device_info", None)
    if info:
        fp["gpu"] = info["name"]
        fp["compute_capability"] = info["compute_capability"]
    mode = _jetson_power_mode()
    if mode:
        fp["jetson_power_mode"] = mode
    return fp


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jetson_power_mode() -> str | None:
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return " / ".join(lines[:2]) or None
