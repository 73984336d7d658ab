"""Graceful ends: SIGTERM (systemd, `docker stop`) and SIGINT (Ctrl-C) end `edgeexit run` with its
summary printed and its --json written, an ordered video included (util.sigterm_as_interrupt makes
SIGTERM what Ctrl-C is; edgeexit.run.run_source ends on either with what it answered). Decode
workers run in a process group of their own and ignore SIGINT, so a Ctrl-C during the parallel
decode is reported once by the parent, with no traceback from any worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

EDGEEXIT = [sys.executable, "-c", "from edgeexit.cli import main; main()"]


def _video(path: Path, frames: int = 4000) -> Path:
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (28, 28))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        w.write(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    w.release()
    return path


def _wait_for_lines(proc, n: int, timeout_s: float = 120) -> list[str]:
    lines, t0 = [], time.monotonic()
    while len(lines) < n and time.monotonic() - t0 < timeout_s:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_on_an_ordered_video_ends_on_a_signal_with_summary_json_and_video(tiny_artifact, tmp_path, sig):
    video = _video(tmp_path / "in.avi")
    out_json, out_video = tmp_path / "run.json", tmp_path / "out.mp4"
    cmd = [*EDGEEXIT, "run", str(tiny_artifact), "--source", str(video), "--backend", "onnxruntime",
           "--json", str(out_json), "--save-video", str(out_video)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _wait_for_lines(proc, 30)
        assert len(first) == 30 and all(" exit " in line for line in first), first[:3]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "(interrupted)" in out
    summary = json.loads(out_json.read_text())
    assert summary["interrupted"] is True and 30 <= summary["frames"] < 4000
    assert sum(summary["exit_histogram"].values()) == summary["frames"]
    import cv2

    cap = cv2.VideoCapture(str(out_video))
    written = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert abs(written - summary["frames"]) <= 1  # every answered frame is in the video, readable


def _worker_pids(parent: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"_worker_main" in cmdline:
            found.append(int(d))
    return found


@pytest.mark.slow
def test_ctrl_c_during_the_parallel_decode_is_reported_once_without_worker_tracebacks(tmp_path):
    from PIL import Image

    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(400):
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, EDGEEXIT_DECODE_WORKERS="2", TMPDIR=str(tmp_path / "tmp"))
    cmd = [*EDGEEXIT, "train", "--data", str(root), "--image-size", "96", "--out", str(tmp_path / "r"), "--epochs", "1"]
    # a session of its own: the signal below goes to its whole process group, as a terminal's Ctrl-C does
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        t0 = time.monotonic()
        while not _worker_pids(proc.pid) and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        workers = _worker_pids(proc.pid)
        assert workers, "the decode workers never started"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.count("interrupted") == 1
    time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() for p in workers)  # the parent stopped its workers
    assert list((tmp_path / "tmp").iterdir()) == []  # and removed their temporary file


def _signal_self(sig) -> None:
    """Send ``sig`` to this process and give its handler the bytecode boundaries to run at."""
    os.kill(os.getpid(), sig)
    for _ in range(10_000):
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_landing_in_a_finaliser_is_kept_for_the_frame_boundary(sig):
    """Raised where it lands, Ctrl-C in a finaliser (an ONNX Runtime session or an array freed mid-frame)
    is printed as "Exception ignored" and dropped, and the run went on. Under `interrupt_between_frames`
    it is noted, raised at the next `check` (between frames), and a second one raises at once."""
    from edgeexit.util import interrupt_between_frames

    class FreedMidFrame:
        def __del__(self):
            _signal_self(sig)

    before = signal.getsignal(sig)
    with interrupt_between_frames() as stop:
        FreedMidFrame()  # no reference kept: its finaliser runs here, and the signal lands in it
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):  # the second one does not wait for a boundary
            _signal_self(sig)
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_several_streams_end_at_a_tick_when_the_interrupt_lands_in_a_finaliser(tiny_artifact, test_frames, sig):
    """The multi-stream loop: a signal landing in a finaliser (here, an object freed while a frame is
    taken) stops the streams after the tick under way, and the summary says interrupted; raised where
    it landed, it was printed as "Exception ignored" and every frame was still read."""
    from io import StringIO

    from rich.console import Console
    from test_streams import OrderedSourceFromList

    from edgeexit.run import run_streams
    from edgeexit.runtime import Cascade

    class FreedMidFrame:
        def __del__(self):
            _signal_self(sig)

    class SignalledAt(OrderedSourceFromList):
        def take(self):
            if self.captured == 20:
                FreedMidFrame()  # no reference kept: the signal lands in its finaliser
            return super().take()

    frames = [np.ascontiguousarray(f) for f in test_frames[0][:300]]
    sources = [SignalledAt("cam0", frames), OrderedSourceFromList("cam1", frames)]
    console = Console(file=StringIO(), width=120)
    before = signal.getsignal(sig)
    with Cascade.load(tiny_artifact, backend="onnxruntime") as cascade:
        summary = run_streams(cascade, sources, False, None, None, None, None, True, console, console)
    assert summary["interrupted"] is True
    assert 20 <= summary["frames"] // 2 < 30, summary["frames"]  # ended within a tick or two, not at 300
    assert signal.getsignal(sig) is before
