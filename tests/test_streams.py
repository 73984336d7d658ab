"""Live sources and Streams: newest frame only, drops counted, batched predictions equal
per-frame ones, faults reported while the other streams go on, no thread left after close()."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime.sources import LiveSource, OrderedSource


class FakeCap:
    """OpenCV's VideoCapture interface over a list of frames, paced like a camera."""

    def __init__(self, frames, interval_s=0.0, fail_after=None, block_after=None, stop=None):
        self.frames, self.interval_s = frames, interval_s
        self.fail_after, self.block_after, self.stop = fail_after, block_after, stop
        self.i = 0
        self.released = False

    def isOpened(self):
        return True

    def get(self, prop):
        return 0.0

    def read(self):
        if self.block_after is not None and self.i >= self.block_after:
            self.stop.wait(10)  # a stalled camera: read blocks (until the test ends)
            return False, None
        if self.fail_after is not None and self.i >= self.fail_after:
            raise RuntimeError("corrupt frame")
        if self.i >= len(self.frames):
            return False, None
        if self.interval_s:
            time.sleep(self.interval_s)
        f = self.frames[self.i]
        self.i += 1
        return True, f

    def release(self):
        self.released = True


def gray_frames(test_frames, n, offset=0):
    imgs, labels = test_frames
    return [np.ascontiguousarray(imgs[(offset + i) % len(imgs)]) for i in range(n)], labels


def source_threads():
    return [t for t in threading.enumerate() if t.name.startswith("edgeexit-source")]


def test_live_source_keeps_only_the_newest_frame_and_counts_drops(test_frames):
    frames, _ = gray_frames(test_frames, 200)
    src = LiveSource("fake-cam", opener=lambda: FakeCap(frames, interval_s=0.001), reconnect=False)
    src.order = "RGB"
    src.start()
    taken = []
    while not src.finished:
        f = src.take()
        if f is not None:
            taken.append(f)
        time.sleep(0.01)  # a slow consumer: ~10 frames arrive per take
    src.close()
    ids = [f.id for f in taken]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert src.captured == 200
    assert src.dropped > 100  # most frames were replaced before they were taken
    assert src.dropped + len(taken) == src.captured  # every frame is either taken or counted dropped
    assert all(np.array_equal(f.image, frames[f.id]) for f in taken)  # id names the frame it carries
    caps = [f.capture_time for f in taken]
    assert caps == sorted(caps)


def test_ordered_source_reads_every_frame_in_order(tmp_path, test_frames):
    from PIL import Image

    frames, _ = gray_frames(test_frames, 7)
    for i, f in enumerate(frames):
        Image.fromarray(f[:, :, 0]).save(tmp_path / f"{i:02d}.png")
    src = OrderedSource(str(tmp_path))
    got = []
    while (f := src.take()) is not None:
        got.append(f)
    assert [f.id for f in got] == list(range(7)) and src.dropped == 0 and src.finished
    assert all(np.array_equal(g.image, f[:, :, 0]) for g, f in zip(got, frames, strict=True))


def test_batched_predictions_equal_per_frame_predictions(tiny_artifact, test_frames):
    from edgeexit.runtime import Cascade, Streams

    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    # thresholds that make frames leave at several exits, so compaction happens inside each batch
    cascade.set_thresholds([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0])
    n_streams, per = 4, 40
    streams_frames = [gray_frames(test_frames, per, offset=100 * s)[0] for s in range(n_streams)]
    srcs = []
    for s in range(n_streams):
        src = OrderedSourceFromList(f"s{s}", streams_frames[s])
        srcs.append(src)
    results = []
    with Streams(cascade, srcs) as streams:
        results = list(streams)
    assert streams.summary()["mean_batch"] == n_streams  # every tick took one frame of every stream
    assert len(results) == n_streams * per
    ticks: dict[int, set] = {}
    for r in results:  # tick t took frame t of every stream
        ticks.setdefault(r.frame_id, set()).add(r.prediction.exit_index)
    mixed = sum(len(e) > 1 for e in ticks.values())
    assert mixed >= per // 4, ticks  # many batches had frames leave early while others went on: compaction
    for r in results:
        single = cascade.predict(streams_frames[r.stream][r.frame_id])
        assert (r.prediction.label, r.prediction.exit_index) == (single.label, single.exit_index)
        assert r.prediction.confidence == pytest.approx(single.confidence, abs=1e-4)
    cascade.close()


