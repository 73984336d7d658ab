"""Frame sources for `edgeexit run`: a folder of images, a video file, a camera index or a stream URL.

Video and camera frames come from OpenCV (the `camera` extra) in BGR order; image files are read
with OpenCV too when present, else with Pillow (RGB).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeexit.errors import UserError

# The one list of image file suffixes: folder sources here, and ImageFolder datasets (edgeexit.data.folder).
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"})


def import_cv2():
    """OpenCV, or a one-line user error naming the extra that installs it."""
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
    cam = camera_index(source)
    if cam is not None or path.is_file():
        cv2 = import_cv2()
        cap = cv2.VideoCapture(cam if cam is not None else str(path))
        if not cap.isOpened():
            what = f"camera {source}" if cam is not None else f"video {path}"
            raise UserError(f"cannot open {what}")
        ok, first = cap.read()
        if not ok:
            cap.release()
            raise UserError(f"cannot read a frame from {source}")
        return _capture(cap, first), "BGR"
    raise UserError(f"source '{source}' is not a folder, a video file or a camera index")


SHOW_SKIPPED = 20  # per-file lines before the rest of a folder's skipped files are only counted


def _image_files(files) -> Iterator[tuple[str, np.ndarray]]:
    """A folder's frames by the input rules training applies (util.check_input_file): a FIFO, socket
    or device named like an image is never opened, and it, or a file that is not a usable image (corrupt,
    32-bit, a decompression bomb), is skipped with one line on stderr instead of blocking or ending the run."""
    import warnings

    from PIL import Image

    from edgeexit.util import check_input_file

    skipped = 0
    for p in files:
        try:
            check_input_file(p, "image")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    frame = to_uint8(p, im)
        except (UserError, OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            skipped += 1
            if skipped <= SHOW_SKIPPED:
                line = f"skipped: {e}" if isinstance(e, UserError) else f"skipped {p}: {type(e).__name__}: {e}"
                print(line, file=sys.stderr)
            continue
        yield p.name, frame
    if skipped > SHOW_SKIPPED:
        print(f"... and {skipped - SHOW_SKIPPED} more files skipped", file=sys.stderr)


def to_uint8(path: Path, im) -> np.ndarray:
    """A PIL image as the uint8 frame `run` classifies: 8-bit gray or RGB; 16-bit gray is scaled (not
    clipped) to 8 bits; other deep modes are refused. ImageFolder training decodes through it too
    (data/folder.py), so a model trains on the frames it will be run on."""
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


# -- live sources: a reader thread keeps only the newest frame ------------------------------------


class Frame:
    """One frame taken from a source: its number in that source, when it was captured
    (``time.perf_counter()`` seconds) and the image."""

    __slots__ = ("id", "capture_time", "image")

    def __init__(self, id: int, capture_time: float, image: np.ndarray) -> None:
        self.id, self.capture_time, self.image = id, capture_time, image


def is_url(source: str) -> bool:
    return source.split("://", 1)[0].lower() in ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp")


MAX_CAMERA_INDEX = 1023
# Failed tries in a row before a source that never gave a frame is given up: with the backoff
# (0.25 s doubling) about 4 s for a camera index with nothing behind it.
OPEN_TRIES = 5
# Failures in a row (the drop, then failed reopenings) before a source that gave frames is given up,
# when the run is bounded by frames (`run --max-frames`): about 40 s with the backoff (8 s at most).
RECONNECT_TRIES = 10


def camera_index(source: str) -> int | None:
    """'0'..'1023' (ASCII digits) → a camera index; anything else (a path, a URL) → None. Digits that
    are not ASCII ('²', '٣') are not an index, and an index past MAX_CAMERA_INDEX is refused."""
    if not (source.isascii() and source.isdigit()):
        return None
    if len(source) > 4 or int(source) > MAX_CAMERA_INDEX:
        raise UserError(f"--source {source}: a camera index is 0..{MAX_CAMERA_INDEX}")
    return int(source)


def is_live(source: str, realtime: bool = False) -> bool:
    """Camera indices and URLs are live; a video file is live when played ``realtime``; folders never."""
    if camera_index(source) is not None or is_url(source):
        return True
    return realtime and Path(source).is_file()


class LiveSource:
    """A camera, a stream URL or a video file played at its own frame rate, read by one thread.

    The thread keeps only the newest frame (stamped with its capture time); a frame not taken with
    `take` before the next one arrives is counted in ``dropped``, never queued. Camera and URL
    sources that fail or end are reopened with exponential backoff (``backoff_s``: first and largest
    wait); a video file ends at its last frame. A source that has not given a frame yet is given up
    (status error) after ``open_tries`` failed tries in a row: a camera index with no camera behind
    it, or a dead URL, ends the run instead of retrying forever. After its first frame a source is
    given up after ``reconnect_tries`` failures in a row, the drop and the failed reopenings after it
    (None: it reconnects for as long as it runs, as a camera app that lost its camera for a while
    expects). ``status`` is one of opening, live, reconnecting,
    ended, error; ``last_error`` says why. ``opener`` (tests, custom pipelines) returns an object
    with OpenCV's ``read()``, ``release()``, ``isOpened()`` and ``get()``.
    """

    def __init__(
        self,
        source: str,
        *,
        realtime: bool = False,
        fps: float | None = None,
        reconnect: bool | None = None,
        backoff_s: tuple[float, float] = (0.25, 8.0),
        read_timeout_s: float = 5.0,
        opener=None,
        on_event=None,
        open_tries: int | None = OPEN_TRIES,
        reconnect_tries: int | None = None,
    ) -> None:
        import threading

        check_pace(fps, None)
        self.source = source
        self.order = "BGR"
        self.live = True
        self.realtime = realtime
        self.fps = fps
        self.is_file = not (camera_index(source) is not None or is_url(source))
        self.reconnect = (not self.is_file) if reconnect is None else reconnect
        self.backoff_s = backoff_s
        self.open_tries, self.reconnect_tries = open_tries, reconnect_tries
        self._failures = 0  # failed tries in a row (reset by a frame)
        self._first_failure: float | None = None
        self.read_timeout_s = read_timeout_s
        self._opener = opener or self._open_cv2
        self.on_event = on_event
        self.status = "opening"
        self.last_error: str | None = None
        self.captured = self.dropped = self.taken = self.reconnects = self.errors = 0
        self.last_capture: float | None = None
        self._slot: Frame | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._new_frame = None  # a threading.Event shared with Streams, set on every new frame
        self._thread = threading.Thread(target=self._read_loop, name=f"edgeexit-source {source}", daemon=True)
        if self.is_file and opener is None and not Path(source).is_file():
            raise UserError(f"video {source} does not exist")

    # -- public ---------------------------------------------------------------------------------
    def start(self, new_frame=None) -> LiveSource:
        self._new_frame = new_frame
        self._thread.start()
        return self

    def take(self) -> Frame | None:
        """The newest frame not taken yet, or None."""
        with self._lock:
            frame, self._slot = self._slot, None
        if frame is not None:
            self.taken += 1
        return frame

    @property
    def finished(self) -> bool:
        """Ended or failed for good, with no frame left to take."""
        return self.status in ("ended", "error") and self._slot is None

    def request_stop(self) -> None:
        self._stop.set()

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the reader and join it (it wakes from any wait at once; a blocking read returns
        within ``read_timeout_s``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.read_timeout_s + 1.0 if timeout_s is None else timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the reader thread ------------------------------------------------------------------------
    def _event(self, kind: str, message: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(self, kind, message)
            except Exception:  # a reporting callback never kills the reader
                pass

    def _open_cv2(self):
        cv2 = import_cv2()
        cam = camera_index(self.source)
        src = cam if cam is not None else self.source
        params = []
        for name, value in (
            ("CAP_PROP_OPEN_TIMEOUT_MSEC", self.read_timeout_s * 1000),
            ("CAP_PROP_READ_TIMEOUT_MSEC", self.read_timeout_s * 1000),
        ):
            if hasattr(cv2, name) and not self.is_file:
                params += [getattr(cv2, name), int(value)]
        cap = cv2.VideoCapture(src, cv2.CAP_ANY, params) if params else cv2.VideoCapture(src)
        if cap.isOpened() and cam is not None:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: do not let the driver queue old frames
        return cap

    def _wait(self, seconds: float) -> bool:
        """Sleep unless closed; True when closed."""
        return self._stop.wait(seconds) if seconds > 0 else self._stop.is_set()

    def _read_loop(self) -> None:  # noqa: C901
        delay = self.backoff_s[0]
        cap = None
        while not self._stop.is_set():
            if cap is None:
                try:
                    cap = self._opener()
                    if not cap.isOpened():
                        raise OSError(f"cannot open {self.source}")
                except Exception as e:
                    cap = None
                    if not self._give_up_or_wait(f"{e}", delay):
                        return
                    delay = min(delay * 2, self.backoff_s[1])
                    continue
                interval = self._interval(cap)
                next_t = time.perf_counter()
                if self.status != "opening":
                    self._event("reconnected", f"{self.source}: reconnected")
                self.status = "live"
            failed = False
            try:
                ok, image = cap.read()
            except Exception as e:  # a corrupt frame or a driver error
                ok, image, failed = False, None, True
                self.errors += 1
                self.last_error = f"read failed: {e}"
            if not ok or image is None:
                self._release(cap)
                cap = None
                if self.is_file and not self.reconnect and not failed:
                    self.status = "ended"
                    self._event("ended", f"{self.source}: ended after {self.captured} frames")
                    self._notify()
                    return
                if not self._give_up_or_wait(self.last_error or "stream ended or dropped", delay):
                    return
                delay = min(delay * 2, self.backoff_s[1])
                continue
            delay = self.backoff_s[0]
            if interval:
                next_t += interval
                now = time.perf_counter()
                if next_t > now:
                    if self._wait(next_t - now):
                        break
                else:
                    next_t = now  # decoding fell behind: never burst to catch up
            self._publish(image)
        self._release(cap)

    def _interval(self, cap) -> float:
        if not (self.is_file and self.realtime):
            return 0.0  # a camera or a stream paces itself
        fps = self.fps
        if fps is None:
            try:
                fps = float(cap.get(5))  # cv2.CAP_PROP_FPS
            except Exception:
                fps = 0.0
            if not (math.isfinite(fps) and fps > 0):
                fps = 30.0
        return 1.0 / fps

    def _give_up_or_wait(self, why: str, delay: float) -> bool:
        """After a failure: False (status error) when this source does not reconnect or has failed
        its tries in a row, else wait."""
        self.last_error = why
        self._failures += 1
        if self._first_failure is None:
            self._first_failure = time.perf_counter()
        limit = self.open_tries if self.captured == 0 else self.reconnect_tries
        gave_up = self.reconnect and limit is not None and self._failures >= limit
        if gave_up:
            self.last_error = why = self._gave_up(why)
        if not self.reconnect or gave_up:
            self.status = "error"
            self._event("error", f"{self.source}: {why}")
            self._notify()
            return False
        self.status = "reconnecting"
        self.reconnects += 1
        limit = self.open_tries if self.captured == 0 else self.reconnect_tries
        of = f" (try {self._failures + 1} of {limit})" if limit is not None else ""
        self._event("reconnecting", f"{self.source}: {why}; reconnecting in {delay:.2g} s{of}")
        return not self._wait(delay)

    def _gave_up(self, why: str) -> str:
        spent = time.perf_counter() - (self._first_failure or time.perf_counter())
        tries = f"{self._failures} tries in {spent:.1f} s"
        cam = camera_index(self.source)
        if cam is not None and self.captured == 0:
            return (f"camera {cam} did not open ({tries}; {why}): `edgeexit doctor` lists the cameras this "
                    "machine can open")  # fmt: skip
        if self.captured == 0:
            return f"{self.source} did not open ({tries}): {why}"
        return f"{self.source} did not come back ({tries}): {why}"

    def _publish(self, image: np.ndarray) -> None:
        self._failures, self._first_failure = 0, None
        now = time.perf_counter()
        frame = Frame(self.captured, now, image)
        with self._lock:
            if self._slot is not None:
                self.dropped += 1
            self._slot = frame
            self.captured += 1
            self.last_capture = now
        self._notify()

    def _notify(self) -> None:
        if self._new_frame is not None:
            self._new_frame.set()

    @staticmethod
    def _release(cap) -> None:
        if cap is not None:
            try:
                cap.release()
            except Exception:
                pass


class OrderedSource:
    """A folder of images or a video file read in order, every frame, in the caller's thread."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.live = False
        self._frames, self.order = iter_frames(source)
        self.status = "live"
        self.last_error: str | None = None
        self.captured = self.dropped = self.taken = self.reconnects = self.errors = 0
        self.last_capture: float | None = None
        self._done = False

    def start(self, new_frame=None) -> OrderedSource:
        return self

    def take(self) -> Frame | None:
        if self._done:
            return None
        try:
            _, image = next(self._frames)
        except StopIteration:
            self._done, self.status = True, "ended"
            return None
        except UserError as e:  # an unreadable image: report it, go on with the next
            self.errors += 1
            self.last_error = str(e)
            return None
        now = time.perf_counter()
        frame = Frame(self.captured, now, image)
        self.captured += 1
        self.taken += 1
        self.last_capture = now
        return frame

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def alive(self) -> bool:
        return False

    def close(self, timeout_s: float | None = None) -> None:
        if not self._done:
            self._done = True
            close = getattr(self._frames, "close", None)
            if close is not None:
                close()  # releases the VideoCapture (the generator's finally)


