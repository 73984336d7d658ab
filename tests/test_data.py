"""Every loader on tiny datasets written in the real on-disk formats."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from edgeexit.data import augment, load_dataset, split_calibration, split_train_val
from edgeexit.errors import UserError


def write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_in_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    write_idx(d / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", labels)
    from edgeexit.data import datasets

    # the Debian copy is searched first: point it elsewhere so --data-dir is what gets read
    old = datasets.FASHION_MNIST_SYSTEM_DIR
    datasets.FASHION_MNIST_SYSTEM_DIR = tmp_path / "absent"
    try:
        ds = datasets.load_fashion_mnist("test", data_dir=tmp_path)
    finally:
        datasets.FASHION_MNIST_SYSTEM_DIR = old
    assert ds.images.shape == (5, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.labels.tolist() == [3, 1, 4, 1, 5]


def test_real_fashion_mnist_from_the_debian_package(fashion_test):
    assert len(fashion_test) == 10000 and fashion_test.images.shape[1:] == (1, 28, 28)
    assert fashion_test.num_classes == 10
    # class balance of the real test split
    assert torch.bincount(fashion_test.labels).tolist() == [1000] * 10


def test_truncated_idx_is_a_clear_error(tmp_path):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 10, 28, 28) + b"\0" * 100)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(10, np.uint8))
    from edgeexit.data import datasets

    old = datasets.FASHION_MNIST_SYSTEM_DIR
    datasets.FASHION_MNIST_SYSTEM_DIR = tmp_path / "absent"
    try:
        with pytest.raises(UserError, match="truncated"):
            datasets.load_fashion_mnist("test", data_dir=tmp_path)
    finally:
        datasets.FASHION_MNIST_SYSTEM_DIR = old


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, name):
    rng = np.random.default_rng(1)
    if name == "cifar10":
        root = tmp_path / "cifar-10-batches-py"
        root.mkdir()
        for i in range(1, 6):
            batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [i % 10] * 4}
            (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        test = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [7, 8, 9]}
        (root / "test_batch").write_bytes(pickle.dumps(test))
        (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
        expected_train = 20
    else:
        root = tmp_path / "cifar-100-python"
        root.mkdir()
        (root / "train").write_bytes(
            pickle.dumps({b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"fine_labels": list(range(6))})
        )
        test = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"fine_labels": [7, 8, 9]}
        (root / "test").write_bytes(pickle.dumps(test))
        (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
        expected_train = 6
    tr = load_dataset(name, "train", tmp_path)
    te = load_dataset(name, "test", tmp_path)
    assert len(tr) == expected_train and te.images.shape == (3, 3, 32, 32)
    assert te.labels.tolist() == [7, 8, 9]
    # CIFAR rows are channel-major: the first 1024 bytes are the red plane
    assert torch.equal(te.images[0, 0].flatten(), torch.from_numpy(test[b"data"][0, :1024]))


class _Payload:
    """A hostile CIFAR batch: unpickling it would create a file (or anything else)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_cifar_batch_with_a_payload_is_refused_and_nothing_runs(tmp_path, protocol):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(good, protocol=protocol))
    (root / "test_batch").write_bytes(pickle.dumps(good, protocol=protocol))
    marker = tmp_path / "pwned"
    evil = {b"label_names": [b"a"] * 10, b"x": _Payload(marker)}
    (root / "batches.meta").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(UserError, match=r"batches.meta is not a CIFAR batch: refusing to load (builtins|io)\.open"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()
    # the same files without the payload load (numpy arrays pickled with this protocol are allowed)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=protocol))
    assert len(load_dataset("cifar10", "test", tmp_path)) == 2


def test_tiny_imagenet_layout_and_val_sorted_by_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids))
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby cat\n")
    for i, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((64, 64, 3), 10 * i + j, np.uint8)).save(d / f"{w}_{j}.JPEG", quality=100)
    ann = []
    for j, w in enumerate(["n02", "n01", "n02"]):
        Image.fromarray(np.full((64, 64, 3), 200 + j, np.uint8)).save(root / "val" / "images" / f"val_{j}.png")
        ann.append(f"val_{j}.png\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    tr = load_dataset("tiny-imagenet", "train", tmp_path)
    va = load_dataset("tiny-imagenet", "test", tmp_path)
    assert len(tr) == 6 and tr.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert tr.class_names == ["goldfish", "tabby cat"]
    assert va.labels.tolist() == [1, 0, 1]
    assert va.images[1, 0, 0, 0].item() == 201


def test_image_folder_resizes_and_labels_by_folder(tmp_path):
    for c, v in (("cat", 50), ("dog", 150)):
        (tmp_path / "train" / c).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((20, 30, 3), v, np.uint8)).save(tmp_path / "train" / c / f"{j}.png")
    ds = load_dataset(str(tmp_path), "train", image_size=[16, 16])
    assert ds.images.shape == (4, 3, 16, 16) and ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(UserError, match="no test/ or val/"):
        load_dataset(str(tmp_path / "train"), "test")


def test_missing_and_unknown_datasets_say_where_they_looked(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "train", tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'imagenet-9000'"):
        load_dataset("imagenet-9000", "train")


def test_seeded_split_is_disjoint_and_reproducible():
    a_tr, a_val = split_train_val(1000, 100, seed=3)
    b_tr, b_val = split_train_val(1000, 100, seed=3)
    c_tr, c_val = split_train_val(1000, 100, seed=4)
    assert np.array_equal(a_val, b_val) and not np.array_equal(a_val, c_val)
    assert len(np.intersect1d(a_tr, a_val)) == 0 and len(a_tr) + len(a_val) == 1000
    cal, ver = split_calibration(a_val, seed=3)
    assert len(np.intersect1d(cal, ver)) == 0 and len(cal) + len(ver) == 100


def test_batched_crop_and_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, pad=2, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # with no padding and no flip it is the identity
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)
    # every output row is a (possibly flipped, shifted) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(
            torch.equal(out[i, 0], padded[i, 0, dy : dy + 6, dx : dx + 6])
            or torch.equal(out[i, 0], padded[i, 0, dy : dy + 6, dx : dx + 6].flip(1))
            for dy in range(5)
            for dx in range(5)
        )
        assert found