class OrderedSourceFromList:
    """The OrderedSource protocol over frames in memory (uint8 HxWx1)."""

    live = False
    order = "RGB"

    def __init__(self, name, frames):
        self.source, self.frames = name, frames
        self.status, self.last_error, self.last_capture = "live", None, None
        self.captured = self.dropped = self.taken = self.reconnects = self.errors = 0
        self.finished = False

    def start(self, new_frame=None):
        return self

    def take(self):
        from edgeexit.runtime.sources import Frame

        if self.captured >= len(self.frames):
            self.finished, self.status = True, "ended"
            return None
        f = Frame(self.captured, time.perf_counter(), self.frames[self.captured])
        self.captured += 1
        return f

    def close(self, timeout_s=None):
        pass


@pytest.mark.slow
def test_faults_are_reported_and_the_other_streams_go_on(tiny_artifact, test_frames):
    from edgeexit.runtime import Cascade, Streams

    frames, _ = gray_frames(test_frames, 60)
    stop = threading.Event()
    opens = {"n": 0}

    def flaky():  # a URL that refuses twice, then streams
        opens["n"] += 1
        if opens["n"] <= 2:
            raise OSError("connection refused")
        return FakeCap(frames, interval_s=0.005)

    good = LiveSource("good", opener=lambda: FakeCap(frames, interval_s=0.005), reconnect=False)
    broken = LiveSource("broken", opener=lambda: FakeCap(frames, fail_after=5), reconnect=False)
    stalled = LiveSource("stalled", opener=lambda: FakeCap(frames, block_after=3, stop=stop), reconnect=False)
    url = LiveSource("rtsp://127.0.0.1:1/x", opener=flaky, backoff_s=(0.01, 0.05))
    for s in (good, broken, stalled, url):
        s.order = "RGB"
    events = []
    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    try:
        with Streams(cascade, [good, broken, stalled, url], stall_s=0.15, on_event=lambda *e: events.append(e)) as st:
            results = list(st.results(duration_s=1.2))
        summary = st.summary()
    finally:
        stop.set()
        cascade.close()
    by = {s["source"]: s for s in summary["streams"]}
    assert by["good"]["frames"] > 20 and by["good"]["status"] == "ended"
    assert by["broken"]["status"] == "error" and "corrupt frame" in by["broken"]["last_error"]
    assert by["broken"]["frames"] <= 5
    assert by["stalled"]["status"] == "stalled" and by["stalled"]["frames"] <= 3
    assert by["rtsp://127.0.0.1:1/x"]["reconnects"] >= 2 and by["rtsp://127.0.0.1:1/x"]["frames"] > 10
    kinds = {(src, kind) for src, kind, _ in events}
    assert ("broken", "error") in kinds and ("stalled", "stalled") in kinds
    assert ("rtsp://127.0.0.1:1/x", "reconnecting") in kinds and ("rtsp://127.0.0.1:1/x", "reconnected") in kinds
    assert {r.source for r in results} == {"good", "broken", "stalled", "rtsp://127.0.0.1:1/x"}