FPS_RANGE = (0.01, 10_000.0)  # one frame per 100 s .. a high-speed camera; beyond, the pacing sleep breaks
MAX_DURATION_S = 366 * 86400.0


def check_pace(fps, duration_s) -> None:
    """--fps within FPS_RANGE and --duration a positive finite number of seconds (None: not given).
    NaN, infinity and 1e-300 are refused here: a reader thread would otherwise die on the sleep while
    its stream stays "live", and a NaN duration would never end."""
    lo, hi = FPS_RANGE
    if fps is not None and not (isinstance(fps, int | float) and math.isfinite(fps) and lo <= fps <= hi):
        raise UserError(f"--fps must be within {lo:g}..{hi:g} frames per second, got {fps}")
    if duration_s is not None and not (
        isinstance(duration_s, int | float) and math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S
    ):
        raise UserError(f"--duration must be a positive finite number of seconds, got {duration_s}")


def open_source(
    source: str, realtime: bool = False, fps: float | None = None, on_event=None, reconnect_tries: int | None = None
):
    """A `LiveSource` (camera index, URL, or video file with ``realtime``) or an `OrderedSource`.
    ``reconnect_tries``: see `LiveSource` (None: a live source that dropped reconnects for as long as it runs)."""
    if not source.strip():
        raise UserError("--source is empty: give a folder of images, a video file, a camera index or a URL")
    if is_live(source, realtime):
        return LiveSource(source, realtime=realtime, fps=fps, on_event=on_event, reconnect_tries=reconnect_tries)
    if fps is not None and Path(source).is_file():
        raise UserError("--fps paces a video file played with --realtime; add --realtime")
    return OrderedSource(source)
