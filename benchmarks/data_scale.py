"""ImageFolder at camera scale: memory and throughput of the data path vs the old loader (issue 23).

    # 1. synthetic folders of 256-px JPEGs (10 classes), once
    python benchmarks/data_scale.py make --dir /tmp/ds2k --images 2000
    # 2. each loader as its own process: peak anonymous memory summed over the process tree,
    #    wall time, decode images/s, delivered images/s, and (--train) an `edgeexit train` run
    python benchmarks/data_scale.py measure --dir /tmp/ds2k --loader old new stream --train \\
        --json docs/data_scale_2k.json

Loaders:
- ``old``: the loader of main bdcb4c9 (one thread decodes everything into one array, then a float
  copy of the whole set for mean and std), reproduced here verbatim;
- ``new``: edgeexit's loader (parallel decode into the decoded-once mmap cache, then the trainer
  gathers each batch from the page cache); ``new-warm`` is the same with the cache already built;
- ``stream``: a ``torch.utils.data`` pipeline (one worker process per core decoding and resizing
  every epoch, pinned memory, persistent workers, prefetch 4) — measured for the design choice.

Memory is RssAnon from /proc/PID/status summed over the process and all its descendants, sampled
every 50 ms (anonymous memory is what cannot be paged out to the file it came from; the mmap
cache's pages are file-backed and reclaimable). Throughput numbers need a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SIZE = 224


# ------------------------------------------------------------------------------------ make data


def _make_chunk(args):
    from PIL import Image

    root, start, stop, classes, side, seed = args
    for i in range(start, stop):
        rng = np.random.default_rng(seed * 1_000_003 + i)
        c = i % classes
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
        base = np.stack([np.sin(6 * xx + c), np.cos(5 * yy - c), np.sin(4 * (xx + yy) + i % 7)], -1)
        img = (base * 80 + 128 + rng.normal(0, 12, (side, side, 3))).clip(0, 255).astype(np.uint8)
        d = Path(root) / f"class{c:02d}"
        Image.fromarray(img).save(d / f"{i:07d}.jpg", quality=90)


def make(root: Path, images: int, classes: int = 10, side: int = 256, seed: int = 0) -> None:
    from concurrent.futures import ProcessPoolExecutor

    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    step = 250
    tasks = [(str(root), s, min(images, s + step), classes, side, seed) for s in range(0, images, step)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_chunk, tasks))


# ------------------------------------------------------------------------------------ old loader


def old_load_image_folder(root, size=None, in_chans=3, **_ignored):
    """main bdcb4c9's load_image_folder and _load_images, verbatim but for the names."""
    import torch
    from PIL import Image

    from edgeexit.data.datasets import ImageDataset
    from edgeexit.errors import UserError
    from edgeexit.runtime.preprocessing import resize_uint8

    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no class folders")
    paths, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in exts:
                paths.append(p)
                labels.append(i)
    if size is None:
        with Image.open(paths[0]) as im:
            size = [im.size[1], im.size[0]]
    out = []
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L" if in_chans == 1 else "RGB"), dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        a = resize_uint8(a, *size)
        out.append(a.transpose(2, 0, 1))
    images = np.stack(out)
    x = torch.from_numpy(images).float() / 255
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return ImageDataset(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long), classes, mean, std, str(root))


def patch_old() -> None:
    import edgeexit.data.datasets as ds

    ds.load_image_folder = old_load_image_folder