def test_close_leaves_no_thread(tiny_artifact, test_frames):
    from edgeexit.runtime import Cascade, Streams

    frames, _ = gray_frames(test_frames, 10_000)
    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    for t in source_threads():  # a reader another test left blocked in a fake read ends by itself
        t.join(15)
    before = threading.active_count()
    srcs = [LiveSource(f"cam{i}", opener=lambda: FakeCap(frames, interval_s=0.002)) for i in range(4)]
    for s in srcs:
        s.order = "RGB"
    streams = Streams(cascade, srcs).start()
    during = threading.active_count()
    for i, _ in enumerate(streams):
        if i >= 20:
            break
    streams.close()
    after = threading.active_count()
    cascade.close()
    print(f"threads: before {before}, running {during}, after close {after}")
    assert during == before + 4 and len(source_threads()) == 0 and after == before


def _write_video(path: Path, frames, fps=30.0):
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (28, 28))
    assert w.isOpened()
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    w.release()


@pytest.mark.slow  # a one-second video played in real time
def test_realtime_video_is_played_at_its_frame_rate(tmp_path, tiny_artifact, test_frames):
    pytest.importorskip("cv2")
    from edgeexit.runtime import Cascade, Streams

    frames, _ = gray_frames(test_frames, 30)
    clip = tmp_path / "clip.mkv"
    _write_video(clip, frames, fps=30.0)
    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    with Streams(cascade, [str(clip)], realtime=True) as st:
        t0 = time.perf_counter()
        results = list(st)
        wall = time.perf_counter() - t0
    assert 0.85 <= wall <= 3.0  # 30 frames at 30 fps: about a second, not as fast as decoding
    assert len(results) + st.summary()["streams"][0]["dropped"] == 30
    with Streams(cascade, [str(clip)]) as st:  # without --realtime: every frame, in order
        ids = [r.frame_id for r in st]
    assert ids == list(range(30))
    cascade.close()


