"""Datasets as in-memory uint8 tensors (N, C, H, W), read from their real on-disk formats.

Every dataset edgeexit trains on fits in host memory as uint8 (Tiny-ImageNet's 100k 64x64 RGB
images are 1.2 GB), so the loaders read everything once and the trainer batches with tensor
ops: no DataLoader workers, and on CUDA the whole set moves to the GPU once.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeexit.data.names import NAMED, canonical_dataset
from edgeexit.errors import UserError
from edgeexit.runtime.preprocessing import DEFAULT_RESIZE

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Per-channel statistics on 0-1 pixel values (training sets).
STATS = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "tiny-imagenet": ([0.4802, 0.4481, 0.3975], [0.2770, 0.2691, 0.2821]),
}


@dataclass
class ImageDataset:
    """uint8 images (N, C, H, W) with int64 labels and the preprocessing the model expects.

    ``rows``, when set, makes this a *view*: sample i is ``images[rows[i]]`` (``images`` is then the
    backing store, e.g. the memory-mapped decoded cache of a large ImageFolder, never copied);
    ``labels`` always has one entry per sample. Read samples with ``take``/``slice``, or
    ``materialize()`` a small view into a plain dataset."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: list[float]
    std: list[float]
    name: str
    rows: np.ndarray | None = None
    mapped: bool = False  # images is a memory-mapped file (the decoded cache), not anonymous memory

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 (N, C, H, W) tensor")
        if len(self.labels) != (len(self.images) if self.rows is None else len(self.rows)):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def input_size(self) -> list[int]:
        return [int(self.images.shape[2]), int(self.images.shape[3])]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images of samples ``idx`` (a CPU index tensor). On the CPU by numpy's row gather:
        measured 7x faster than torch's advanced indexing of a uint8 (N, C, H, W) tensor."""
        rows = idx.cpu().numpy() if self.rows is None else self.rows[idx.cpu().numpy()]
        if self.images.device.type != "cpu":
            return self.images[torch.from_numpy(rows).to(self.images.device)]
        return torch.from_numpy(np.take(self.images.numpy(), rows, axis=0))

    def slice(self, start: int, stop: int) -> torch.Tensor:
        if self.rows is None:
            return self.images[start:stop]
        return self.take(torch.arange(start, min(stop, len(self))))

    def subset(self, indices: torch.Tensor | np.ndarray | list[int], view: bool = False) -> ImageDataset:
        """Samples ``indices``: copied into memory, or (``view``) as a view on the same store."""
        idx = np.asarray(indices, dtype=np.int64)
        labels = self.labels[torch.from_numpy(idx)]
        if view:
            rows = idx if self.rows is None else self.rows[idx]
            return ImageDataset(
                self.images, labels, self.class_names, self.mean, self.std, self.name, rows, self.mapped
            )
        return ImageDataset(self.take(torch.from_numpy(idx)), labels, self.class_names, self.mean, self.std, self.name)

    def materialize(self) -> ImageDataset:
        return self if self.rows is None else self.subset(np.arange(len(self)))

    def preprocessing(self) -> dict:
        """The `preprocessing` block of checkpoints and manifests (docs/contract.md §4, §5)."""
        return {
            "input_size": self.input_size,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": "RGB" if self.in_chans == 3 else "GRAY",
            "resize": DEFAULT_RESIZE,
        }


