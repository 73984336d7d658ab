"""Small helpers shared by every job (no heavy imports)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^./]+\.(tmp|partial)$|^\.(?P<oname>.+)\.old-(?P<opid>\d+)$")


def temp_prefix(name: str) -> str:
    """Prefix of every temporary file or folder edgeexit makes for ``name``: ``.NAME.PID.`` — the
    writer's PID lets a later run tell an interrupted run's leftovers from a live run's files."""
    return f".{name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete what interrupted edgeexit runs left in ``folder`` (``.NAME.PID.*.tmp`` files,
    ``.NAME.PID.*.partial`` folders, ``.NAME.old-PID`` folders) whose process is gone; only for
    ``name`` when given. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if not m:
            continue
        owner, pid = (m["name"], m["pid"]) if m["name"] is not None else (m["oname"], m["opid"])
        if (name is not None and owner != name) or pid_alive(int(pid)) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """The one check every file edgeexit writes goes through (``atomic_write`` calls it): the target
    must be absent or a regular file, in a folder that can be written. A directory, a device node
    (``/dev/null``), a FIFO, a socket or a symlink to any of them is refused with a UserError, and
    nothing there is touched. Call it early (before the work) to fail fast; ``atomic_write`` calls it
    again just before writing."""
    from edgeexit.errors import UserError

    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise UserError(f"{what} {str(path)!r} is not a file name")
    try:
        st = os.stat(path)  # follows symlinks: what a write would replace or open
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise UserError(f"{what} {path}: a file is in the way of its folder") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be checked ({e.strerror or e})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise UserError(f"{what} {path} is {kind}: give a path to a regular file (nothing was written)")
    parent = path.parent
    probe = parent
    while not probe.exists():  # the first folder that exists must be a writable folder
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {probe} is not writable")
    return path


def check_input_file(
    path: str | os.PathLike, what: str = "input", root: str | os.PathLike | None = None, max_bytes: int | None = None
) -> Path:
    """The one check for a file edgeexit reads from a user or an artifact: it must be a regular file
    (a FIFO would block forever; a device or socket is refused), inside ``root`` when given (symlinks
    resolved: a link leaving the tree is refused), and at most ``max_bytes`` long. Raises UserError
    with one line naming the file; returns the path."""
    from edgeexit.errors import UserError

    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        )
        raise UserError(f"{what} {path} is {kind}: edgeexit reads regular files only")
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{what} {path} resolves outside {root} (a symlink?): refused")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} allowed")
    return path


def esc(value) -> str:
    """``str(value)`` with rich markup escaped: the one helper for putting a user- or file-supplied
    string (path, class name, option value, exception text) into a message printed with markup, so
    that it prints as given (``[/]`` neither crashes the printer nor ``[red]x.png`` loses a part)."""
    from rich.markup import escape

    return escape(str(value))


