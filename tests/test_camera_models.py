"""Camera models at 224 px: resize equality, checkpoint normalisation, the whole flow."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import photo_folder
from PIL import Image

from edgeexit.data import load_dataset
from edgeexit.runtime.preprocessing import Preprocessor


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos"), train_per_class=30)


def test_training_resize_equals_the_runtime_resize_at_224(photos):
    ds = load_dataset(str(photos), "train", image_size=[224, 224])
    files = sorted(p for p in (photos / "train").rglob("*") if p.is_file())
    assert ds.images.shape[1:] == (3, 224, 224) and len(files) == len(ds)
    pre = Preprocessor(ds.preprocessing())
    assert pre.resize == "area"
    resized = 0
    for path, img in zip(files, ds.images, strict=True):  # the loader's order: class folders, sorted files
        frame = np.asarray(Image.open(path).convert("RGB"))
        resized += frame.shape[:2] != (224, 224)
        expected = (
            (img.numpy().astype(np.float32) / 255) - np.asarray(ds.mean, np.float32)[:, None, None]
        ) / np.asarray(ds.std, np.float32)[:, None, None]
        np.testing.assert_allclose(pre(frame), expected, atol=1e-6)
    assert resized >= len(files) - 2  # real resizes (up and down), not copies


def test_eval_normalises_with_the_checkpoint_statistics(tmp_path, monkeypatch):
    """A test folder far brighter than the training folder: eval must use the training statistics."""
    from edgeexit.train import evaluation
    from edgeexit.train.trainer import TrainConfig, train

    for split, level in (("train", 40), ("test", 200)):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(10):
                arr = np.full((32, 32, 3), level + (30 if cls == "b" else 0) + i, np.uint8)
                Image.fromarray(arr).save(tmp_path / "data" / split / cls / f"{i}.png")
    cfg = TrainConfig.from_recipe(
        str(tmp_path / "data"), "ce", out=str(tmp_path / "run"), epochs=1, width=0.0625, batch_size=8, val_size=4
    )
    train(cfg, progress=False)
    seen = {}
    real = evaluation.evaluate

    def spy(model, test, val, **kw):
        seen["mean"], seen["std"] = list(test.mean), list(test.std)
        return real(model, test, val, **kw)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    evaluation.evaluate_checkpoint(tmp_path / "run" / "model.pt")
    from edgeexit.train.checkpoint import load_checkpoint

    pre = load_checkpoint(tmp_path / "run" / "model.pt")["preprocessing"]
    assert seen["mean"] == pre["mean"] and seen["std"] == pre["std"]
    assert pre["mean"][0] < 0.3  # the training folder's (dark) statistics, not the test folder's


@pytest.mark.slow
def test_the_whole_flow_at_224_px(photos, tmp_path):
    """imagenet stem, 224 px: train → export → calibrate → run on photographs of other sizes."""
    import json

    from typer.testing import CliRunner

    from edgeexit.cli import app

    run = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--data", str(photos), "--stem", "imagenet", "--width", "0.125", "--epochs", "2"]
    res = run.invoke(app, [*args, "--batch-size", "8", "--val-size", "44", "--method", "ce", "--out", str(out)])
    assert res.exit_code == 0, res.output
    from edgeexit.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["config"]["stem"] == "imagenet" and ckpt["preprocessing"]["input_size"] == [224, 224]
    assert ckpt["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    art = tmp_path / "model.edgeexit"
    res = run.invoke(app, ["export", str(out / "model.pt"), "--out", str(art), "--parity-samples", "6"])
    assert res.exit_code == 0, res.output
    # 150 %: budget mode that timing noise cannot push below the cheapest cascade (at 224 px exit 1 costs
    # about what the full model does: the stem dominates; 90 % failed under a loaded CPU)
    res = run.invoke(app, ["calibrate", str(art), "--budget", "150%", "--backend", "onnxruntime", "--repeats", "20"])
    assert res.exit_code == 0, res.output
    res = run.invoke(app, ["run", str(art), "--source", str(photos / "test"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["frames"] == 12
