"""Many cameras, one cascade: the newest frame of every stream, run as one batch with compaction.

    from edgeexit.runtime import Cascade, Streams
    cascade = Cascade.load("model.edgeexit")
    with Streams(cascade, ["0", "rtsp://cam2/stream", "clip.mp4"], realtime=True) as streams:
        for r in streams:                      # or streams.run(callback)
            print(r.stream, r.frame_id, r.prediction.class_name, r.e2e_ms)
        print(streams.summary())

- Live sources (camera index, URL, a video file with ``realtime``) are read by one thread each that
  keeps only the newest frame (runtime/sources.py `LiveSource`): the app never works on the past,
  and a frame it did not take in time is counted as dropped. Folders and video files without
  ``realtime`` give every frame, in order (one per tick).
- Each *tick* takes the newest frame of every stream that has one and runs them as one
  `Cascade.predict_batch`: frames that exit early leave the batch (compaction), so a batch of easy
  and hard frames costs about what its hard frames cost. The predictions are those of
  `Cascade.predict` on the same frames with the same plan (tests/test_streams.py).
- ``deadline_ms`` (an anytime deadline per frame) runs each frame of a tick with
  `Cascade.predict(frame, deadline_ms)`: the cascade's deadline logic is per frame. A cascade loaded
  with ``budget_ms`` has its controller fed every frame's latency, as with one source, and the plan
  it moves to is swapped in between ticks.
- A stream that stalls (no frame for ``stall_s``), ends or fails is reported (``on_event``) and the
  others go on; URLs and cameras reconnect with backoff. `close()` stops and joins every reader
  thread.
- ``drift`` gives every stream its own drift monitor (runtime/monitor.py): each camera is compared
  with the calibration frames on its own, and the first alarm of a stream is an event ("drift").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeexit.runtime.latency import run_summary
from edgeexit.runtime.monitor import alarm_message, monitor_for
from edgeexit.runtime.monitor import as_options as as_drift_options
from edgeexit.runtime.preprocessing import Preprocessor
from edgeexit.runtime.sources import open_source

if TYPE_CHECKING:
    from edgeexit.runtime.cascade import Prediction


@dataclass(slots=True)
class StreamResult:
    stream: int  # index into Streams.sources
    source: str
    frame_id: int  # the frame's number in its source (gaps: dropped frames)
    capture_time: float  # time.perf_counter() when the frame was captured
    prediction: Prediction
    result_time: float  # time.perf_counter() when the prediction was ready
    image: np.ndarray | None = None  # the frame itself (for an overlay), as the source gave it

    @property
    def e2e_ms(self) -> float:
        """Capture to result, in milliseconds."""
        return (self.result_time - self.capture_time) * 1e3


class _StreamStats:
    def __init__(self, num_exits: int) -> None:
        self.e2e_ms: list[float] = []
        self.inference_ms: list[float] = []
        self.preprocess_ms: list[float] = []
        self.exits = [0] * num_exits
        self.first_result: float | None = None
        self.last_result: float | None = None
        self.stalled = False


class Streams:
    """Batched early-exit inference over several frame sources. Not itself thread safe: one thread
    iterates (the readers are its own threads).

    ``sources``: strings (camera index, URL, video file, image folder) or source objects
    (runtime/sources.py `LiveSource`/`OrderedSource`). ``batch=False`` runs the frames of a tick
    one by one (`Cascade.predict`): the one-cascade-call-per-frame baseline. ``max_frames``: per
    stream. ``on_event(source, kind, message)``: stalled, resumed, reconnecting, reconnected,
    ended, error. ``batch_window_ms``: after the first frame of a tick, wait up to this long
    for the other live streams' next frames, to batch more (DeepStream's batched-push-timeout;
    0: run what is there at once; it adds up to that much latency). ``drift``: True or a
    `DriftOptions`: a drift monitor per stream (``drift`` event at its first alarm; the ``drift`` block
    of each stream in `summary`); a live stream samples every `LIVE_EVERY`-th frame unless
    ``DriftOptions.every`` says otherwise. ``reconnect_tries``: failed reconnects in a row after which
    a live source opened here that dropped is given up (None: it reconnects for as long as the run goes).
    """

    def __init__(
        self,
        cascade,
        sources,
        *,
        realtime: bool = False,
        fps: float | None = None,
        deadline_ms: float | None = None,
        batch: bool = True,
        max_frames: int | None = None,
        stall_s: float = 2.0,
        batch_window_ms: float = 0.0,
        on_event: Callable[[str, str, str], None] | None = None,
        drift=None,
        reconnect_tries: int | None = None,
    ) -> None:
        from edgeexit.errors import UserError

        if isinstance(sources, str):
            sources = [sources]
        sources = list(sources)
        if not sources:
            raise UserError("give at least one source")
        if max_frames is not None and max_frames < 1:
            raise UserError(f"--max-frames must be at least 1, got {max_frames}")
        if deadline_ms is not None and not (deadline_ms >= 0 and deadline_ms != float("inf")):
            raise UserError(f"--deadline-ms must be a finite number of milliseconds >= 0, got {deadline_ms}")
        self.cascade = cascade
        self.deadline_ms = deadline_ms
        self.batch = bool(batch) and deadline_ms is None
        self.max_frames = max_frames
        self.stall_s = float(stall_s)
        if not (batch_window_ms >= 0 and batch_window_ms < 10_000):
            raise UserError(f"batch_window_ms must be within 0..10000 ms, got {batch_window_ms}")
        self.batch_window_s = float(batch_window_ms) / 1e3
        self._user_event = on_event
        self._reconnect_tries = reconnect_tries  # for the sources opened here from strings
        self.events: list[tuple[float, str, str, str]] = []  # (time, source, kind, message)
        self._new_frame = threading.Event()
        self.sources = self._open(sources, realtime, fps)
        pre = cascade.artifact.preprocessing
        self._pre = {order: Preprocessor(pre, order) for order in {src.order for src in self.sources}}
        self.drift = self._monitors(as_drift_options(drift))
        watch = self.drift is not None
        # the batch runs on a view that keeps each frame's first evaluated exit's confidence (what the
        # monitors watch); it follows the cascade's plan and controller
        self._batched = cascade.derive(first_confidence=True) if watch and self.batch else cascade
        # per-frame predict (deadline, or batch=False) reads uint8 frames in each source's order
        orders = () if self.batch else self._pre
        self._per_order = {order: cascade.derive(input_order=order, first_confidence=watch) for order in orders}
        self._stats = [_StreamStats(cascade.num_exits) for _ in self.sources]
        self._started = False
        self._closed = False
        self._stop = False
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.ticks = 0
        self.batch_sizes: list[int] = []
        self.interrupted = False

    def _open(self, sources, realtime, fps) -> list:
        opened = []
        try:
            for s in sources:
                src = s
                if isinstance(s, str):
                    src = open_source(s, realtime, fps, self._reader_event, self._reconnect_tries)
                if getattr(src, "on_event", False) is None:  # a LiveSource made by the caller
                    src.on_event = self._reader_event
                opened.append(src)
        except BaseException:
            for src in opened:
                src.close()
            raise
        return opened

    def _monitors(self, options) -> list | None:
        """One drift monitor per stream, or None (off); an artifact without the calibration's drift
        reference raises `DriftUnavailableError` (runtime/monitor.py)."""
        if options is None:
            return None
        cascade = self.cascade
        return [monitor_for(cascade.artifact.calibration, cascade.num_exits, options, src.live) for src in self.sources]

    # -- events -----------------------------------------------------------------------------------
    def _reader_event(self, src, kind: str, message: str) -> None:
        self._record(src.source, kind, message)

    def _record(self, source: str, kind: str, message: str) -> None:
        self.events.append((time.perf_counter(), source, kind, message))
        if self._user_event is not None:
            self._user_event(source, kind, message)

    # -- running ----------------------------------------------------------------------------------
    def start(self) -> Streams:
        if not self._started:
            self._started = True
            self.t_start = time.perf_counter()
            for src in self.sources:
                src.start(self._new_frame)
        return self

    def stop(self) -> None:
        """Ask the iteration to end after the current tick (safe from another thread or a callback)."""
        self._stop = True
        self._new_frame.set()

    def __iter__(self) -> Iterator[StreamResult]:
        return self.results()

    def results(self, duration_s: float | None = None) -> Iterator[StreamResult]:
        """Results as they come, until every stream has ended (or reached ``max_frames``),
        ``duration_s`` has passed, or `stop` is called."""
        self.start()
        deadline = None if duration_s is None else time.perf_counter() + duration_s
        try:
            while not self._stop:
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                self._new_frame.clear()  # before taking, so a frame arriving meanwhile wakes the wait
                taken = self._take({})
                if taken and self.batch_window_s and len(taken) < len(self.sources):
                    taken = self._fill_window(taken)
                ready = sorted(taken.items())
                self._check_stalls()
                if not ready:
                    if self._all_done():
                        break
                    wait = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.perf_counter()))
                    self._new_frame.wait(wait)
                    continue
                yield from self._run_tick(ready)
        finally:
            self.t_end = time.perf_counter()

    def _take(self, taken: dict) -> dict:
        for i, src in enumerate(self.sources):
            if i in taken or (self.max_frames is not None and len(self._stats[i].e2e_ms) >= self.max_frames):
                continue
            frame = src.take()
            if frame is not None:
                taken[i] = frame
        return taken

    def _fill_window(self, taken: dict) -> dict:
        """Wait (up to the batch window) for the live streams that had no frame yet."""
        until = time.perf_counter() + self.batch_window_s
        waiting = [i for i, s in enumerate(self.sources) if i not in taken and s.live and s.status == "live"]
        while waiting and not self._stop:
            left = until - time.perf_counter()
            if left <= 0:
                break
            self._new_frame.clear()
            self._take(taken)
            waiting = [i for i in waiting if i not in taken]
            if waiting:
                self._new_frame.wait(left)
        return taken

    def run(self, callback: Callable[[StreamResult], None], duration_s: float | None = None) -> dict:
        """Call ``callback(result)`` for every result; return the summary."""
        for r in self.results(duration_s):
            callback(r)
        return self.summary()

    def _all_done(self) -> bool:
        for i, src in enumerate(self.sources):
            if self.max_frames is not None and len(self._stats[i].e2e_ms) >= self.max_frames:
                continue
            if not src.finished:
                return False
        return True

    def _check_stalls(self) -> None:
        now = time.perf_counter()
        for src, st in zip(self.sources, self._stats, strict=True):
            if not src.live or src.status in ("ended", "error"):
                continue
            last = src.last_capture if src.last_capture is not None else (self.t_start or now)
            stalled = now - last > self.stall_s
            if stalled and not st.stalled:
                self._record(src.source, "stalled", f"{src.source}: no frame for {now - last:.1f} s ({src.status})")
            elif st.stalled and not stalled:
                self._record(src.source, "resumed", f"{src.source}: frames again")
            st.stalled = stalled

    def _preprocess(self, taken) -> tuple[list, list, list[float]]:
        """(frames kept, their tensors, each one's preprocessing ms): the batch gets tensors, so each
        frame's own frame-to-tensor time is measured here; a corrupt or odd frame is reported and left
        out, the others go on."""
        good, rows, row_ms = [], [], []
        for i, frame in taken:
            t_row = time.perf_counter()
            try:
                rows.append(self._pre[self.sources[i].order](frame.image))
            except ValueError as e:
                self._bad_frame(i, e)
                continue
            row_ms.append((time.perf_counter() - t_row) * 1e3)
            good.append((i, frame))
        return good, rows, row_ms

    def _run_tick(self, taken) -> Iterator[StreamResult]:
        cascade = self.cascade
        self.ticks += 1
        self.batch_sizes.append(len(taken))
        good: list = []
        preds: list[Prediction] = []
        if self.batch:
            good, rows, row_ms = self._preprocess(taken)
            if rows:
                preds = self._batched.predict_batch(np.stack(rows))
                for pred, ms in zip(preds, row_ms, strict=True):
                    pred.preprocess_ms += ms  # predict_batch timed only its check of the tensors
                controller = cascade.controller
                if controller is not None:  # hold --budget as one source does: every frame's latency
                    new_plan = None
                    for p in preds:
                        new_plan = controller.observe(p.latency_ms) or new_plan
                    if new_plan is not None:
                        cascade.set_thresholds(new_plan)
        else:
            for i, frame in taken:
                c = self._per_order[self.sources[i].order]
                try:
                    preds.append(c.predict(frame.image, deadline_ms=self.deadline_ms))
                    good.append((i, frame))
                except ValueError as e:
                    self._bad_frame(i, e)
        done = time.perf_counter()
        self._watch(good, preds)
        for (i, frame), pred in zip(good, preds, strict=True):
            st = self._stats[i]
            e2e = (done - frame.capture_time) * 1e3
            st.e2e_ms.append(e2e)
            st.inference_ms.append(pred.latency_ms)
            st.preprocess_ms.append(pred.preprocess_ms)
            st.exits[pred.exit_index - 1] += 1
            if st.first_result is None:
                st.first_result = done
            st.last_result = done
            yield StreamResult(i, self.sources[i].source, frame.id, frame.capture_time, pred, done, frame.image)

    def _watch(self, good, preds) -> None:
        """Each stream's frames to its own monitor; a stream's first alarm is an event."""
        if self.drift is None:
            return
        plan = self.cascade.plan
        first_pos = plan.groups[0][1]
        for (i, _), pred in zip(good, preds, strict=True):
            if pred.first_confidence is None:  # a deadline stopped the cascade before the watched exit
                continue
            monitor = self.drift[i]
            before = monitor.alarm  # every frame is watched; only the first alarm is an event
            alarm = monitor.observe(first_pos, pred.first_confidence, pred.label, plan, level=pred.input_level)
            if alarm and not before:
                self._record(self.sources[i].source, "drift", alarm_message(self.sources[i].source, monitor.state()))

    def _bad_frame(self, i: int, e: Exception) -> None:
        src = self.sources[i]
        src.errors += 1
        src.last_error = f"bad frame: {e}"
        self._record(src.source, "error", f"{src.source}: frame skipped: {e}")

    # -- statistics -------------------------------------------------------------------------------
    def stream_stats(self) -> list[dict]:
        end = self.t_end or time.perf_counter()
        out = []
        for i, (src, st) in enumerate(zip(self.sources, self._stats, strict=True)):
            n = len(st.e2e_ms)
            # a stream that ended is measured over its own span, not the others' run
            stop = st.last_result if src.status == "ended" and st.last_result is not None else end
            wall = stop - (self.t_start or stop)
            # frames the app never saw: dropped by the reader while it worked on other frames
            seen = src.captured
            out.append(
                {
                    "source": src.source,
                    "live": src.live,
                    "status": "stalled" if st.stalled else src.status,
                    "frames": n,
                    "captured": seen,
                    "dropped": src.dropped,
                    "drop_rate": src.dropped / seen if seen else 0.0,
                    "fps": n / wall if wall > 0 else 0.0,
                    "e2e_latency_ms": run_summary(st.e2e_ms),
                    "inference_latency_ms": run_summary(st.inference_ms),
                    "preprocess_ms": run_summary(st.preprocess_ms),
                    "total_ms": run_summary(list(np.add(st.inference_ms, st.preprocess_ms))),
                    "exit_histogram": {str(k + 1): v for k, v in enumerate(st.exits)},
                    "reconnects": src.reconnects,
                    "errors": src.errors,
                    "last_error": src.last_error,
                    "drift": self.drift[i].state() if self.drift is not None else None,
                }
            )
        return out

    def summary(self) -> dict:
        """The `edgeexit run --json` summary: totals (as for one source) and ``streams``."""
        streams = self.stream_stats()
        inference = [v for st in self._stats for v in st.inference_ms]
        preprocess = [v for st in self._stats for v in st.preprocess_ms]
        e2e = [v for st in self._stats for v in st.e2e_ms]
        exits = [sum(st.exits[k] for st in self._stats) for k in range(self.cascade.num_exits)]
        wall = (self.t_end or time.perf_counter()) - (self.t_start or time.perf_counter())
        return {
            "frames": len(e2e),
            "exit_histogram": {str(k + 1): v for k, v in enumerate(exits)},
            "latency_ms": run_summary(inference),  # the cascade alone (Prediction.latency_ms)
            "preprocess_ms": run_summary(preprocess),
            "total_ms": run_summary(list(np.add(inference, preprocess))),
            "e2e_latency_ms": run_summary(e2e),
            "fps": len(e2e) / wall if wall > 0 else 0.0,
            "dropped": sum(s["dropped"] for s in streams),
            "batched": self.batch,
            "ticks": self.ticks,
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
            "backend": self.cascade.runner.info.name,
            "controller": self.cascade.controller.state() if self.cascade.controller is not None else None,
            "wall_s": wall,
            "source": [s["source"] for s in streams],
            "streams": streams,
            "events": [
                {"t_s": t - (self.t_start or t), "source": s, "kind": k, "message": m} for t, s, k, m in self.events
            ],
            "interrupted": self.interrupted,
        }

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and join every reader thread (idempotent). The cascade stays open: it is the caller's."""
        if self._closed:
            return
        self._closed = True
        self._stop = True
        for src in self.sources:  # every reader told first, so they wind down together
            request_stop = getattr(src, "request_stop", None)
            if request_stop is not None:
                request_stop()
        for src in self.sources:
            src.close()
        if self.t_end is None:
            self.t_end = time.perf_counter()

    def __enter__(self) -> Streams:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