def atomic_write(path: str | os.PathLike, write, mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file in the same folder, fsync, then rename it over
    ``path``: readers never see half a file, and a crash leaves the old file (or none). The target is
    checked first (`check_output_path`: never a folder or a device), and the temporary files an
    interrupted (kill -9) writer of the same name left there are removed."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_output_path(path)  # still not a folder or device: one could have appeared meanwhile
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def _finite_tree(obj, path: str, found: list[str]):
    """``obj`` with every NaN/inf number replaced by None (paths appended to ``found``); objects JSON
    has no type for (numpy and torch scalars) are converted with ``float`` first."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, dict):
        return {k: _finite_tree(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_tree(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    value = obj if isinstance(obj, float) else float(obj)  # what json's default=float did: a TypeError stays one
    if math.isfinite(value):
        return value
    found.append(path or "(the value)")
    return None


def strict_json(payload, indent: int | None = 2, ensure_ascii: bool = True) -> str:
    """The one JSON writer (every --json, report and manifest edgeexit writes): JSON that every parser
    accepts. The rule for numbers JSON cannot hold: a NaN or an infinity is written as ``null``, and a
    one-line note on stderr names each field where that happened, so nothing fails at the end of a
    long run and nothing is silently dropped."""
    import sys

    found: list[str] = []
    clean = _finite_tree(payload, "", found)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        print(f"note: {len(found)} non-finite number(s) written as null (JSON has no NaN or infinity): {shown}",
              file=sys.stderr)  # fmt: skip
    text = json.dumps(clean, indent=indent, allow_nan=False, ensure_ascii=ensure_ascii)
    return text + "\n" if indent is not None else text


def atomic_write_json(path: str | os.PathLike, payload: dict) -> None:
    atomic_write_text(path, strict_json(payload))


def runnable_threads() -> int | None:
    """Threads runnable on this machine right now (the 4th field of /proc/loadavg), None elsewhere."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


class ContentionGuard:
    """Drops a CPU job to one thread while other processes want the cores, and back when they stop.

    Measured on the 2-core box (docs/lab-notebook.md, CPU contention): with two busy 2-thread neighbours,
    training with torch's 2 OpenMP threads fell from 395 to 28 img/s, because its workers spin-wait
    for time slices the neighbours hold; with 1 thread it ran at 106 img/s. Alone, 2 threads are
    fastest, so the guard only acts while someone else is running: it reads the number of runnable
    threads (cheap), subtracts its own, and switches after ``patience`` agreeing checks."""

    def __init__(self, get_threads, set_threads, patience: int = 3, reader=runnable_threads) -> None:
        self.get_threads, self.set_threads, self.reader = get_threads, set_threads, reader
        self.full = max(1, get_threads())
        self.patience = patience
        self.reduced = False
        self._streak = 0
        self.switches = 0

    def check(self) -> None:
        running = self.reader()
        if running is None or self.full == 1:
            return
        others = running - (1 if self.reduced else self.full)
        wants_change = others >= 1 if not self.reduced else others <= 0
        self._streak = self._streak + 1 if wants_change else 0
        if self._streak >= self.patience:
            self.reduced = not self.reduced
            self.set_threads(1 if self.reduced else self.full)
            self._streak = 0
            self.switches += 1


def load_untrusted(path: str | os.PathLike, what: str):
    """``torch.load(path, weights_only=True)`` with one-line errors: a file that holds pickled Python
    objects is refused by name (unpickling it could run code); anything unreadable says why."""
    import torch

    from edgeexit.errors import UserError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if glob:
            raise UserError(
                f"{path} contains a pickled Python object ({glob.group(1)}), not just tensors and plain data: "
                "edgeexit loads checkpoints with weights_only=True and refuses it, because unpickling it could run code"
            ) from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
        first = detail.group(1) if detail else (text.strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not a readable {what} ({shorten(first.strip())})") from None


def shorten(text: str, limit: int = 200) -> str:
    """At most ``limit`` characters, cut at a word and marked, never mid-word."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|us|µs|s|%)?\s*$")


def parse_budget(text: str | float) -> tuple[float | None, float | None]:
    """Every ``--budget`` (calibrate, run, quickstart): '5ms', '800us', '0.005s' → (ms, None); '50%' (of
    the full model's latency) → (None, 0.5). A number passed from Python is milliseconds; a string
    without a unit is refused, because '5' could mean 5 ms or 5 % and the two plans differ entirely."""
    from edgeexit.errors import UserError

    if isinstance(text, int | float):
        value, unit = float(text), "ms"
    else:
        m = _BUDGET.match(str(text))
        if not m:
            raise UserError(f"cannot read budget '{text}': write it like 5ms, 800us, 0.005s or 50%")
        if m.group(2) is None:
            raise UserError(
                f"budget '{text.strip()}' has no unit: write {m.group(1)}ms for a time per image or "
                f"{m.group(1)}% for a share of the full model's latency"
            )
        value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if not (math.isfinite(value) and 0 < value <= 10000):
            raise UserError(f"a budget in percent must be within (0%, 10000%], got '{text}'")
        return None, value / 100
    ms = value * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit]
    if not (math.isfinite(ms) and ms > 0):
        raise UserError(f"budget must be a positive finite time, got '{text}'")
    return ms, None


PROBE_BYTES = 64 * 1024  # an external tool's answer is a few lines; more than this is not an answer
PROBE_TEXT = 120  # characters of a probed value kept in a manifest or report


class ProbeOutput:
    """What an external command printed, decoded with errors replaced; ``complete`` is False when it
    was cut (too long or too slow) and ``returncode`` is None then."""

    def __init__(self, text: str, returncode: int | None, complete: bool) -> None:
        self.text, self.returncode, self.complete = text, returncode, complete


def run_probe(cmd: list[str], timeout_s: float = 5.0, max_bytes: int = PROBE_BYTES) -> ProbeOutput | None:
    """The one way edgeexit runs an external tool (nvpmodel, nvidia-smi, ...): its output is an
    untrusted input. At most ``max_bytes`` of stdout are read and at most ``timeout_s`` seconds
    waited; then the tool and anything it started are killed. Invalid UTF-8 becomes U+FFFD instead of
    an exception. None when it cannot be started."""
    import select
    import signal
    import subprocess
    import time

    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        )
    except (OSError, ValueError):
        return None
    buf, deadline, ended = bytearray(), time.monotonic() + timeout_s, False
    fd = proc.stdout.fileno()
    try:
        while len(buf) < max_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, min(65536, max_bytes - len(buf)))
            if not chunk:
                ended = True
                break
            buf += chunk
        rc = None
        if ended:
            try:
                rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
    finally:
        if proc.poll() is None or not ended:
            try:  # its own session: a shell script's children go too
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        proc.stdout.close()
    return ProbeOutput(bytes(buf).decode("utf-8", errors="replace"), rc, ended and rc is not None)


def bounded_text(value: str, limit: int = PROBE_TEXT) -> str:
    """A probed string fit for a manifest: control characters removed, at most ``limit`` characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(value)).strip()
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def _interrupt(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the summary short
    raise KeyboardInterrupt


class interrupt_between_frames:  # noqa: N801 — used as a context manager, named like one
    """While inside (main thread only): Ctrl-C and SIGTERM are noted, not raised where they land, and
    `check` raises KeyboardInterrupt at the next frame boundary. Raised where it lands, an interrupt can
    hit a finaliser (an ONNX Runtime session or an array freed mid-frame), where Python prints
    "Exception ignored in ..." with a traceback and drops it: the run went on as if Ctrl-C had not been
    pressed. A second signal before the boundary raises at once (a frame source that blocks).
    ``on_signal`` (called in the handler, so it must only set flags) tells a loop that cannot call
    `check` itself, such as `Streams.stop`."""

    def __init__(self, on_signal=None) -> None:
        self.on_signal = on_signal

    def __enter__(self):
        import signal
        import threading

        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.on_signal is not None:
            self.on_signal()

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class sigterm_as_interrupt:  # noqa: N801 — used as a context manager, named like one
    """While inside: SIGTERM (what systemd, `docker stop` and `kill` send) raises KeyboardInterrupt in
    the main thread, exactly as Ctrl-C does, so that `run` and `Streams` end either way with their
    summary and --json written. Off the main thread (where no handler can be set) it does nothing."""

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
