"""Hostile and careless data (issues 23 and 29): image folders with FIFOs, sockets, symlinks out,
bad files of every kind, folders that are not ImageFolders, billion-laugh pickles, and training
settings that would silently redraw the held-out split. Each is a one-line UserError (exit 2) or a
documented skip; nothing blocks and nothing outside the tree is read."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.data import folder as F
from edgeexit.data import load_dataset
from edgeexit.errors import UserError

runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEEXIT_CACHE_DIR", str(tmp_path / "cache"))


def folder(root: Path, classes=("a", "b"), n=3, side=20) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    return root


def train_cli(*args):
    res = runner.invoke(app, ["train", *map(str, args)])
    assert "Traceback" not in res.output
    return res


# -- entries that must never be opened ----------------------------------------------------------
def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    root = folder(tmp_path / "ds")
    os.mkfifo(root / "a" / "x.png")
    t = time.perf_counter()
    with pytest.raises(UserError, match=r"x\.png is a FIFO"):
        load_dataset(str(root), "train", image_size=[16, 16])
    assert time.perf_counter() - t < 5
    res = train_cli("--data", root, "--image-size", 16, "--out", tmp_path / "r", "--epochs", 1)
    assert res.exit_code == 2 and "is a FIFO" in res.output


def test_a_socket_named_like_an_image_is_refused(tmp_path):
    root = folder(tmp_path / "ds")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "b" / "y.jpg"))
        with pytest.raises(UserError, match=r"y\.jpg is not a regular file"):
            load_dataset(str(root), "train", image_size=[16, 16])
    finally:
        s.close()


def test_a_symlink_out_of_the_tree_is_refused_one_inside_is_read(tmp_path):
    root = folder(tmp_path / "ds")
    (root / "a" / "inside.png").symlink_to(root / "b" / "0.png")
    assert len(load_dataset(str(root), "train", image_size=[16, 16])) == 7
    (root / "a" / "passwd.png").symlink_to("/etc/passwd")
    with pytest.raises(UserError, match="outside"):
        load_dataset(str(root), "train", image_size=[16, 16])


def test_a_class_folder_symlinked_out_of_the_tree_is_refused(tmp_path):
    root = folder(tmp_path / "ds")
    folder(tmp_path / "elsewhere", classes=("c",))
    (root / "c").symlink_to(tmp_path / "elsewhere" / "c")
    with pytest.raises(UserError, match="class folder .* outside"):
        load_dataset(str(root), "train", image_size=[16, 16])


def test_the_filesystem_root_is_refused_at_once(tmp_path):
    t = time.perf_counter()
    with pytest.raises(UserError, match="not an ImageFolder"):
        load_dataset("/", "train", image_size=[16, 16])
    assert time.perf_counter() - t < 5
    res = train_cli("--data", "/", "--out", tmp_path / "r", "--epochs", 1)
    assert res.exit_code == 2 and "not an ImageFolder" in res.output


def test_a_manifest_or_checkpoint_naming_the_root_as_dataset_is_refused_at_once():
    from edgeexit.data.datasets import load_heldout

    t = time.perf_counter()
    with pytest.raises(UserError, match="not an ImageFolder"):
        load_heldout({"dataset": "/", "val_size": 10, "val_indices_seed": 0, "image_size": [16, 16]})
    assert time.perf_counter() - t < 5


def test_a_cache_that_cannot_be_reserved_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    root = folder(tmp_path / "ds")
    with pytest.raises(UserError, match="cannot reserve .* No space left on device; free space or pass --cache-dir"):
        load_dataset(str(root), "train", image_size=[16, 16], cache="always")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_a_class_folder_of_many_non_images_stops_the_walk(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "NO_IMAGE_LIMIT", 50)
    root = folder(tmp_path / "ds", classes=("b",))
    (root / "a").mkdir()
    for i in range(60):
        (root / "a" / f"{i}.txt").write_text("x")
    with pytest.raises(UserError, match="'a' holds no image in its first 50 entries"):
        load_dataset(str(root), "train", image_size=[16, 16])


def test_folders_deeper_than_the_bound_are_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "MAX_DEPTH", 1)
    root = folder(tmp_path / "ds")
    deep = root / "a" / "x" / "y"
    deep.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(deep / "deep.png")
    Image.new("RGB", (8, 8)).save(root / "a" / "x" / "shallow.png")
    assert len(load_dataset(str(root), "train", image_size=[16, 16])) == 7  # shallow read, deep not


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    root = folder(tmp_path / "ds")
    (root / "[bold]empty").mkdir()
    with pytest.raises(UserError, match=r"class folder '\[bold\]empty' has no images"):
        load_dataset(str(root), "train", image_size=[16, 16])


# -- bad image files: skipped by default (named), refused with --strict ---------------------------
def _bad_files(root: Path) -> dict[str, str]:
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (40, 40)).save(root / "b" / "bomb.png")  # MAX_PIXELS is lowered below
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(root / "b" / "anim.gif", save_all=True, append_images=frames[1:])
    return {
        "zero.png": "zero bytes",
        "corrupt.jpg": "",
        "truncated.png": "",
        "bomb.png": "bomb",
        "anim.gif": "animated",
    }


def test_bad_images_are_skipped_each_named_and_strict_refuses_the_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(F, "MAX_PIXELS", 1000)
    root = folder(tmp_path / "ds")
    bad = _bad_files(root)
    for cache in ("never", "always"):
        ds = F.load_folder_images(root, [16, 16], 3, False, cache)
        assert len(ds[2]) == 6  # the six good images
    err = capsys.readouterr().err
    for name, why in bad.items():
        assert f"skipped {root}" in err and name in err and why in err
    with pytest.raises(UserError, match="--strict refuses bad images"):
        load_dataset(str(root), "train", image_size=[16, 16], strict=True)
    res = train_cli("--data", root, "--image-size", 16, "--out", tmp_path / "r", "--strict")
    assert res.exit_code == 2 and "--strict refuses" in res.output


def test_a_folder_of_only_bad_images_is_refused(tmp_path):
    (tmp_path / "ds" / "a").mkdir(parents=True)
    (tmp_path / "ds" / "a" / "zero.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of its 1 images could be read"):
        load_dataset(str(tmp_path / "ds"), "train", image_size=[16, 16])


def test_16_bit_png_is_scaled_as_at_run_time(tmp_path):
    from edgeexit.runtime.sources import _image_files

    (tmp_path / "ds" / "a").mkdir(parents=True)
    p = tmp_path / "ds" / "a" / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(p)
    ds = load_dataset(str(tmp_path / "ds"), "train", image_size=[8, 8])
    (_, frame), *_ = list(_image_files([p]))
    assert ds.images[0, 0, 0, 0].item() == 40000 >> 8 == int(frame.reshape(-1)[0])  # 156, not clipped to 255


def test_cmyk_palette_and_alpha_convert_as_at_run_time(tmp_path):
    from edgeexit.runtime.sources import _image_files

    (tmp_path / "ds" / "a").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    paths = [tmp_path / "ds" / "a" / n for n in ("cmyk.tif", "p.png", "rgba.png")]
    im.convert("CMYK").save(paths[0])
    im.convert("P").save(paths[1])
    im.convert("RGBA").save(paths[2])
    ds = load_dataset(str(tmp_path / "ds"), "train", image_size=[8, 8])
    for i, (_, frame) in enumerate(_image_files(sorted(paths))):
        assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), frame)


# -- the cache: built once, keyed by content, shared by processes --------------------------------
def test_the_cache_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, capsys):
    root = folder(tmp_path / "ds")
    a = load_dataset(str(root), "train", image_size=[16, 16], cache="always")
    assert "decoded 6 images" in capsys.readouterr().err
    b = load_dataset(str(root), "train", image_size=[16, 16], cache="always")
    assert "decoded" not in capsys.readouterr().err and torch.equal(a.images, b.images) and a.mapped
    c = load_dataset(str(root), "train", image_size=[16, 16], cache="never")
    assert torch.equal(a.images, c.images) and a.mean == pytest.approx(c.mean) and not c.mapped
    Image.new("RGB", (20, 24), (255, 0, 0)).save(root / "a" / "0.png")
    d = load_dataset(str(root), "train", image_size=[16, 16], cache="always")
    assert "decoded 6 images" in capsys.readouterr().err and d.images[0].float().mean() != a.images[0].float().mean()


def test_parallel_decode_equals_inline_decode(tmp_path, monkeypatch):
    root = folder(tmp_path / "ds", n=80)  # 160 images: more than one chunk, so the workers run
    monkeypatch.setenv("EDGEEXIT_DECODE_WORKERS", "1")
    one = load_dataset(str(root), "train", image_size=[16, 16], cache="never")
    monkeypatch.setenv("EDGEEXIT_DECODE_WORKERS", "2")
    two = load_dataset(str(root), "train", image_size=[16, 16], cache="never")
    mapped = load_dataset(str(root), "train", image_size=[16, 16], cache="always")
    assert torch.equal(one.images, two.images) and torch.equal(one.images, mapped.images)
    assert one.mean == pytest.approx(two.mean)


@pytest.mark.slow
def test_concurrent_processes_decode_once(tmp_path):
    root = folder(tmp_path / "ds", n=40)
    code = (
        "from edgeexit.data import load_dataset;"
        f"ds = load_dataset({str(root)!r}, 'train', image_size=[16, 16], cache='always'); print(len(ds))"
    )
    env = dict(os.environ, EDGEEXIT_CACHE_DIR=str(tmp_path / "shared"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(o.strip() == "80" for o, _ in outs)
    assert sum("decoded 80 images" in e for _, e in outs) == 1  # one process decoded, two waited


@pytest.mark.slow
def test_a_mapped_training_set_trains_exactly_as_in_memory(tmp_path, monkeypatch):
    from edgeexit.train.trainer import TrainConfig, train

    root = folder(tmp_path / "ds", n=40, side=16)

    def run(out):
        cfg = TrainConfig.from_recipe(
            str(root), "ce", out=str(out), epochs=1, width=0.0625, batch_size=16, image_size=16, val_size=10
        )
        cfg.adapt_threads = False
        train(cfg, progress=False)
        return torch.load(out / "model.pt", weights_only=True)["state_dict"]

    mem = run(tmp_path / "mem")
    monkeypatch.setattr(F, "IN_MEMORY_BYTES", 0)
    mapped = run(tmp_path / "mapped")
    assert all(torch.equal(mem[k], mapped[k]) for k in mem)


# -- CIFAR pickles -------------------------------------------------------------------------------
def test_a_billion_laughs_cifar_pickle_is_refused_fast(tmp_path):
    from edgeexit.data.datasets import load_cifar_pickle

    x = [0, 1]
    for _ in range(60):  # 2**60 leaves through shared references, in a few KB
        x = [x, x]
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": x}))
    assert p.stat().st_size < 20_000
    t = time.perf_counter()
    with pytest.raises(UserError, match="only flat lists"):
        load_cifar_pickle(p)
    assert time.perf_counter() - t < 2


def test_a_cifar_pickle_with_an_object_array_is_refused(tmp_path):
    from edgeexit.data.datasets import load_cifar_pickle

    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object)}))
    with pytest.raises(UserError, match="not a CIFAR batch"):
        load_cifar_pickle(p)


def test_a_fifo_as_a_cifar_batch_is_refused(tmp_path):
    from edgeexit.data.datasets import load_cifar_pickle

    os.mkfifo(tmp_path / "data_batch_1")
    with pytest.raises(UserError, match="FIFO"):
        load_cifar_pickle(tmp_path / "data_batch_1")


# -- silent wrong results ------------------------------------------------------------------------
def test_data_dir_wins_over_the_system_fashion_mnist(tmp_path):
    import gzip
    import struct

    from edgeexit.data import datasets

    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for name, arr in (("t10k-images-idx3-ubyte.gz", np.full((3, 28, 28), 7, np.uint8)),
                      ("t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3], np.uint8))):  # fmt: skip
        with gzip.open(d / name, "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes())
    assert datasets.FASHION_MNIST_SYSTEM_DIR.is_dir()  # the Debian copy is there, and must lose
    ds = datasets.load_fashion_mnist("test", data_dir=tmp_path)
    assert len(ds) == 3 and ds.labels.tolist() == [1, 2, 3]


def test_eval_matches_classes_by_name_or_refuses():
    from edgeexit.data import ImageDataset
    from edgeexit.train.evaluation import match_classes

    ds = ImageDataset(
        torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 1]), ["cat", "dog"], [0], [1], "x"
    )
    out = match_classes(ds, ["ant", "dog", "cat"], "test")
    assert out.labels.tolist() == [2, 1, 1]  # by name, not by sorted position
    ds2 = ImageDataset(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([0]), ["[red]emu"], [0], [1], "x")
    with pytest.raises(UserError, match=r"class '\[red\]emu', which the model was not trained on"):
        match_classes(ds2, ["ant", "dog"], "test")


def _folder_run(tmp_path, root, **kw):
    from edgeexit.train.trainer import TrainConfig

    base = {"epochs": 1, "width": 0.0625, "batch_size": 8, "image_size": 16, "val_size": 6, "seed": 0}
    cfg = TrainConfig.from_recipe(str(root), "ce", out=str(tmp_path / "run"), **{**base, **kw})
    cfg.adapt_threads = False
    return cfg


def test_eval_on_a_folder_with_other_class_names_refuses(tmp_path):
    from edgeexit.train.trainer import train

    root = folder(tmp_path / "ds", classes=("cat", "dog"), n=12, side=16)
    train(_folder_run(tmp_path, root / ".." / "ds"), progress=False)
    folder(tmp_path / "other" / "test", classes=("cat", "emu"), n=2, side=16)
    res = runner.invoke(app, ["eval", str(tmp_path / "run" / "model.pt"), "--data", str(tmp_path / "other")])
    assert res.exit_code == 2 and "'emu', which the model was not trained on" in res.output


@pytest.mark.parametrize(
    "change, match",
    [({"seed": 1}, "--seed 0, not 1"), ({"val_size": 8}, "--val-size 6, not 8")],
)
def test_resume_never_redraws_the_held_out_split(tmp_path, change, match):
    from edgeexit.train.trainer import train

    root = folder(tmp_path / "ds", n=12, side=16)
    train(_folder_run(tmp_path, root), progress=False)
    with pytest.raises(UserError, match=match):
        train(_folder_run(tmp_path, root, epochs=2, resume=True, **change), progress=False)


def test_resume_after_a_class_folder_was_added_names_it(tmp_path):
    from edgeexit.train.trainer import train

    root = folder(tmp_path / "ds", n=12, side=16)
    train(_folder_run(tmp_path, root), progress=False)
    folder(root, classes=("newcomer",), n=3, side=16)
    with pytest.raises(UserError, match="class folder 'newcomer' was added"):
        train(_folder_run(tmp_path, root, epochs=2, resume=True), progress=False)
    res = train_cli("--data", root, "--method", "ce", "--image-size", 16, "--width", 0.0625, "--batch-size", 8,
                    "--val-size", 6, "--epochs", 2, "--out", tmp_path / "run", "--resume")  # fmt: skip
    assert res.exit_code == 2 and "'newcomer' was added" in res.output
