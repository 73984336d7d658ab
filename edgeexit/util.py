"""Small helpers shared by every job (no heavy imports)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^./]+\.(tmp|partial)$|^\.(?P<oname>.+)\.old-(?P<opid>\d+)$")


def temp_prefix(name: str) -> str:
    """Prefix of every temporary file or folder edgeexit makes for ``name``: ``.NAME.PID.`` — the
    writer's PID lets a later run tell an interrupted run's leftovers from a live run's files."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
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
        if (name is not None and owner != name) or _alive(int(pid)) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write(path: str | os.PathLike, write, mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file in the same folder, fsync, then rename it over
    ``path``: readers never see half a file, and a crash leaves the old file (or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def strict_json(payload) -> str:
    """JSON that every parser accepts: a NaN or an infinity anywhere is an error, not ``NaN``."""
    return json.dumps(payload, indent=2, default=float, allow_nan=False) + "\n"


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

    Measured on the 2-core box (docs/results.md, contention): with two busy 2-thread neighbours,
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
