"""The decoded-image cache as a verified store: what ``edgeexit.data.folder`` decodes into and maps.

A cache folder may be shared (torchrun ranks, nodes on one filesystem, other users), so what is
found in it is checked before it is used:

- **No link is followed.** Every name in the folder (``<key>.lock``, ``<key>.u8``, ``<key>.json``,
  temporary files) is opened relative to the folder with ``O_NOFOLLOW``, new files with
  ``O_EXCL``. A link planted there is refused (exit 2) and nothing is created or read through it.
- **What the rows were decoded from.** The meta records a digest of the file list as decoded:
  relative path, size, mtime, ctime and inode of every image. A cache renamed to another set's
  key, or images replaced with the same size and mtime (``cp -p``, ``rsync -t``), no longer match,
  and the set is decoded again.
- **That the rows are still what was written.** The meta records a CRC-32 of every ``CHUNK_ROWS``
  rows and the data file's size, mtime, ctime and inode. Every open compares that stat (cheap); the
  checksums are all read when it differs (the file was written after it was built), when a dead
  builder's leftovers were found in the folder (a crash), or when asked (``EDGEEXIT_VERIFY_CACHE=1``).
  Rows that fail are decoded again.
- **Malformed meta** (not JSON, wrong types, wrong lengths) is decoded again with a one-line note.
- **A read-only folder** holding a finished cache is used as it is; one that would need a build is
  a one-line error naming ``--cache-dir``.
- **Leftovers** of any dead builder (its PID gone and its key's lock free) are removed by the next
  open, whatever key that open is for.

Not defended against: someone with write access to the folder who writes a consistent forgery
(rows, and meta with matching digest and checksums). The checks find accidents, stale copies,
renames and in-place damage, not forgeries; keep a cache folder writable only by whom you trust.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import stat
import time
import zlib
from pathlib import Path

import numpy as np

from edgeexit.errors import UserError
from edgeexit.util import pid_alive

CACHE_VERSION = 2  # of the meta's format (folder.CACHE_VERSION is of the key's formula)
CHUNK_ROWS = 64  # rows per checksum: a damaged chunk is found, and the check streams the file once
VERIFY_ENV = "EDGEEXIT_VERIFY_CACHE"
META_MAX_BYTES = 256 * 1024 * 1024
_READ_ONLY = (errno.EACCES, errno.EROFS, errno.EPERM)


def _say(console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def files_digest(root: Path, files) -> str:
    """Digest of what the rows are decoded from: every image's relative path, size, mtime, ctime
    and inode (``files`` as ``folder.index_image_folder`` lists them)."""
    prefix = str(Path(root)) + os.sep  # the index lists root/<class>/...: cut the prefix (relpath costs 10x)
    rows = [os.path.realpath(root)]
    for p, size, mtime_ns, ctime_ns, inode in files:
        rel = p[len(prefix) :] if p.startswith(prefix) else os.path.relpath(p, root)
        rows.append(f"{rel}\0{size}\0{mtime_ns}\0{ctime_ns}\0{inode}")
    return hashlib.sha256("\n".join(rows).encode("utf-8", "surrogateescape")).hexdigest()


def row_checksums(rows: np.ndarray) -> list[int]:
    """CRC-32 of every CHUNK_ROWS rows (zlib's is ~1.7 GB/s on one core of the 2-core EPYC VM)."""
    return [zlib.crc32(rows[s : s + CHUNK_ROWS]) for s in range(0, len(rows), CHUNK_ROWS)]


def data_stat(st: os.stat_result) -> list[int]:
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


# ------------------------------------------------------------------------------- opening names


def open_in(dfd: int, folder: Path, name: str, flags: int, mode: int = 0o644) -> int:
    """``name`` in the folder open as ``dfd``, never through a link; a link or a non-regular file
    (FIFO, device) there is a UserError. OSErrors other than those are raised as they are."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(
                f"{folder / name} is a symbolic link: edgeexit never follows a link inside its cache folder "
                "(remove it, or pass another --cache-dir)"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{folder / name} is not a regular file: remove it, or pass another --cache-dir")
    return fd


def _lock(dfd: int, folder: Path, key: str, console, root) -> int | None:
    """The key's build lock, held exclusively; None in a read-only folder without one (nobody can
    build there, so nothing can change under us)."""
    try:
        fd = open_in(dfd, folder, f"{key}.lock", os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise UserError(f"cannot open {folder / (key + '.lock')}: {e.strerror}; pass another --cache-dir") from None
        try:
            fd = open_in(dfd, folder, f"{key}.lock", os.O_RDONLY)
        except FileNotFoundError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say(console, f"waiting for another process to finish decoding {root} into {folder}")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_leftovers(dfd: int, folder: Path) -> list[str]:
    """Remove the temporary files of every dead builder in the folder, whatever its key: the
    writer's PID (in the name) is gone and its key's lock is free (so no builder on another node
    sharing the folder owns it either). Returns the names removed."""
    from edgeexit.util import _TEMP

    removed = []
    for name in os.listdir(dfd):
        m = _TEMP.match(name)
        if not m or m["name"] is None or pid_alive(int(m["pid"])):
            continue
        key = m["name"].split(".", 1)[0]
        try:
            lock = os.open(f"{key}.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            lock = None  # no lock file: no builder of that key exists
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):  # unlinking a link never touches its target
                os.unlink(name, dir_fd=dfd)
                removed.append(name)
        except OSError:
            pass  # held by a live builder, gone meanwhile, or not ours to remove: left alone
        finally:
            if lock is not None:
                os.close(lock)
    return removed


# ------------------------------------------------------------------------------------ the meta


def _int_list(v, lo: int, hi: int, length: int) -> bool:
    return isinstance(v, list) and len(v) == length and all(type(x) is int and lo <= x <= hi for x in v)


def _num_list(v, length: int) -> bool:
    return isinstance(v, list) and len(v) == length and all(type(x) in (int, float) and math.isfinite(x) for x in v)


def meta_problem(d, n: int, shape, digest: str) -> str | None:
    """Why ``d`` is not the meta of a finished cache of these files at this shape (None: it is)."""
    if not isinstance(d, dict):
        return "it is not a JSON object"
    if type(d.get("version")) is not int or d["version"] != CACHE_VERSION:
        return f"it is not format {CACHE_VERSION}"
    if d.get("shape") != list(shape):
        return "it is for another image count or size"
    if d.get("files") != digest:
        return "it was decoded from other files (a renamed cache, or images replaced since)"
    if not _int_list(d.get("ok"), 0, 1, n):
        return "its 'ok' list is malformed"
    for k in ("mean", "std"):
        if not _num_list(d.get(k), shape[1]) or (k == "std" and min(d[k]) <= 0):
            return f"its '{k}' is malformed"
    bad = d.get("bad")
    if not (isinstance(bad, list) and all(isinstance(b, list) and len(b) == 2 for b in bad)):
        return "its 'bad' list is malformed"
    if not all(isinstance(s, str) for b in bad for s in b) or len(bad) != n - sum(d["ok"]):
        return "its 'bad' list does not match its 'ok' list"
    if d.get("chunk_rows") != CHUNK_ROWS or not _int_list(d.get("checksums"), 0, 2**32 - 1, -(-n // CHUNK_ROWS)):
        return "its checksums are malformed"
    if not _int_list(d.get("data_stat"), 0, 2**64, 4):
        return "its data_stat is malformed"
    return None


def read_meta(dfd: int, folder: Path, key: str, n: int, shape, digest: str) -> tuple[dict | None, str | None]:
    """(meta, None) for a usable meta; (None, why) for one that is not; (None, None) for none."""
    try:
        fd = open_in(dfd, folder, f"{key}.json", os.O_RDONLY)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"it cannot be read ({e.strerror})"
    with open(fd, "rb") as f:
        raw = f.read(META_MAX_BYTES + 1)
    if len(raw) > META_MAX_BYTES:
        return None, f"it is larger than {META_MAX_BYTES >> 20} MB"
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):
        return None, "it is not JSON"
    why = meta_problem(d, n, shape, digest)
    return (None, why) if why else (d, None)


# ---------------------------------------------------------------------------------- open / build


def _map(fd: int, shape) -> np.memmap:
    with open(fd, "rb") as f:  # the mapping keeps its own reference to the file
        return np.memmap(f, dtype=np.uint8, mode="c", shape=tuple(shape))  # copy-on-write: never written back


def _first_bad_chunk(mm: np.ndarray, sums: list[int]) -> int | None:
    for i, s in enumerate(row_checksums(mm)):
        if s != sums[i]:
            return i
    return None


def _usable(dfd, folder, key, shape, d: dict, full: bool, console) -> np.memmap | None:
    """The mapped rows of a cache whose meta is usable, checked: the data file's stat against the
    meta (always), every chunk's checksum (when ``full`` or the stat differs). None: decode again."""
    try:
        fd = open_in(dfd, folder, f"{key}.u8", os.O_RDONLY)
    except FileNotFoundError:
        _say(console, f"note: the decoded cache {key} has lost its data file: decoding again")
        return None
    st = os.fstat(fd)
    if st.st_size != int(np.prod(shape)):
        os.close(fd)
        _say(console, f"note: the decoded cache {key} has a data file of the wrong size: decoding again")
        return None
    mm = _map(fd, shape)
    changed = data_stat(st) != d["data_stat"]
    if not (full or changed):
        return mm
    t0 = time.perf_counter()
    bad = _first_bad_chunk(mm, d["checksums"])
    if bad is not None:
        rows = f"{bad * CHUNK_ROWS}-{min(shape[0], (bad + 1) * CHUNK_ROWS) - 1}"
        _say(console, f"note: rows {rows} of the decoded cache {key} do not match their checksums: decoding again")
        return None
    seconds = time.perf_counter() - t0
    _say(console, f"checked the decoded cache's checksums ({mm.nbytes / 1e9:.1f} GB in {seconds:.1f} s)")
    if changed and os.access(folder, os.W_OK):  # the rows are intact: record the new stat, the next open is cheap
        _write_meta(folder, key, dict(d, data_stat=data_stat(st)))
    return mm