# ----------------------------------------------------------------------------------- memory probe


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_anon_bytes(pid: int) -> int:
    """RssAnon of ``pid`` and every descendant, summed."""
    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run_measured(cmd: list[str], env=None) -> dict:
    """Run ``cmd``; its wall time, exit code, last output lines and peak tree anonymous memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_anon_bytes(proc.pid))
            done.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "peak_anon_gb": peak[0] / 1e9,
        "tail": out.strip().splitlines()[-6:],
    }


# ----------------------------------------------------------------------------------- child modes


def child_load(loader: str, root: str, cache_dir: str, epochs: int, batch: int) -> None:
    """In a child process: load with ``loader`` and deliver ``epochs`` passes of uint8 batches
    (what the trainer consumes); prints one JSON line of timings."""
    import torch

    t0 = time.perf_counter()
    if loader == "stream":
        out = _stream(root, epochs, batch)
    else:
        if loader == "old":
            patch_old()
        from edgeexit.data import load_dataset

        ds = load_dataset(root, "train", image_size=[SIZE, SIZE], cache_dir=cache_dir, cache="always")
        decode_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(epochs):
            t1 = time.perf_counter()
            perm = torch.randperm(len(ds), generator=g)
            for s in range(0, len(ds) - batch + 1, batch):
                xb = ds.take(perm[s : s + batch])
                xb = xb.float()  # the trainer normalises each batch to float
            times.append(time.perf_counter() - t1)
        out = {"decode_s": decode_s, "epoch_s": times, "n": len(ds)}
    print("RESULT " + json.dumps(out), flush=True)


class _Folder:
    def __init__(self, files, labels):
        self.files, self.labels = files, labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch

        from edgeexit.data.folder import decode_file

        return torch.from_numpy(decode_file(self.files[i], [SIZE, SIZE], 3)), self.labels[i]


def _stream(root: str, epochs: int, batch: int) -> dict:
    import torch

    from edgeexit.data.folder import _console, index_image_folder

    t0 = time.perf_counter()
    _, files, labels = index_image_folder(root, _console())
    ds = _Folder([f[0] for f in files], labels)
    workers = len(os.sched_getaffinity(0))
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=True,
        prefetch_factor=4,
        drop_last=True,
    )
    index_s = time.perf_counter() - t0
    times = []
    for _ in range(epochs):
        t1 = time.perf_counter()
        for xb, _y in loader:
            xb = xb.float()
        times.append(time.perf_counter() - t1)
    return {"decode_s": index_s, "epoch_s": times, "n": len(ds)}


# --------------------------------------------------------------------------------------- measure


def measure(args) -> list[dict]:
    rows = []
    n_files = sum(1 for _ in Path(args.dir).rglob("*.jpg"))
    cache_dir = args.cache_dir or str(Path(args.dir).with_name(Path(args.dir).name + "-cache"))
    for loader in args.loader:
        env = dict(os.environ, EDGEEXIT_CACHE_DIR=cache_dir)
        if loader == "new":  # a cold start: no cache yet
            subprocess.run(["rm", "-rf", cache_dir], check=True)
        name = "new" if loader == "new-warm" else loader
        cmd = [sys.executable, __file__, "child", name, args.dir, cache_dir, str(args.epochs), str(args.batch)]
        r = run_measured(cmd, env)
        row = {"images": n_files, "loader": loader, "phase": "load+deliver", **r}
        res = [line for line in r["tail"] if line.startswith("RESULT ")]
        if res:
            d = json.loads(res[-1][7:])
            row["decode_s"] = d["decode_s"]
            row["decode_images_per_s"] = d["n"] / d["decode_s"] if loader != "stream" else None
            row["delivered_images_per_s"] = [d["n"] / t for t in d["epoch_s"]]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.train and loader in ("old", "new", "new-warm"):
            out = Path(cache_dir + f"-run-{loader}")
            if loader == "new":  # cold again: the load phase above built the cache
                subprocess.run(["rm", "-rf", cache_dir], check=True)
            cmd = [sys.executable, __file__, "train", name, args.dir, str(out)] + args.train_args.split()
            r = run_measured(cmd, env)
            row = {"images": n_files, "loader": loader, "phase": "edgeexit train", **r}
            js = out / "result.json"
            if js.is_file():
                row["train_images_per_s"] = json.loads(js.read_text())["images_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def child_train(loader: str, root: str, out: str, extra: list[str]) -> None:
    if loader == "old":
        patch_old()
    from edgeexit.cli import main

    sys.argv = ["edgeexit", "train", "--data", root, "--out", out, "--force", "--json", str(Path(out) / "result.json")]
    sys.argv += extra
    main()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        loader, root, cache_dir, epochs, batch = sys.argv[2:7]
        return child_load(loader, root, cache_dir, int(epochs), int(batch))
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        return child_train(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a synthetic ImageFolder of 256-px JPEGs")
    m.add_argument("--dir", required=True)
    m.add_argument("--images", type=int, required=True)
    m.add_argument("--classes", type=int, default=10)
    s = sub.add_parser("measure", help="memory and throughput of each loader, each in its own process")
    s.add_argument("--dir", required=True)
    s.add_argument("--loader", nargs="+", default=["old", "new", "new-warm", "stream"])
    s.add_argument("--epochs", type=int, default=2, help="passes over the set delivered after loading")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--cache-dir", default=None)
    s.add_argument("--train", action="store_true", help="also time `edgeexit train` with the old and new loader")
    s.add_argument(
        "--train-args",
        default="--image-size 224 --stem imagenet --width 0.25 --epochs 1 --train-images 100 --fixed-threads",
    )
    s.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.cmd == "make":
        t = time.perf_counter()
        make(Path(a.dir), a.images, a.classes)
        print(f"wrote {a.images} images to {a.dir} in {time.perf_counter() - t:.0f} s")
        return
    rows = measure(a)
    if a.json:
        from edgeexit.util import atomic_write_json

        atomic_write_json(a.json, {"rows": rows, "cpus": len(os.sched_getaffinity(0))})
    print("\n| images | loader | phase | peak anon GB | wall s | decode img/s | delivered img/s | train img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dec = r.get("decode_images_per_s")
        dl = r.get("delivered_images_per_s")
        print(
            f"| {r['images']:,} | {r['loader']} | {r['phase']} | {r['peak_anon_gb']:.2f} | {r['wall_s']:.1f} | "
            f"{'' if not dec else f'{dec:,.0f}'} | {'' if not dl else ' / '.join(f'{x:,.0f}' for x in dl)} | "
            f"{r.get('train_images_per_s', '') and format(r['train_images_per_s'], '.1f')} |"
        )


if __name__ == "__main__":
    main()
