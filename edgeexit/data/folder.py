"""ImageFolder at camera scale: a bounded index, parallel decode, and a decoded-once uint8 cache.

- **Index** (``index_image_folder``): class folders directly under the root, images up to
  ``MAX_DEPTH`` folder levels below each. The walk is bounded: a class folder whose first
  ``NO_IMAGE_LIMIT`` entries hold no image ends it (``--data /`` is refused in milliseconds, not
  after scanning the filesystem). Entries are checked with ``lstat`` before anything is opened:
  a FIFO, socket or device named like an image, and a symlink that leads out of the root, are
  refused (exit 2) — nothing blocks and nothing outside the tree is read.
- **Decode** (``decode_file``): Pillow, converted to 8 bits exactly as ``edgeexit run`` converts
  a frame (``runtime.sources.to_uint8``: 16-bit scaled, palette/CMYK/alpha to RGB), then resized by
  ``runtime.preprocessing.resize_uint8``. Files that cannot be used (zero bytes, corrupt, truncated,
  more than ``MAX_PIXELS`` pixels, 32-bit, animated) are *bad*: skipped with a one-line message
  each, or, with ``strict``, the first one is an error naming it (docs/cli.md, "Bad images").
- **Where the decoded images live**: up to ``IN_MEMORY_BYTES`` decoded, in a plain in-memory
  tensor (as before); above it, in a memory-mapped uint8 file (``<cache>/<key>.u8`` + ``.json``),
  decoded once and keyed by the file list, sizes, mtimes, resolution and channels. The page cache
  does the I/O, so resident memory is file-backed and reclaimable, not anonymous. Decoding runs
  in one worker process per core, each writing its rows straight into the file. The cache folder
  is a verified store (``edgeexit.data.cache_store``): no link in it is followed, the meta records
  what the rows were decoded from and their checksums, and what fails a check is decoded again.
- **Many processes** (torchrun ranks, several nodes on a shared filesystem): the cache is built
  under an exclusive ``flock`` on ``<key>.lock``; whoever gets it first decodes, the others wait
  and then map the finished file. Nothing is decoded twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from edgeexit.errors import UserError
from edgeexit.runtime.sources import IMAGE_EXTS  # the one list: what `run` reads from a folder, too

MAX_DEPTH = 4  # folder levels read below a class folder (class/a/b/c/d/image.jpg)
NO_IMAGE_LIMIT = 10_000  # entries of a class folder examined before "this is not an ImageFolder"
MAX_PIXELS = 64_000_000  # a larger image is a decompression bomb (64 MP; a 4K frame is 8.3 MP)
MAX_FILE_BYTES = 256 * 1024 * 1024
IN_MEMORY_BYTES = 256 * 1024 * 1024  # decoded sizes up to this stay in memory, above: the mmap cache
CACHE_VERSION = 1
CHUNK = 64  # images per decode task
SHOW_BAD = 20  # per-file messages printed before the rest are only counted


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _say(console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # file and class names print as given


# ---------------------------------------------------------------------------------------- index


def _inside(path: Path, root_real: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(root_real)
        return True
    except ValueError:
        return False


def check_entry(path: Path, root_real: Path) -> os.stat_result:
    """stat of an image entry, refusing (UserError) what must never be opened: anything that is not
    a regular file (FIFO, socket, device) and a symlink leading out of the tree — the project's one
    input-file check, ``util.check_input_file``."""
    from edgeexit.util import check_input_file

    check_input_file(path, "image", root=root_real)
    return os.stat(path)


def _walk_class(folder: Path, root_real: Path, progress) -> tuple[list[tuple[str, int, int]], int]:
    """Images under one class folder: [(path, size, mtime_ns, ctime_ns, inode)], sorted, and the number of folders
    deeper than MAX_DEPTH that were not read."""
    found, seen, too_deep = [], 0, 0
    stack = [(folder, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise UserError(f"cannot read folder {d}: {e.strerror or e}") from None
        for e in entries:
            seen += 1
            if not found and seen > NO_IMAGE_LIMIT:
                raise UserError(
                    f"{folder.parent} is not an ImageFolder: its class folder '{folder.name}' holds no image in its "
                    f"first {NO_IMAGE_LIMIT:,} entries (expected <root>/<class>/<image files>)"
                )
            p = Path(e.path)
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_DEPTH:
                    too_deep += 1
                else:
                    stack.append((p, depth + 1))
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            st = check_entry(p, root_real)
            found.append((str(p), int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)))
            if progress is not None and len(found) % 1000 == 0:
                progress()
    found.sort()
    return found, too_deep


def _class_folders(root: Path, root_real: Path) -> list[str]:
    """The class folders directly under ``root``, sorted; a symlink leading out of it is refused."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot read {root}: {e.strerror or e}") from None
    classes = []
    for e in entries:
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=True):
            continue
        if e.is_symlink() and not _inside(Path(e.path), root_real):
            raise UserError(
                f"class folder {e.path} is a symlink to {os.path.realpath(e.path)}, outside {root}: refused"
            )
        classes.append(e.name)
    if not classes:
        raise UserError(f"{root} has no class folders (expected {root}/<class>/<image files>)")
    return classes


