"""Fixtures: a tiny real model (width 0.0625, trained briefly on real Fashion-MNIST) and its export.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (`make test` installs it). Other
datasets are built here in their real on-disk formats by the tests that need them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeexit.errors import UserError


@pytest.fixture(scope="session", autouse=True)
def _one_click_command_per_app():
    """typer's CliRunner rebuilds the Click command from the Typer app on every ``invoke``,
    inspecting every command's signature again: most of the time of a CLI test that stops at a
    refusal. The app does not change during a run, so each app's command is built once."""
    import typer.testing

    build = typer.testing._get_command
    built: dict[int, tuple] = {}  # id(app) -> (app, command); the app is kept so its id stays unique

    def cached(app):
        if id(app) not in built:
            built[id(app)] = (app, build(app))
        return built[id(app)][1]

    typer.testing._get_command = cached
    yield
    typer.testing._get_command = build


@pytest.fixture(scope="session")
def fashion_test():
    from edgeexit.data import load_dataset

    try:
        return load_dataset("fashion-mnist", "test")
    except UserError as e:
        pytest.fail(f"Fashion-MNIST is required by the suite: {e}")


def tiny_config(out: Path, method: str = "mlcsd", epochs: int = 1, train_images: int = 1024, **kw):
    from edgeexit.train.trainer import TrainConfig

    kw = {"width": 0.0625, "batch_size": 64, "lr": 0.05, **kw}
    cfg = TrainConfig.from_recipe("fashion-mnist", method, out=str(out), epochs=epochs, train_images=train_images, **kw)
    cfg.recipe = replace(cfg.recipe, val_size=600)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fashion_test):
    """A trained 8-exit model: (run folder, train result)."""
    from edgeexit.train.trainer import train

    out = tmp_path_factory.mktemp("run")
    result = train(tiny_config(out, epochs=2, train_images=2048), progress=False)
    return out, result


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_run):
    """The tiny model exported (ONNX only): a pristine copy per session; tests copy it before changing it."""
    from edgeexit.export.exporter import export_checkpoint

    dest = tmp_path_factory.mktemp("export") / "model.edgeexit"
    export_checkpoint(tiny_run[0] / "model.pt", out=dest, parity_images=128)
    return dest


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    import shutil

    dest = tmp_path / "model.edgeexit"
    shutil.copytree(tiny_artifact, dest)
    return dest


@pytest.fixture(scope="session")
def test_frames(fashion_test):
    """1,000 real test images as uint8 HxWx1 frames, with labels."""
    n = 1000
    return fashion_test.images[:n].permute(0, 2, 3, 1).numpy(), fashion_test.labels[:n].numpy()


def cli(*args):
    """`edgeexit ARGS` run in-process by typer's CliRunner; a traceback in its output fails the test."""
    from typer.testing import CliRunner

    from edgeexit.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def edit_manifest(artifact: Path, change) -> None:
    """Apply ``change`` (a function of the parsed manifest) to the artifact's manifest.json on disk."""
    path = artifact / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def dead_pid() -> int:
    """The id of a process that has exited and been reaped (a writer that died)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def normalised(ds, n=None):
    from edgeexit.data import normalize

    imgs = ds.images if n is None else ds.images[:n]
    return normalize(imgs, ds.mean, ds.std).numpy().astype(np.float32)


def photo_folder(root: Path, train_per_class: int = 12, test_per_class: int = 4) -> Path:
    """A small ImageFolder of real photographs (matplotlib ships them: Grace Hopper's portrait and a
    product photo), cropped and flipped into three classes, at sizes that are not 224 px so that
    every image is resized: face / uniform (two regions of the portrait) and pack."""
    import os

    import matplotlib
    from PIL import Image

    sample = Path(os.path.dirname(matplotlib.__file__)) / "mpl-data" / "sample_data"
    hopper = Image.open(sample / "grace_hopper.jpg").convert("RGB")  # 512 x 600
    pack = Image.open(sample / "Minduka_Present_Blue_Pack.png").convert("RGB").resize((300, 300))
    regions = {
        "face": (hopper, (120, 40, 400, 330)),
        "uniform": (hopper, (40, 360, 480, 600)),
        "pack": (pack, (0, 0, 300, 300)),
    }
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for cls, (img, (x0, y0, x1, y1)) in regions.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = x1 - x0, y1 - y0
                s = rng.uniform(0.6, 0.95)
                cw, ch = int(w * s), int(h * s)
                cx, cy = x0 + rng.integers(0, w - cw + 1), y0 + rng.integers(0, h - ch + 1)
                crop = img.crop((cx, cy, cx + cw, cy + ch))
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{cls}_{i:02d}.{'jpg' if i % 2 else 'png'}")
    return root
