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