def index_image_folder(root: str | os.PathLike, console=None):
    """(class names, [(path, size, mtime_ns, ctime_ns, inode)], labels) of an ImageFolder, by a bounded walk."""
    root = Path(root)
    root_real = Path(os.path.realpath(root))
    classes = _class_folders(root, root_real)
    console = console or _console()
    t0, count = time.perf_counter(), [0]
    status = console.status("indexing", spinner="dots") if console.is_terminal else None
    if status is not None:
        status.start()

    def tick():
        count[0] += 1000
        if status is not None:
            rate = count[0] / max(1e-9, time.perf_counter() - t0)
            status.update(f"indexing: {count[0]:,} images ({rate:,.0f}/s)")

    files, labels, too_deep = [], [], 0
    try:
        for i, c in enumerate(classes):
            found, deep = _walk_class(root / c, root_real, tick)
            if not found:
                raise UserError(
                    f"{root} is not an ImageFolder: class folder '{c}' has no images "
                    f"({', '.join(sorted(IMAGE_EXTS))}, up to {MAX_DEPTH} folders deep)"
                )
            files += found
            labels += [i] * len(found)
            too_deep += deep
    finally:
        if status is not None:
            status.stop()
    if too_deep:
        _say(console, f"note: {too_deep} folder(s) more than {MAX_DEPTH} levels inside a class folder were not read")
    return classes, files, labels


# --------------------------------------------------------------------------------------- decode


class BadImage(Exception):
    """A file that cannot be used as a training image (the message says why)."""


def decode_file(path: str, size: list[int], in_chans: int) -> np.ndarray:
    """One image file as uint8 (C, H, W) at ``size``, converted as ``edgeexit run`` converts a
    frame. Raises BadImage for a file that cannot be used."""
    from PIL import Image

    from edgeexit.runtime.preprocessing import DEFAULT_RESIZE, frame_to_input_uint8
    from edgeexit.runtime.sources import to_uint8  # the run-time conversion itself

    try:
        if os.path.getsize(path) == 0:
            raise BadImage("zero bytes")
        if os.path.getsize(path) > MAX_FILE_BYTES:
            raise BadImage(f"larger than {MAX_FILE_BYTES >> 20} MB")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"{w}x{h} pixels, more than {MAX_PIXELS:,} (a decompression bomb?)")
                if getattr(im, "n_frames", 1) > 1:
                    raise BadImage(f"animated ({im.n_frames} frames); save one frame as its own image")
                im.load()
                a = to_uint8(Path(path), im)
    except BadImage:
        raise
    except UserError as e:  # runtime's refusal of 32-bit images
        raise BadImage(str(e).split(": ", 1)[-1]) from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 — Pillow raises many types for broken files
        raise BadImage(f"{type(e).__name__}: {str(e).strip() or 'cannot decode'}") from None
    if a.ndim == 2:
        a = a[:, :, None]
    a = frame_to_input_uint8(a, size[0], size[1], in_chans, DEFAULT_RESIZE)
    return a.transpose(2, 0, 1)


def _decode_chunk(args) -> tuple[int, list[str | None], np.ndarray, np.ndarray | None]:
    """Worker: decode files [start, start+n); write them into the mmap file (when given) or return
    them. Returns (start, per-file error or None, per-channel [sum, sum of squares, pixels], images)."""
    start, paths, size, in_chans, target, total = args
    c, h, w = in_chans, size[0], size[1]
    out = None
    if target is not None:  # opened without following a link: the target is a name in the cache folder
        with open(os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), "r+b") as f:
            mm = np.memmap(f, dtype=np.uint8, mode="r+", shape=(total, c, h, w))
    else:
        out = np.zeros((len(paths), c, h, w), np.uint8)
    errors: list[str | None] = []
    stats = np.zeros((3, c), np.float64)
    for j, p in enumerate(paths):
        try:
            a = decode_file(p, size, in_chans)
        except BadImage as e:
            errors.append(str(e))
            continue
        errors.append(None)
        if target is not None:
            mm[start + j] = a
        else:
            out[j] = a
        x = a.reshape(c, -1).astype(np.float64) / 255
        stats[0] += x.sum(1)
        stats[1] += (x * x).sum(1)
        stats[2] += x.shape[1]
    if target is not None:
        mm.flush()
        del mm
    return start, errors, stats, out


