"""External tools (nvpmodel, nvidia-smi) are untrusted inputs: `util.run_probe` reads a bounded
number of bytes for a bounded time, replaces invalid UTF-8, and what reaches a manifest is bounded.
Each test puts a fake executable on PATH and checks what edgeexit makes of it."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from edgeexit.runtime import device
from edgeexit.util import PROBE_BYTES, PROBE_TEXT, run_probe


def _fake(tmp_path, monkeypatch, name: str, script: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return exe


def test_invalid_utf8_is_replaced_not_an_exception(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "nvpmodel", r"printf 'NV Power Mode: MAXN\377\376\n0\n'")
    mode = device.jetson_power_mode()
    assert mode == "MAXN\ufffd\ufffd / 0"


def test_endless_output_is_cut_at_the_byte_bound(tmp_path, monkeypatch):
    exe = _fake(tmp_path, monkeypatch, "nvidia-smi", "while :; do echo 'Orin, 8.7, 1'; done")
    t0 = time.perf_counter()
    res = run_probe([str(exe)], timeout_s=20)
    assert time.perf_counter() - t0 < 10
    assert res is not None and not res.complete and res.returncode is None
    assert len(res.text.encode()) == PROBE_BYTES


def test_a_tool_that_never_answers_is_killed_at_the_deadline(tmp_path, monkeypatch):
    exe = _fake(tmp_path, monkeypatch, "nvpmodel", "sleep 30 &\nwait\n")  # a child keeps the pipe open too
    t0 = time.perf_counter()
    res = run_probe([str(exe), "-q"], timeout_s=0.5)
    assert time.perf_counter() - t0 < 5
    assert res is not None and res.text == "" and not res.complete


def test_a_70_mb_power_mode_line_is_bounded_in_the_fingerprint(tmp_path, monkeypatch):
    line = "printf 'NV Power Mode: '\nhead -c 70000000 /dev/zero | tr '\\0' M\necho\n"
    _fake(tmp_path, monkeypatch, "nvpmodel", line)
    fields = {"name": "onnxruntime-cpu", "version": "1", "precision": "fp32", "device": "cpu", "extra": {}}
    info = type("Info", (), fields)
    t0 = time.perf_counter()
    fp = device.fingerprint(info)
    assert time.perf_counter() - t0 < 10
    assert fp["jetson_power_mode"].startswith("MMMM") and len(fp["jetson_power_mode"]) == PROBE_TEXT
    assert all(len(v) <= PROBE_TEXT for v in fp.values() if isinstance(v, str))
    assert len(json.dumps(fp)) < 4 * PROBE_TEXT * len(fp)


def test_nvidia_smi_with_control_characters_and_a_failing_exit(tmp_path, monkeypatch):
    exe = _fake(tmp_path, monkeypatch, "nvidia-smi", r"printf 'Or\033[2Jin\377, 8.7\n'")
    monkeypatch.setattr("edgeexit.runtime.backends.cuda.cuda_device_info", lambda: 1 / 0, raising=False)
    assert device.gpu_identity() == {"name": "Or [2Jin\ufffd", "compute_capability": "8.7"}
    exe.write_text("#!/bin/sh\necho 'Orin, 8.7'\nexit 3\n")
    assert device.gpu_identity() is None  # a failing tool's output is not an answer


@pytest.mark.parametrize("cmd", [["/nonexistent/tool"], ["/"]])
def test_a_tool_that_cannot_start_is_none(cmd):
    assert run_probe(cmd) is None
