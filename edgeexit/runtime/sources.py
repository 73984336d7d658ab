"""Frame sources for `edgeexit run`: a folder of images, a video file, or a camera index.

Video and camera frames come from OpenCV (the `camera` extra) in BGR order; image files are read
with OpenCV too when present, else with Pillow (RGB).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeexit.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("OpenCV is needed for video and camera sources: pip install 'edgeexit[camera]'") from None
    return cv2


def iter_frames(source: str) -> tuple[Iterator[tuple[str, np.ndarray]], str]:
    """(name, frame) pairs and the frames' channel order."""
    if not source.strip():
        raise UserError("--source is empty: give a folder of images, a video file or a camera index")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise UserError(f"{path} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        return _image_files(files), "RGB"
    if source.isdigit() or path.is_file():
        cv2 = _cv2()
        cap = cv2.VideoCapture(int(source) if source.isdigit() else str(path))
        if not cap.isOpened():
            what = f"camera {source}" if source.isdigit() else f"video {path}"
            raise UserError(f"cannot open {what}")
        ok, first = cap.read()
        if not ok:
            cap.release()
            raise UserError(f"cannot read a frame from {source}")
        return _capture(cap, first), "BGR"
    raise UserError(f"source '{source}' is not a folder, a video file or a camera index")


def _image_files(files) -> Iterator[tuple[str, np.ndarray]]:
    from PIL import Image

    for p in files:
        try:
            with Image.open(p) as im:
                frame = _to_uint8(p, im)
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e}") from None
        yield p.name, frame


def _to_uint8(path: Path, im) -> np.ndarray:
    """8-bit gray or RGB; 16-bit gray is scaled (not clipped) to 8 bits; other deep modes are refused."""
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode.startswith("I;16"):
        return (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
    if im.mode in ("I", "F", "I;32"):
        raise UserError(f"{path} is a {im.mode} (32-bit) image: convert it to 8-bit gray or RGB first")
    return np.asarray(im.convert("RGB"))


def _capture(cap, first) -> Iterator[tuple[str, np.ndarray]]:
    i, frame = 0, first
    try:
        while frame is not None:
            yield f"frame {i}", frame
            ok, frame = cap.read()
            i += 1
            if not ok:
                break
    finally:
        cap.release()


def run_source(
    cascade, source: str, max_frames: int | None = None, deadline_ms: float | None = None, save_video=None, echo=None
) -> dict:
    if max_frames is not None and max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {max_frames}")
    if deadline_ms is not None and not (math.isfinite(deadline_ms) and deadline_ms >= 0):
        raise UserError(f"--deadline-ms must be a finite number of milliseconds >= 0, got {deadline_ms}")
    frames, order = iter_frames(source)
    cascade = cascade.derive(input_order=order)
    writer = None
    exits: dict[str, int] = {str(k): 0 for k in range(1, cascade.num_exits + 1)}
    latencies, n, t_start = [], 0, time.perf_counter()
    try:
        for name, frame in frames:
            pred = cascade.predict(frame, deadline_ms=deadline_ms)
            n += 1
            exits[str(pred.exit_index)] += 1
            latencies.append(pred.latency_ms)
            if echo is not None:
                echo(
                    f"{name}: {pred.class_name} ({pred.confidence:.3f}) exit {pred.exit_index}/{cascade.num_exits} "
                    f"{pred.latency_ms:.3f} ms",
                    highlight=False,
                )
            if save_video is not None:
                writer = _annotate_and_write(writer, save_video, frame, pred, order)
            if max_frames and n >= max_frames:
                break
    finally:
        if writer is not None:
            writer.release()
    if n == 0:
        raise UserError(f"no frames read from {source}")
    lat = np.asarray(latencies)
    return {
        "frames": n,
        "exit_histogram": exits,
        "latency_ms": {
            "mean": float(lat.mean()),
            "p50": float(np.median(lat)),
            "p95": float(np.percentile(lat, 95)),
            "max": float(lat.max()),
        },
        "backend": cascade.backend_name,
        "controller": cascade.controller.state() if cascade.controller is not None else None,
        "wall_s": time.perf_counter() - t_start,
        "source": source,
    }


def _annotate_and_write(writer, path, frame, pred, order):
    cv2 = _cv2()
    img = frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if order == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    img = np.ascontiguousarray(img)
    if writer is None:
        h, w = img.shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (w, h))
        if not writer.isOpened():
            raise UserError(f"cannot write video {path}")
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

    t = Table(title=f"{summary['frames']} frames on {summary['backend']}")
    t.add_column("exit", justify="right")
    t.add_column("frames", justify="right")
    t.add_column("share", justify="right")
    for k, v in summary["exit_histogram"].items():
        t.add_row(k, str(v), f"{100 * v / summary['frames']:.1f}%")
    lat = summary["latency_ms"]
    t.caption = f"latency mean {lat['mean']:.3f} ms, p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms"
    ctrl = summary.get("controller")
    if ctrl:
        t.caption += (
            f"\nbudget {ctrl['budget_ms']:.3f} ms held by the controller: "
            f"plan {ctrl['plan_index'] + 1}/{ctrl['plans']} "
            f"(predicted {ctrl['predicted_ms']:.3f} ms), device slowdown {ctrl['slowdown']:.2f}×, "
            f"{ctrl['switches']} plan switches"
        )
    return t