def _workers() -> int:
    env = os.environ.get("EDGEEXIT_DECODE_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _worker_main() -> None:  # pragma: no cover — runs in the decode worker processes
    """A decode worker: tasks (pickled, from our own parent) on stdin, one pickled result per task
    on stdout. Imports numpy and Pillow only, never torch: a worker costs ~50 MB, not the parent's."""
    import pickle
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to report, once
    tasks = pickle.load(sys.stdin.buffer)
    out = sys.stdout.buffer
    for t in tasks:
        pickle.dump(_decode_chunk(t), out)
        out.flush()


def _read_results(proc, results) -> None:
    """A worker's pickled results onto ``results``; then None (its end) or the exception that ended it."""
    import pickle

    try:
        while True:
            results.put(pickle.load(proc.stdout))
    except EOFError:
        results.put(None)
    except Exception as e:  # noqa: BLE001
        results.put(e)


def _consume_results(results, workers: int, consume) -> None:
    """``consume`` every result until each of ``workers`` has ended; a worker's exception is raised."""
    finished = 0
    while finished < workers:
        res = results.get()
        if res is None:
            finished += 1
        elif isinstance(res, Exception):
            raise res
        else:
            consume(res)


def _run_workers(tasks, workers: int, target, n: int, in_chans: int, size, consume) -> None:
    """Decode ``tasks`` in ``workers`` fresh processes (not forks of this torch-laden one), each
    writing its rows into the mmap file ``target``; ``consume`` sees each result as it arrives."""
    import pickle
    import queue
    import subprocess
    import threading

    results: queue.Queue = queue.Queue()
    procs = []
    cmd = [sys.executable, "-c", "from edgeexit.data.folder import _worker_main; _worker_main()"]
    try:
        for pos in range(workers):
            # a process group of its own: the terminal's Ctrl-C reaches the parent only, which stops the
            # workers and reports the interruption once (no traceback per worker)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, process_group=0)
            procs.append(proc)
            pickle.dump(tasks[pos::workers], proc.stdin)
            proc.stdin.close()
            threading.Thread(target=_read_results, args=(proc, results), daemon=True).start()
        _consume_results(results, workers, consume)
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"a decode worker exited with code {proc.returncode}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def decode_all(paths: list[str], size, in_chans, target: str | None, console, strict: bool):
    """Decode every file (one process per core), into ``target`` (a mmap file) or into memory.
    Returns (kept mask, mean, std, images or None, bad files [(path, reason)])."""
    n = len(paths)
    if target is None and _workers() > 1 and n > CHUNK:  # workers write to a file, read in after
        import tempfile

        from edgeexit.util import remove_stale_temps, temp_prefix

        # named .edgeexit-decode.PID.*.partial: a run killed here leaves it, and the next run removes it
        remove_stale_temps(tempfile.gettempdir(), "edgeexit-decode")
        with tempfile.TemporaryDirectory(prefix=temp_prefix("edgeexit-decode"), suffix=".partial") as tmp:
            f = os.path.join(tmp, "images.u8")
            with open(f, "wb") as fh:
                fh.truncate(n * in_chans * size[0] * size[1])
            ok, mean, std, _, bad = decode_all(paths, size, in_chans, f, console, strict)
            images = np.fromfile(f, dtype=np.uint8).reshape(n, in_chans, *size)
        return ok, mean, std, images, bad
    images = None if target is not None else np.zeros((n, in_chans, *size), np.uint8)
    ok = np.zeros(n, bool)
    stats = np.zeros((3, in_chans), np.float64)
    bad: list[tuple[str, str]] = []
    tasks = [(s, paths[s : s + CHUNK], list(size), in_chans, target, n) for s in range(0, n, CHUNK)]
    workers = min(_workers(), len(tasks))
    prog = _decode_bar(console)
    t0 = time.perf_counter()

    def consume(result, bar):
        start, errors, st, out = result
        for j, err in enumerate(errors):
            if err is None:
                ok[start + j] = True
            else:
                bad.append((paths[start + j], err))
                if strict:
                    raise UserError(
                        f"{paths[start + j]}: {err} (--strict refuses bad images; without it, they are skipped)"
                    )
                if len(bad) <= SHOW_BAD:
                    _say(console, f"skipped {paths[start + j]}: {err}")
        stats[:] += st
        if out is not None:
            images[start : start + len(errors)] = out
        done = int(prog.tasks[0].completed) + len(errors)
        prog.update(bar, completed=done, ips=done / max(1e-9, time.perf_counter() - t0))

    with prog:
        bar = prog.add_task("decode", total=n, ips=0.0)
        if workers <= 1 or n <= CHUNK:
            for t in tasks:
                consume(_decode_chunk(t), bar)
        else:
            _run_workers(tasks, workers, target, n, in_chans, size, lambda res: consume(res, bar))
    seconds = time.perf_counter() - t0
    if len(bad) > SHOW_BAD:
        _say(console, f"... and {len(bad) - SHOW_BAD} more bad images skipped")
    if n:
        _say(console, f"decoded {int(ok.sum()):,} images in {seconds:.1f} s ({n / max(1e-9, seconds):,.0f} img/s)")
    return (ok, *_mean_std(stats), images, bad)


def _decode_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("decoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[ips]:,.0f} img/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )


def _mean_std(stats: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on 0-1 values from [sum, sum of squares, pixel count]."""
    if stats[2].min() <= 0:
        return [0.0] * stats.shape[1], [1.0] * stats.shape[1]
    mean = stats[0] / stats[2]
    std = np.sqrt(np.maximum(stats[1] / stats[2] - mean**2, 0))
    return [float(m) for m in mean], [max(1e-3, float(s)) for s in std]


# ---------------------------------------------------------------------------------------- cache


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("EDGEEXIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeexit" / "datasets"


def cache_key(root: Path, files, size, in_chans: int) -> str:
    h = hashlib.sha256()
    from edgeexit.runtime.preprocessing import DEFAULT_RESIZE  # images decoded another way are another cache

    fields = [CACHE_VERSION, str(Path(os.path.realpath(root))), list(size), in_chans, DEFAULT_RESIZE]
    h.update(json.dumps(fields).encode())
    for p, s, m, *_ in files:
        h.update(f"\n{os.path.relpath(p, root)}\0{s}\0{m}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def cached_images(root: Path, files, size, in_chans: int, console, strict: bool, where=None):
    """(uint8 tensor view of the mapped rows, ok mask, mean, std, bad) from the verified store
    (``cache_store.open_cache``) — decoding only when it holds no usable cache; concurrent callers
    (torchrun ranks) wait on the key's lock instead of decoding too."""
    import torch

    from edgeexit.data.cache_store import files_digest, open_cache

    folder = cache_dir(where)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the decoded-image cache {folder}: {e.strerror or e}; set --cache-dir") from None
    key = cache_key(root, files, size, in_chans)
    shape = (len(files), in_chans, *size)
    paths = [f[0] for f in files]

    def decode(target: str):
        ok, mean, std, _, bad = decode_all(paths, list(size), in_chans, target, console, strict)
        return ok, mean, std, bad

    mm, d, built = open_cache(folder, key, files_digest(root, files), shape, decode, console, root)
    if not built and strict and d["bad"]:
        p, why = d["bad"][0]
        raise UserError(f"{p}: {why} (--strict refuses bad images; without it, they are skipped)")
    if not built and d["bad"]:
        _say(console, f"{len(d['bad'])} bad image(s) skipped (listed in {folder / (key + '.json')})")
    return torch.from_numpy(mm), np.asarray(d["ok"], bool), d["mean"], d["std"], [tuple(b) for b in d["bad"]]


def load_folder_images(
    root: str | os.PathLike,
    size: list[int] | None,
    in_chans: int = 3,
    strict: bool = False,
    cache: str = "auto",
    where: str | os.PathLike | None = None,
    console=None,
):
    """(classes, images uint8 tensor (N, C, H, W), labels, kept rows or None, mean, std, mapped).

    ``cache``: auto (in memory up to IN_MEMORY_BYTES decoded, the mmap cache above), always, never."""
    import torch

    root = Path(root)
    console = console or _console()
    classes, files, labels = index_image_folder(root, console)
    if size is None:
        from PIL import Image

        try:
            with Image.open(files[0][0]) as im:
                size = [im.size[1], im.size[0]]
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{files[0][0]}: cannot read its size ({e})") from None
    size = [int(size[0]), int(size[1])]
    decoded = len(files) * in_chans * size[0] * size[1]
    use_cache = cache == "always" or (cache == "auto" and decoded > IN_MEMORY_BYTES)
    if use_cache:
        images, ok, mean, std, bad = cached_images(root, files, size, in_chans, console, strict, where)
    else:
        ok, mean, std, arr, bad = decode_all([f[0] for f in files], size, in_chans, None, console, strict)
        images = torch.from_numpy(arr)
    labels = torch.tensor(labels, dtype=torch.long)
    if not ok.any():
        raise UserError(f"{root}: none of its {len(files)} images could be read (the first: {bad[0][0]}: {bad[0][1]})")
    rows = None
    if not ok.all():
        keep = np.flatnonzero(ok)
        if use_cache:
            rows = keep  # a view on the mapped file: the skipped rows stay unused
        else:
            images = images[torch.from_numpy(keep)]
        labels = labels[torch.from_numpy(keep)]
        missing = [c for i, c in enumerate(classes) if not labels.eq(i).any()]
        if missing:
            raise UserError(f"{root}: class folder '{missing[0]}' has no readable image left after skipping bad files")
    return classes, images, labels, rows, mean, std, use_cache
