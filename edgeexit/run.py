"""`edgeexit run`: one folder or video read in order (`run_source`), or live and several sources as
streams (`run_streams`), with the per-frame lines, the `--jsonl` file, the annotated `--save-video` and
the rich summary tables (a job, like bench: the runtime gives it `Cascade`, the frame sources and
`Streams`; what is printed and how the command's options combine is decided here)."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from edgeexit.errors import UserError
from edgeexit.runtime.latency import run_summary
from edgeexit.runtime.monitor import alarm_message
from edgeexit.runtime.sources import RECONNECT_TRIES, check_pace, import_cv2, is_live, iter_frames
from edgeexit.runtime.streams import StreamResult, Streams
from edgeexit.util import interrupt_between_frames


def wants_streams(sources: list[str], realtime: bool, fps, duration_s, save_video) -> bool:
    """Whether `edgeexit run` goes through Streams (several, live or --realtime sources); refuses
    the options that do not mix."""
    check_pace(fps, duration_s)
    streamed = len(sources) > 1 or realtime or duration_s is not None or any(is_live(s) for s in sources)
    if streamed and save_video is not None:
        raise UserError("--save-video takes one folder or video file read in order, not live or several sources")
    if fps is not None and not realtime:
        raise UserError("--fps paces a video file played with --realtime; add --realtime")
    return streamed


class JsonLines:
    """`edgeexit run --jsonl FILE`: one JSON object per classified frame, each line flushed as it is
    written, so that a harness reading the file (or ``tail -f``) sees every frame when it is done and a
    killed run leaves every line it finished. ``cascade_ms`` is `Prediction.latency_ms` (the cascade
    alone), ``preprocess_ms`` the frame-to-tensor time, ``total_ms`` the two together."""

    def __init__(self, path) -> None:
        from edgeexit.util import check_output_path

        self.path = check_output_path(path, "--jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # closed by close()
        self.lines = 0

    def write(self, source: str, frame_index: int, pred, **extra) -> None:
        import json

        record = {
            "source": source,
            "frame": frame_index,
            "class": pred.class_name,
            "label": pred.label,
            "confidence": round(float(pred.confidence), 6),
            "exit": pred.exit_index,
            "preprocess_ms": round(float(pred.preprocess_ms), 4),
            "cascade_ms": round(float(pred.latency_ms), 4),
            "total_ms": round(float(pred.preprocess_ms + pred.latency_ms), 4),
            **({"deadline_hit": True} if pred.deadline_hit else {}),
            **extra,
        }
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_run_options(max_frames: int | None, deadline_ms: float | None) -> None:
    if max_frames is not None and max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {max_frames}")
    if deadline_ms is not None and not (math.isfinite(deadline_ms) and deadline_ms >= 0):
        raise UserError(f"--deadline-ms must be a finite number of milliseconds >= 0, got {deadline_ms}")


def run_source(
    cascade,
    source: str,
    max_frames: int | None = None,
    deadline_ms: float | None = None,
    save_video=None,
    echo=None,
    jsonl: JsonLines | None = None,
    warn=None,
) -> dict:
    """`edgeexit run` on one folder or video, every frame in order. A cascade loaded with ``drift``
    watches the frames; ``warn(message)`` is called once, at its first alarm."""
    _check_run_options(max_frames, deadline_ms)
    frames, order = iter_frames(source)
    cascade = cascade.derive(input_order=order)
    writer = None
    exits: dict[str, int] = {str(k): 0 for k in range(1, cascade.num_exits + 1)}
    latencies, preprocess, n, t_start = [], [], 0, time.perf_counter()
    drift, warned, interrupted = cascade.drift, False, False
    try:
        with interrupt_between_frames() as stop:
            for name, frame in frames:
                stop.check()
                pred = cascade.predict(frame, deadline_ms=deadline_ms)
                n += 1
                if drift is not None and not warned and drift.alarm:
                    warned = True
                    if warn is not None:
                        warn(alarm_message(source, drift.state()))
                exits[str(pred.exit_index)] += 1
                latencies.append(pred.latency_ms)
                preprocess.append(pred.preprocess_ms)
                _emit(jsonl, echo, source, n - 1, name, pred, cascade.num_exits)
                if save_video is not None:
                    writer = _annotate_and_write(writer, save_video, frame, pred, order)
                if max_frames and n >= max_frames:
                    break
            stop.check()  # a signal during the last frame still marks the run interrupted
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, at a frame boundary: the frames so far are the run
        if n == 0:
            raise
        interrupted = True
    finally:
        if writer is not None:
            writer.release()  # the video holds every frame answered, interrupted or not
    if n == 0:
        raise UserError(f"no frames read from {source}")
    return {
        "frames": n,
        "exit_histogram": exits,
        "latency_ms": run_summary(latencies),  # the cascade alone (Prediction.latency_ms)
        "preprocess_ms": run_summary(preprocess),
        "total_ms": run_summary(np.add(latencies, preprocess)),
        "backend": cascade.runner.info.name,
        "controller": cascade.controller.state() if cascade.controller is not None else None,
        "wall_s": time.perf_counter() - t_start,
        "source": source,
        "drift": drift.state() if drift is not None else None,
        "interrupted": interrupted,
    }


def _emit(jsonl, echo, source: str, index: int, name: str, pred, num_exits: int) -> None:
    if jsonl is not None:
        jsonl.write(source, index, pred, name=name)
    if echo is not None:
        echo(
            f"{name}: {pred.class_name} ({pred.confidence:.3f}) exit {pred.exit_index}/{num_exits} "
            f"{pred.latency_ms:.3f} ms (+ {pred.preprocess_ms:.3f} ms preprocessing)",
            highlight=False,
        )


class _Video:
    """The annotated video `run --save-video` writes. A container holds one frame size: a frame of
    another size (a folder of mixed images) is resized to the first frame's, and that is said once,
    so no frame is silently lost (OpenCV's writer drops frames whose size differs)."""

    def __init__(self, path, size: tuple[int, int]) -> None:
        cv2 = import_cv2()
        self.path, self.size, self.resized = path, size, 0
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
        if not self.writer.isOpened():
            raise UserError(f"cannot write video {path}")

    def write(self, img: np.ndarray) -> None:
        if (img.shape[1], img.shape[0]) != self.size:
            if self.resized == 0:
                print(f"note: frames of another size than the first ({self.size[0]}x{self.size[1]}) are resized to it "
                      f"in {self.path}", file=sys.stderr)  # fmt: skip
            self.resized += 1
            img = import_cv2().resize(img, self.size, interpolation=import_cv2().INTER_AREA)
        self.writer.write(img)

    def release(self) -> None:
        self.writer.release()


def _annotate_and_write(writer, path, frame, pred, order):
    cv2 = import_cv2()
    img = frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if order == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    img = np.ascontiguousarray(img)
    if writer is None:
        writer = _Video(path, (img.shape[1], img.shape[0]))
    cv2.putText(
        img,
        f"{pred.class_name} e{pred.exit_index} {pred.latency_ms:.1f}ms",
        (2, 12),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.35,
        (0, 255, 0),
        1,
    )
    writer.write(img)
    return writer


def summary_table(summary: dict):
    from rich.table import Table

    ended = " (interrupted)" if summary.get("interrupted") else ""
    t = Table(title=f"{summary['frames']} frames on {summary['backend']}{ended}")
    t.add_column("exit", justify="right")
    t.add_column("frames", justify="right")
    t.add_column("share", justify="right")
    for k, v in summary["exit_histogram"].items():
        t.add_row(k, str(v), f"{100 * v / summary['frames']:.1f}%")
    t.caption = timing_caption(summary)
    ctrl = summary.get("controller")
    if ctrl:
        t.caption += (
            f"\nbudget {ctrl['budget_ms']:.3f} ms held by the controller: "
            f"plan {ctrl['plan_index'] + 1}/{ctrl['plans']} "
            f"(predicted {ctrl['predicted_ms']:.3f} ms), device slowdown {ctrl['slowdown']:.2f}×, "
            f"{ctrl['switches']} plan switches"
        )
    return t


def timing_caption(summary: dict) -> str:
    """'cascade mean … p95 …; preprocessing mean …; frame in to answer out mean … p95 …' (the last two
    when the summary has them)."""
    lat = summary["latency_ms"]
    text = f"cascade mean {lat['mean']:.3f} ms, p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms"
    pre, total = summary.get("preprocess_ms"), summary.get("total_ms")
    if pre and pre.get("mean") is not None:
        text += f"; preprocessing mean {pre['mean']:.3f} ms, p95 {pre['p95']:.3f} ms"
    if total and total.get("mean") is not None:
        text += f"; frame in to answer out mean {total['mean']:.3f} ms, p95 {total['p95']:.3f} ms"
    return text


def streams_table(summary: dict):
    """A rich table: one row per stream."""
    from rich.table import Table

    t = Table(title=f"{len(summary['streams'])} streams on {summary['backend']}, {summary['wall_s']:.1f} s")
    for col in ("source", "status", "frames", "dropped", "fps", "e2e p50", "e2e p95", "e2e max", "infer p95", "exits"):
        t.add_column(col, justify="left" if col in ("source", "status", "exits") else "right", no_wrap=col != "exits")

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    for s in summary["streams"]:
        e2e, inf = s["e2e_latency_ms"], s["inference_latency_ms"]
        hist = " ".join(f"{k}:{v}" for k, v in s["exit_histogram"].items() if v)
        name = s["source"] if len(s["source"]) <= 28 else "…" + s["source"][-27:]
        t.add_row(
            name,
            s["status"],
            str(s["frames"]),
            f"{s['dropped']} ({100 * s['drop_rate']:.0f}%)",
            f"{s['fps']:.1f}",
            ms(e2e["p50"]),
            ms(e2e["p95"]),
            ms(e2e["max"]),
            ms(inf["p95"]),
            hist,
        )
    t.caption = (
        f"{summary['frames']} frames, {summary['fps']:.1f} frames/s in all; "
        f"{'batched' if summary['batched'] else 'frame by frame'}, mean batch {summary['mean_batch']:.2f}; "
        "latency in ms (e2e: capture to result)"
    )
    return t


def _result_line(r: StreamResult, num_exits: int) -> str:
    p = r.prediction
    return (
        f"{r.source} frame {r.frame_id}: {p.class_name} ({p.confidence:.3f}) exit {p.exit_index}/{num_exits} "
        f"{p.latency_ms:.3f} ms (+ {p.preprocess_ms:.3f} ms preprocessing), capture to result {r.e2e_ms:.1f} ms"
    )


def _no_frames(summary: dict) -> None:
    """A run that read nothing from any source is a user error naming each source's last error."""
    why = "; ".join(f"{s['source']}: {s['last_error'] or s['status']}" for s in summary["streams"])
    raise UserError(f"no frames read ({why})")


def run_streams(
    cascade, sources, realtime, fps, max_frames, deadline_ms, duration_s, quiet, out, err, jsonl=None, drift=None
) -> dict:
    """`edgeexit run` over live or several sources: one line per result for one stream, a live
    rich table for several; Ctrl-C ends the run with its summary (``interrupted``). ``jsonl``: a
    `JsonLines` that gets one line per result."""
    from rich.live import Live
    from rich.markup import escape

    def event(source, kind, message):
        err.print(f"[yellow]{kind}[/]: {escape(message)}", highlight=False)

    # a run bounded by frames ends even when a source that dropped never comes back
    tries = RECONNECT_TRIES if max_frames is not None else None
    streams = Streams(cascade, sources, realtime=realtime, fps=fps, deadline_ms=deadline_ms, max_frames=max_frames,
                      on_event=event, drift=drift, reconnect_tries=tries)  # fmt: skip
    several = len(streams.sources) > 1
    live = Live(streams_table(streams.summary()), console=out, auto_refresh=False) if several and not quiet else None
    try:
        with streams:
            if live is not None:
                live.start()
            _show_results(streams, duration_s, live, out, quiet, jsonl)
    except BaseException:
        if live is not None:
            live.stop()
        raise
    return _final_summary(streams, live, out)


def _show_results(streams: Streams, duration_s, live, out, quiet: bool, jsonl) -> None:
    """Every result to ``jsonl`` and to the screen: a line each for one stream, the live table (redrawn
    at most twice a second) for several. Ctrl-C or SIGTERM stops the streams after the tick under way
    (raised where it lands, it could hit a finaliser and be dropped), and the run is marked interrupted."""
    num_exits = streams.cascade.num_exits
    last = 0.0
    with interrupt_between_frames(on_signal=streams.stop) as stop:
        try:
            for r in streams.results(duration_s):
                if jsonl is not None:
                    jsonl.write(r.source, r.frame_id, r.prediction, capture_to_result_ms=round(r.e2e_ms, 3))
                if live is not None:
                    if r.result_time - last > 0.5:
                        live.update(streams_table(streams.summary()), refresh=True)
                        last = r.result_time
                elif not quiet:
                    out.print(_result_line(r, num_exits), highlight=False)
        except KeyboardInterrupt:  # a second signal, raised at once
            streams.interrupted = True
        streams.interrupted = streams.interrupted or stop.requested


def _final_summary(streams: Streams, live, out) -> dict:
    """The run's summary, with its last table (and the controller's, when a budget was held); a run
    that read no frame from any source, and was not interrupted, is a user error."""
    summary = streams.summary()
    if live is not None:
        live.update(streams_table(summary), refresh=True)
        live.stop()
    if summary["frames"] == 0 and not streams.interrupted:
        _no_frames(summary)
    if live is None:
        out.print(streams_table(summary))
    if summary["controller"]:
        out.print(summary_table(summary))
    return summary
