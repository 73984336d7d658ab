"""The decoded-image cache is a verified store (edgeexit.data.cache_store): nothing found in a cache
folder is trusted until checked. Links are never followed; the meta's file-list digest catches a
cache renamed to another set's key and images replaced with the same size and mtime; row checksums
catch rows damaged in place; malformed meta is decoded again with a note; a read-only finished
cache is used as is; a dead builder's leftovers go, whatever their key."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dead_pid
from PIL import Image

from edgeexit.data import cache_store, load_dataset
from edgeexit.data import folder as F
from edgeexit.errors import UserError


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("EDGEEXIT_CACHE_DIR", str(d))
    monkeypatch.delenv(cache_store.VERIFY_ENV, raising=False)
    return d


def make_folder(root: Path, seed: int, n: int = 3, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{j}.{ext}")
    return root


def load(root: Path):
    return load_dataset(str(root), "train", image_size=[16, 16], cache="always")


def truth(root: Path):
    return load_dataset(str(root), "train", image_size=[16, 16], cache="never").images


def only(cache: Path, suffix: str) -> Path:
    (p,) = [p for p in cache.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")]
    return p


def test_a_warm_open_reads_no_row_and_a_verify_request_reads_them_all(tmp_path, cache, capsys, monkeypatch):
    root = make_folder(tmp_path / "ds", 0)
    first = load(root)
    assert "decoded 6 images" in capsys.readouterr().err
    meta = json.loads(only(cache, ".json").read_text())
    assert meta["checksums"] == cache_store.row_checksums(first.images.numpy())
    warm = load(root)
    err = capsys.readouterr().err
    assert "decoded" not in err and "checked" not in err and torch.equal(warm.images, first.images)
    monkeypatch.setenv(cache_store.VERIFY_ENV, "1")
    load(root)
    assert "checked the decoded cache's checksums" in capsys.readouterr().err


def test_a_link_planted_as_the_lock_is_refused_and_its_target_never_created(tmp_path, cache):
    root = make_folder(tmp_path / "ds", 0)
    load(root)
    lock = only(cache, ".lock")
    lock.unlink()
    outside = tmp_path / "outside" / "nologin"
    outside.parent.mkdir()
    lock.symlink_to(outside)
    with pytest.raises(UserError, match="is a symbolic link: edgeexit never follows a link inside its cache folder"):
        load(root)
    assert not outside.exists()


@pytest.mark.parametrize("suffix", [".u8", ".json"])
def test_a_link_planted_as_data_or_meta_is_refused(tmp_path, cache, suffix):
    root = make_folder(tmp_path / "ds", 0)
    load(root)
    target = only(cache, suffix)
    moved = tmp_path / ("elsewhere" + suffix)
    shutil.move(target, moved)
    target.symlink_to(moved)
    with pytest.raises(UserError, match="symbolic link"):
        load(root)


def test_another_sets_cache_renamed_to_this_key_is_decoded_again(tmp_path, cache, capsys, monkeypatch):
    a, b = make_folder(tmp_path / "a", 1), make_folder(tmp_path / "b", 2)
    load(a)
    key_a = only(cache, ".json").stem
    other = tmp_path / "cache_b"
    monkeypatch.setenv("EDGEEXIT_CACHE_DIR", str(other))
    load(b)
    key_b = only(other, ".json").stem
    for suffix in (".u8", ".json"):  # b's pixels and meta under a's key
        os.replace(other / (key_b + suffix), cache / (key_a + suffix))
    monkeypatch.setenv("EDGEEXIT_CACHE_DIR", str(cache))
    capsys.readouterr()
    got = load(a)
    assert "decoded from other files" in capsys.readouterr().err
    assert torch.equal(got.images, truth(a))


def test_images_replaced_with_the_same_size_and_mtime_are_decoded_again(tmp_path, cache, capsys):
    root = make_folder(tmp_path / "ds", 0, ext="bmp")  # uncompressed: a corrected image has the same size
    before = load(root)
    victim = root / "a" / "0.bmp"
    st = victim.stat()
    replacement = tmp_path / "r.bmp"
    Image.new("RGB", (16, 16), (10, 200, 30)).save(replacement)
    shutil.copyfile(replacement, victim)  # then the mtime put back: what `cp -p` or `rsync -t` leaves
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    capsys.readouterr()
    after = load(root)
    assert "decoded from other files" in capsys.readouterr().err
    assert torch.equal(after.images, truth(root)) and not torch.equal(after.images, before.images)


def test_rows_overwritten_in_place_fail_their_checksums_and_are_decoded_again(tmp_path, cache, capsys):
    root = make_folder(tmp_path / "ds", 0)
    load(root)
    data = only(cache, ".u8")
    st = data.stat()
    with open(data, "r+b") as f:
        f.write(b"\xff" * st.st_size)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: the ctime still moves
    capsys.readouterr()
    got = load(root)
    err = capsys.readouterr().err
    assert "rows 0-5 of the decoded cache" in err and "do not match their checksums" in err
    assert torch.equal(got.images, truth(root))


def test_a_changed_stat_with_intact_rows_is_checked_once_then_cheap(tmp_path, cache, capsys):
    root = make_folder(tmp_path / "ds", 0)
    load(root)
    os.chmod(only(cache, ".u8"), 0o600)  # the ctime moves, the rows do not
    capsys.readouterr()
    load(root)
    assert "checked the decoded cache's checksums" in capsys.readouterr().err
    load(root)
    assert "checked" not in capsys.readouterr().err


MALFORMED = [
    b"{not json",
    b"[]",
    b"[" * 100_000,
    json.dumps({"version": "2"}).encode(),
    b'{"version": 2, "shape": "abc"}',
]


@pytest.mark.parametrize("edit", ["ok", "mean", "std", "bad", "checksums", "data_stat", "raw0", "raw1", "raw2"])
def test_malformed_meta_is_decoded_again_with_a_note(tmp_path, cache, capsys, edit):
    root = make_folder(tmp_path / "ds", 0)
    load(root)
    meta = only(cache, ".json")
    d = json.loads(meta.read_text())
    hostile = {"ok": "abc", "mean": [0.5, "x", 0.5], "std": [0.0, 0.1, 0.1], "bad": [[1, 2]], "checksums": [-1],
               "data_stat": None}  # fmt: skip
    if edit.startswith("raw"):
        meta.write_bytes(MALFORMED[int(edit[3:])])
    else:
        meta.write_text(json.dumps(dict(d, **{edit: hostile[edit]})))
    capsys.readouterr()
    got = load(root)
    err = capsys.readouterr().err
    assert "note: the decoded cache" in err and "is not used" in err and "decoding again" in err
    assert torch.equal(got.images, truth(root))


def test_meta_problem_names_each_field():
    shape, n = (2, 3, 4, 4), 2
    good = {"version": cache_store.CACHE_VERSION, "shape": list(shape), "files": "d", "ok": [1, 1],
            "mean": [0.5] * 3, "std": [0.2] * 3, "bad": [], "chunk_rows": cache_store.CHUNK_ROWS,
            "checksums": [7], "data_stat": [96, 1, 2, 3]}  # fmt: skip
    assert cache_store.meta_problem(good, n, shape, "d") is None
    assert "other files" in cache_store.meta_problem(good, n, shape, "other")
    assert "'ok'" in cache_store.meta_problem(dict(good, ok=[1, True]), n, shape, "d")
    assert "does not match" in cache_store.meta_problem(dict(good, ok=[1, 0]), n, shape, "d")
    assert "format" in cache_store.meta_problem(dict(good, version=True), n, shape, "d")


def test_a_read_only_folder_with_a_finished_cache_is_used_as_is(tmp_path, cache, capsys, monkeypatch):
    root = make_folder(tmp_path / "ds", 0)
    built = load(root)
    real_open, real_access = os.open, os.access

    def read_only_open(path, flags, *a, **k):  # what a read-only mount answers (root ignores chmod)
        in_cache = k.get("dir_fd") is not None or str(path).startswith(str(cache))
        if in_cache and flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(str(cache)) else real_access(p, m))
    capsys.readouterr()
    got = load(root)
    assert "decoded" not in capsys.readouterr().err and torch.equal(got.images, built.images)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "a" / "new.png")  # another set: would need a build
    with pytest.raises(UserError, match="is read-only and holds no finished cache"):
        load(root)


def test_leftovers_of_any_dead_builder_are_removed_by_the_next_open(tmp_path, cache, capsys):
    root = make_folder(tmp_path / "ds", 0)
    load(root)
    pid = dead_pid()
    dead_other = cache / f".0123456789abcdef.u8.{pid}.build.tmp"  # another key's build, killed
    dead_meta = cache / f".0123456789abcdef.json.{pid}.x1y2.tmp"
    live = cache / f".fedcba9876543210.u8.{os.getpid()}.build.tmp"  # a live builder: left alone
    for p in (dead_other, dead_meta, live):
        p.write_bytes(b"\0" * 10)
    capsys.readouterr()
    load(root)
    assert not dead_other.exists() and not dead_meta.exists() and live.exists()
    assert "checked the decoded cache's checksums" in capsys.readouterr().err  # a builder died: rows checked


def test_a_killed_in_memory_decode_leaves_nothing_in_tmpdir_after_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    stale = tmp_path / "tmp" / f".edgeexit-decode.{dead_pid()}.abc.partial"
    stale.mkdir()
    (stale / "images.u8").write_bytes(b"\0" * 10)
    monkeypatch.setenv("EDGEEXIT_DECODE_WORKERS", "2")
    root = make_folder(tmp_path / "ds", 0, n=40)  # more than one chunk: the workers' temporary file is used
    F.load_folder_images(root, [16, 16], 3, False, "never")
    assert not stale.exists() and list((tmp_path / "tmp").iterdir()) == []