def _dirs_to_search(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """--data-dir first (a copy the user names wins over the system one), then the Debian package's
    copy of Fashion-MNIST, then ./data/NAME."""
    dirs = []
    if data_dir is not None:
        d = Path(data_dir)
        dirs += [d / name, d / name.replace("-", "_"), d / "FashionMNIST" / "raw", d]
    if name == "fashion-mnist":
        dirs.append(FASHION_MNIST_SYSTEM_DIR)
    dirs += [Path("data") / name]
    return dirs


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def load_fashion_mnist(split: str, data_dir=None) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    searched = _dirs_to_search("fashion-mnist", data_dir)
    for d in searched:
        for ext in (".gz", ""):
            img = d / f"{prefix}-images-idx3-ubyte{ext}"
            lbl = d / f"{prefix}-labels-idx1-ubyte{ext}"
            if img.is_file() and lbl.is_file():
                images = _read_idx(img)[:, None]
                labels = _read_idx(lbl).astype(np.int64)
                mean, std = STATS["fashion-mnist"]
                return ImageDataset(
                    torch.from_numpy(images.copy()),
                    torch.from_numpy(labels),
                    FASHION_CLASSES,
                    mean,
                    std,
                    "fashion-mnist",
                )
    raise UserError(
        "Fashion-MNIST not found (looked in " + ", ".join(str(d) for d in searched) + "); "
        "install it with 'apt-get install dataset-fashion-mnist' or pass --data-dir with the four idx .gz files"
    )


def load_cifar(name: str, split: str, data_dir=None) -> ImageDataset:
    """torchvision's on-disk format: cifar-10-batches-py/ or cifar-100-python/ pickles."""
    sub, files, label_key, meta_file, names_key = (
        (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"],
            b"labels",
            "batches.meta",
            b"label_names",
        )
        if name == "cifar10"
        else (
            "cifar-100-python",
            ["train" if split == "train" else "test"],
            b"fine_labels",
            "meta",
            b"fine_label_names",
        )
    )
    searched = [d / sub for d in _dirs_to_search(name, data_dir)] + [d for d in _dirs_to_search(name, data_dir)]
    for root in searched:
        if all((root / f).is_file() for f in files) and (root / meta_file).is_file():
            xs, ys = [], []
            for f in files:
                batch = load_cifar_pickle(root / f)
                try:
                    xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    ys.append(np.asarray(batch[label_key], dtype=np.int64).reshape(-1))
                except (KeyError, TypeError, ValueError) as e:
                    raise UserError(f"{root / f} is not a CIFAR batch ({type(e).__name__}: {e})") from None
                if len(xs[-1]) != len(ys[-1]):
                    raise UserError(f"{root / f}: {len(xs[-1])} images but {len(ys[-1])} labels")
            try:
                classes = [c.decode() for c in load_cifar_pickle(root / meta_file)[names_key]]
            except (KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{root / meta_file} is not CIFAR metadata ({type(e).__name__}: {e})") from None
            mean, std = STATS[name]
            return ImageDataset(
                torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes, mean, std, name
            )
    raise UserError(
        f"{name} not found (looked for {sub}/ in "
        + ", ".join(str(d) for d in _dirs_to_search(name, data_dir))
        + "); download it with torchvision (datasets."
        + ("CIFAR10" if name == "cifar10" else "CIFAR100")
        + "(root, download=True)) on a machine with network and pass --data-dir"
    )


# What a real CIFAR batch pickle contains besides dicts, lists, bytes, str and ints: numpy arrays
# (and their dtype), pickled by Python 2 (the original files) or 3 (protocol 2, 4 or 5), and
# _codecs.encode, which protocol 2 uses for bytes. Nothing else is ever unpickled.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


CIFAR_MAX_BYTES = 512 * 1024 * 1024  # the largest real batch (cifar-100 train) is 155 MB
CIFAR_MAX_ITEMS = 1_000_000  # entries of one list (a batch holds 10,000 or 50,000)


def _check_plain(path: Path, obj: dict) -> None:
    """The real format holds a dict of plain values: numeric numpy arrays, bytes, str, ints and flat
    lists of those. Anything nested (a "billion laughs" built from shared references, which would
    expand to astronomically many items when walked) or oversized is refused before it is used."""
    for k, v in obj.items():
        if not isinstance(k, (bytes, str)):
            raise UserError(f"{path} is not a CIFAR batch: a key is a {type(k).__name__}")
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "uifb" or v.size > CIFAR_MAX_ITEMS * 3072:
                raise UserError(f"{path} is not a CIFAR batch: {k!r} is a {v.dtype} array of {v.size} values")
        elif isinstance(v, (list, tuple)):
            if len(v) > CIFAR_MAX_ITEMS:
                raise UserError(f"{path} is not a CIFAR batch: {k!r} has {len(v)} entries")
            for item in v:
                if not isinstance(item, (int, bytes, str)):
                    raise UserError(
                        f"{path} is not a CIFAR batch: {k!r} holds a {type(item).__name__} "
                        "(only flat lists of numbers and names are accepted)"
                    )
                if isinstance(item, (bytes, str)) and len(item) > 4096:
                    raise UserError(f"{path} is not a CIFAR batch: a name in {k!r} is {len(item)} long")
        elif not isinstance(v, (int, float, bytes, str)):
            raise UserError(f"{path} is not a CIFAR batch: {k!r} is a {type(v).__name__}")


def load_cifar_pickle(path: Path) -> dict:
    """A CIFAR batch (a pickle by format) with a restricted unpickler: a file that asks for any
    other class or function (a malicious ``__reduce__``) is refused and nothing in it runs; the
    result must be the format's plain types and sizes (``_check_plain``)."""
    from edgeexit.data.folder import check_entry

    st = check_entry(Path(path), Path(os.path.realpath(Path(path).parent)))
    if st.st_size > CIFAR_MAX_BYTES:
        raise UserError(f"{path} is {st.st_size >> 20} MB: not a CIFAR batch (at most {CIFAR_MAX_BYTES >> 20} MB)")
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise UserError(f"{path} is not a CIFAR batch: {e} (only numpy arrays, lists and dicts are accepted)") from None
    except RecursionError:
        raise UserError(f"{path} is not a CIFAR batch: nested too deeply") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch (a dict), it holds a {type(obj).__name__}")
    _check_plain(path, obj)
    return obj


def _load_images(paths: list[Path], size: list[int], in_chans: int) -> np.ndarray:
    """Images as uint8 (N, C, H, W), decoded in parallel and converted and resized as the runtime
    converts and resizes camera frames (edgeexit.data.folder.decode_file); any bad file is an error."""
    from edgeexit.data.folder import _console, decode_all

    _, _, _, images, _ = decode_all([str(p) for p in paths], size, in_chans, None, _console(), strict=True)
    return images


def load_tiny_imagenet(split: str, data_dir=None) -> ImageDataset:
    """Standard tiny-imagenet-200/ layout; val images re-sorted by val_annotations.txt."""
    searched = [d / "tiny-imagenet-200" for d in _dirs_to_search("tiny-imagenet", data_dir)]
    searched += _dirs_to_search("tiny-imagenet", data_dir)
    for root in searched:
        if (root / "wnids.txt").is_file() and (root / "train").is_dir():
            wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
            index = {w: i for i, w in enumerate(wnids)}
            words = {}
            if (root / "words.txt").is_file():
                for line in (root / "words.txt").read_text().splitlines():
                    if "\t" in line:
                        k, v = line.split("\t", 1)
                        words[k] = v.split(",")[0].strip()
            paths, labels = [], []
            if split == "train":
                for w in wnids:
                    for p in sorted((root / "train" / w / "images").glob("*")):
                        paths.append(p)
                        labels.append(index[w])
            else:
                ann = root / "val" / "val_annotations.txt"
                if not ann.is_file():
                    raise UserError(f"{ann} missing: Tiny-ImageNet val needs its annotations file")
                for line in ann.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 2:
                        paths.append(root / "val" / "images" / parts[0])
                        labels.append(index[parts[1]])
            images = _load_images(paths, [64, 64], 3)
            mean, std = STATS["tiny-imagenet"]
            return ImageDataset(
                torch.from_numpy(images),
                torch.tensor(labels, dtype=torch.long),
                [words.get(w, w) for w in wnids],
                mean,
                std,
                "tiny-imagenet",
            )
    raise UserError(
        "tiny-imagenet not found (looked in "
        + ", ".join(str(d) for d in searched)
        + "); unpack tiny-imagenet-200.zip under --data-dir"
    )


def load_image_folder(
    root: str | os.PathLike,
    size: list[int] | None = None,
    in_chans: int = 3,
    strict: bool = False,
    cache: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """A folder of class folders (the user's own camera images), resized to ``size``: indexed by a
    bounded walk and decoded in parallel, kept in memory when small and in the decoded-once mmap
    cache when large (edgeexit.data.folder). Mean and std are computed while decoding."""
    from edgeexit.data.folder import load_folder_images

    classes, images, labels, rows, mean, std, mapped = load_folder_images(
        root, size, in_chans, strict, cache, cache_dir
    )
    return ImageDataset(images, labels, classes, mean, std, str(root), rows, mapped)


def load_dataset(
    name: str,
    split: str,
    data_dir=None,
    image_size: list[int] | None = None,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache: str = "auto",
) -> ImageDataset:
    """``name`` is one of NAMED or a path to an ImageFolder; ``split`` is train or test.
    ``strict``: a bad image file in an ImageFolder is an error instead of being skipped.
    ``cache`` (ImageFolder): auto (in memory when small, the decoded mmap cache when large),
    always or never."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split}")
    key = canonical_dataset(name)
    if key == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, split, data_dir)
    if key == "tiny-imagenet":
        return load_tiny_imagenet(split, data_dir)
    path = Path(name)
    if path.is_dir():
        # <root>/train and <root>/test (or val) when present; otherwise the folder itself is the
        # training set (the held-out split is carved from it) and there is no test split.
        opts = dict(strict=strict, cache_dir=cache_dir, cache=cache)
        if (path / split).is_dir():
            ds = load_image_folder(path / split, image_size, **opts)
            # a test set with skipped files is compacted: its users read ``images`` whole
            return ds.materialize() if split == "test" else ds
        if split == "test" and (path / "val").is_dir():
            return load_image_folder(path / "val", image_size, **opts).materialize()
        if split == "train":
            return load_image_folder(path, image_size, **opts)
        raise UserError(f"{path} has no test/ or val/ folder; evaluate on a folder that has one")
    raise UserError(f"unknown dataset '{name}': use one of {', '.join(NAMED)} or a path to an ImageFolder")


def split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split of the training set: (train_indices, val_indices)."""
    if val_size >= n:
        raise UserError(f"--val-size {val_size} leaves no training images (the training set has {n})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def split_calibration(val_indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split halved: (calibration, verification) — thresholds are chosen on the first
    and checked on the second, so the test split is never used to choose anything."""
    perm = np.random.default_rng(seed + 1).permutation(len(val_indices))
    half = len(val_indices) // 2
    return np.sort(val_indices[perm[:half]]), np.sort(val_indices[perm[half:]])


def normalize(images_u8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32 on the same device."""
    m = torch.tensor(mean, device=images_u8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images_u8.device).view(1, -1, 1, 1)
    return (images_u8.float() / 255 - m) / s


def augment(images_u8: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding and horizontal flip, batched (paper augmentation).

    All randomness comes from ``generator`` (on the CPU) so runs are reproducible and resumable.
    """
    n, c, h, w = images_u8.shape
    padded = torch.nn.functional.pad(images_u8, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(images_u8.device)  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(images_u8.device)  # (n, w)
    if flip:
        do_flip = (torch.rand(n, generator=generator) < 0.5).to(images_u8.device)
        cols = torch.where(do_flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n, device=images_u8.device).view(n, 1, 1, 1)
    idx_c = torch.arange(c, device=images_u8.device).view(1, c, 1, 1)
    return padded[idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def random_resized_crop(
    images_u8: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """Random-resized-crop (+ horizontal flip) back to the same size, batched: one affine grid per
    image, bilinear sampling, rounded to uint8. Randomness from ``generator`` (CPU), as `augment`."""
    n, _, h, w = images_u8.shape
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_r = torch.empty(n).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])), generator=generator)
    aspect = torch.exp(log_r)
    sw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sw)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sh)
    sx = sw * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else sw
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sh, cy
    theta = theta.to(images_u8.device)
    grid = torch.nn.functional.affine_grid(theta, [n, images_u8.shape[1], h, w], align_corners=False)
    out = torch.nn.functional.grid_sample(images_u8.float(), grid, mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def load_heldout(split_info: dict, data_dir=None, dataset: str | None = None) -> ImageDataset:
    """Rebuild the held-out split recorded in a checkpoint or manifest (``split`` block)."""
    name = dataset or split_info.get("dataset")
    if not name:
        raise UserError("the artifact records no dataset; pass --data")
    cache = split_info.get("cache_dir")
    full = load_dataset(
        name,
        "train",
        data_dir if data_dir is not None else split_info.get("data_dir"),
        split_info.get("image_size"),
        cache_dir=cache if cache and Path(cache).is_dir() else None,
    )
    if split_info.get("mean") and split_info.get("std"):  # the training normalisation, not this folder's
        full.mean, full.std = list(split_info["mean"]), list(split_info["std"])
    if "num_train_total" in split_info and len(full) != int(split_info["num_train_total"]):
        raise UserError(
            f"{name} has {len(full)} training images but the model was trained with "
            f"{split_info['num_train_total']}: the held-out split cannot be rebuilt; pass --split test"
        )
    _, val_idx = split_train_val(len(full), int(split_info["val_size"]), int(split_info["val_indices_seed"]))
    return full.subset(val_idx)  # copied into memory: the held-out split is bounded (--val-size)