def test_run_several_sources_json_has_streams(tmp_path, tiny_artifact, test_frames):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    pytest.importorskip("cv2")
    from PIL import Image

    frames, _ = gray_frames(test_frames, 20)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(frames[:8]):
        Image.fromarray(f[:, :, 0]).save(folder / f"{i}.png")
    clip = tmp_path / "clip.mkv"
    _write_video(clip, frames)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(
        app,
        ["run", str(tiny_artifact), "--source", str(folder), "--source", str(clip), "--realtime", "--fps", "100"]
        + ["--backend", "onnxruntime", "--json", str(out)],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert [s["source"] for s in d["streams"]] == [str(folder), str(clip)]
    for s in d["streams"]:
        assert {"source", "frames", "dropped", "fps", "e2e_latency_ms", "exit_histogram"} <= set(s)
        assert set(s["e2e_latency_ms"]) >= {"p50", "p95", "max"}
    assert d["streams"][0]["frames"] == 8 and d["streams"][1]["frames"] + d["streams"][1]["dropped"] == 20
    assert d["frames"] == sum(s["frames"] for s in d["streams"])


@pytest.mark.slow  # a real `edgeexit run` process, interrupted after 1.5 s of a video
def test_ctrl_c_ends_with_the_summary(tmp_path, tiny_artifact, test_frames):
    pytest.importorskip("cv2")
    frames, _ = gray_frames(test_frames, 600)
    clip = tmp_path / "long.mkv"
    _write_video(clip, frames)  # 20 s at 30 fps
    out = tmp_path / "r.json"
    exe = Path(sys.executable).with_name("edgeexit")
    p = subprocess.Popen(
        [str(exe), "run", str(tiny_artifact), "--source", str(clip), "--realtime", "--quiet", "--json", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
        # Ctrl-C's default, whatever this suite inherited (a suite started as a background job ignores
        # SIGINT, and so would the child: Python installs no KeyboardInterrupt handler then)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while time.time() < deadline and "backend" not in (p.stderr.readline() or "backend"):
        pass
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 0, stderr
    d = json.loads(out.read_text())
    assert d["interrupted"] is True and 10 <= d["frames"] < 600
    assert "Traceback" not in stderr


@pytest.mark.slow  # a real HTTP camera that goes away for a second and comes back
def test_mjpeg_over_http_loopback(tiny_artifact, test_frames):
    """A real stream over 127.0.0.1: a tiny MJPEG-over-HTTP server; OpenCV (FFmpeg) reads it, and
    the source reconnects when the server goes away and comes back."""
    cv2 = pytest.importorskip("cv2")
    from edgeexit.runtime import Cascade, Streams

    frames, _ = gray_frames(test_frames, 50)
    jpegs = [cv2.imencode(".jpg", cv2.resize(f, (64, 64)))[1].tobytes() for f in frames]
    server = MjpegServer(jpegs, fps=30).start()
    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    try:
        with Streams(cascade, [server.url], stall_s=0.5) as st:
            it = st.results(duration_s=20)
            first = [next(it) for _ in range(10)]
            server.stop()  # the camera goes away ...
            time.sleep(1.0)
            server.start()  # ... and comes back on the same port
            more = [next(it) for _ in range(10)]
            it.close()
        s = st.summary()["streams"][0]
    finally:
        server.stop()
        cascade.close()
    assert len(first) == 10 and len(more) == 10
    assert s["reconnects"] >= 1, s
    assert len(source_threads()) == 0


class MjpegServer:
    """multipart/x-mixed-replace JPEG frames over HTTP on 127.0.0.1 (what IP cameras serve)."""

    def __init__(self, jpegs, fps=30):
        import socket

        self.jpegs, self.interval = jpegs, 1.0 / fps
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.httpd = None

    def start(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while not server.stopping.is_set():
                        jpg = server.jpegs[i % len(server.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n")
                        self.wfile.write(f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                        i += 1
                        server.stopping.wait(server.interval)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.stopping = threading.Event()
        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.httpd is not None:
            self.stopping.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.httpd = None


@pytest.mark.slow  # three cameras in real time, twice
def test_batch_window_gathers_the_other_cameras_frames(tiny_artifact, test_frames):
    """Cameras with independent phases give ticks of one frame; a batch window waits for the others."""
    from edgeexit.runtime import Cascade, Streams

    frames, _ = gray_frames(test_frames, 30)

    def camera(phase_s):
        def opener():
            time.sleep(phase_s)
            return FakeCap(frames, interval_s=0.04)

        return opener

    cascade = Cascade.load(tiny_artifact, backend="onnxruntime")
    batches = {}
    for window in (0.0, 30.0):
        srcs = [LiveSource(f"cam{i}", opener=camera(0.012 * i), reconnect=False) for i in range(3)]
        for s in srcs:
            s.order = "RGB"
        with Streams(cascade, srcs, batch_window_ms=window) as st:
            list(st)
        batches[window] = st.summary()["mean_batch"]
    cascade.close()
    assert batches[0.0] < 1.6 and batches[30.0] > 2.3, batches


@pytest.mark.slow  # a real HTTP camera at 60 fps on 127.0.0.1
def test_a_real_http_camera_gives_the_newest_frame_not_a_backlog(test_frames):
    """OpenCV's FFmpeg reading an HTTP MJPEG camera on 127.0.0.1 at 60 fps: while the app takes
    nothing the reader keeps only the newest frame and counts the others as dropped."""
    cv2 = pytest.importorskip("cv2")
    frames, _ = gray_frames(test_frames, 50)
    server = MjpegServer([cv2.imencode(".jpg", f)[1].tobytes() for f in frames], fps=60).start()
    src = LiveSource(server.url, backoff_s=(0.05, 0.2), read_timeout_s=2.0).start()
    try:
        deadline = time.perf_counter() + 20
        while src.captured < 5 and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert src.take() is not None and src.status == "live"
        time.sleep(0.5)  # the app is busy: 30 frames arrive, none taken
        dropped, captured = src.dropped, src.captured
        frame = src.take()
    finally:
        src.close()
        server.stop()
    assert frame is not None and frame.id >= captured - 1  # the newest frame the reader had
    assert dropped >= 5  # the older ones were counted as dropped, never queued
    assert len(source_threads()) == 0