def _write_meta(folder: Path, key: str, d: dict) -> None:
    from edgeexit.util import atomic_write_text

    atomic_write_text(folder / f"{key}.json", json.dumps(d))  # write-then-rename: never a half meta


def _build(dfd, folder: Path, key: str, shape, digest: str, decode) -> tuple[np.memmap, dict]:
    """Decode into a new temporary file (O_EXCL), fsync, rename it into place, then write the meta
    last: its presence means the rows are complete and on disk."""
    from edgeexit.util import temp_prefix

    nbytes = int(np.prod(shape))
    tmp = f"{temp_prefix(key + '.u8')}build.tmp"
    fd = open_in(dfd, folder, tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    try:
        try:  # reserve the space now: a full disk is a clear error here, not a SIGBUS mid-decode
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise UserError(
                    f"cannot reserve {nbytes / 1e9:.1f} GB for the decoded images in {folder}: "
                    f"{e.strerror}; free space or pass --cache-dir"
                ) from None
            os.ftruncate(fd, nbytes)
        ok, mean, std, bad = decode(str(folder / tmp))
        os.fsync(fd)
        os.replace(tmp, f"{key}.u8", src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    mm = _map(fd, shape)
    st = os.stat(f"{key}.u8", dir_fd=dfd, follow_symlinks=False)
    d = {"version": CACHE_VERSION, "shape": list(shape), "files": digest, "ok": ok.astype(int).tolist(),
         "mean": mean, "std": std, "bad": [list(b) for b in bad], "chunk_rows": CHUNK_ROWS,
         "checksums": row_checksums(mm), "data_stat": data_stat(st), "created": time.time()}  # fmt: skip
    _write_meta(folder, key, d)
    return mm, d


def open_cache(folder: Path, key: str, digest: str, shape, decode, console, root) -> tuple[np.memmap, dict, bool]:
    """(rows mapped copy-on-write, meta, built now) of ``key`` in ``folder``: checked as the module
    says, built with ``decode(target path) -> (ok, mean, std, bad)`` when there is no usable one."""
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot open the decoded-image cache {folder}: {e.strerror}; pass --cache-dir") from None
    try:
        crashed = bool(remove_leftovers(dfd, folder))
        lock = _lock(dfd, folder, key, console, root)
        try:
            d, why = read_meta(dfd, folder, key, shape[0], shape, digest)
            full = crashed or os.environ.get(VERIFY_ENV, "") not in ("", "0")
            mm = _usable(dfd, folder, key, shape, d, full, console) if d is not None else None
            if mm is not None:
                return mm, d, False
            if why:
                _say(console, f"note: the decoded cache {key} in {folder} is not used, {why}: decoding again")
            if lock is None or not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(
                    f"the decoded-image cache {folder} is read-only and holds no finished cache of {root} at this "
                    "size: pass a writable --cache-dir"
                )
            return (*_build(dfd, folder, key, shape, digest, decode), True)
        finally:
            if lock is not None:
                os.close(lock)
    finally:
        os.close(dfd)
