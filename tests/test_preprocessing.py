"""The frame → network input conversion: the area shrink's definition, anti-aliasing, channel orders,
the older bilinear resize for older models, training's reader and the runtime agreeing bit for bit on
real PNG/JPEG files, and the frame's cost reported apart from the cascade's."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeexit.runtime.preprocessing import (
    Preprocessor,
    frame_to_input_uint8,
    resize_bilinear,
    resize_uint8,
    shrink_area,
    to_gray,
)


def _reference(img: np.ndarray, oh: int, ow: int, gray: bool = False) -> np.ndarray:
    """The area shrink's definition in float64, written independently: centred crop to whole f x f
    blocks, block means, bilinear at half-pixel centres mapped onto the block grid, clipped."""
    h, w, c = img.shape

    def axis(n, o):
        f = max(1, n // o)
        b = n // f
        return f, (n - b * f) // 2, b

    fy, oy, by = axis(h, oh)
    fx, ox, bx = axis(w, ow)
    a = img[oy : oy + by * fy, ox : ox + bx * fx].astype(np.float64).reshape(by, fy, bx, fx, c).mean(axis=(1, 3))
    if gray and c == 3:
        a = (a @ (np.array([19595, 38470, 7471]) / 65536))[:, :, None]
    ys = np.clip(((np.arange(oh) + 0.5) * h / oh - 0.5 - oy - (fy - 1) / 2) / fy, 0, by - 1)
    xs = np.clip(((np.arange(ow) + 0.5) * w / ow - 0.5 - ox - (fx - 1) / 2) / fx, 0, bx - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, by - 1), np.minimum(x0 + 1, bx - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bottom = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


@pytest.mark.parametrize(
    "shape", [(1080, 1920, 3), (720, 1280, 3), (480, 640, 3), (57, 91, 3), (300, 300, 1), (37, 23, 3), (4000, 30, 3)]
)
@pytest.mark.parametrize("out", [(224, 224), (28, 28), (50, 40)])
def test_area_shrink_matches_its_definition(shape, out):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    for gray in (False, True) if shape[2] == 3 else (False,):
        got = shrink_area(img, *out, gray=gray)
        assert got.shape == (*out, 1 if gray else shape[2]) and got.dtype == np.uint8
        # float32 arithmetic against float64, then one rounding: never more than half a level plus ulps
        assert np.abs(got.astype(np.float64) - _reference(img, *out, gray=gray)).max() <= 0.5 + 1e-3


def test_an_integer_shrink_is_the_exact_block_mean():
    img = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    means = img.reshape(24, 4, 32, 4, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(shrink_area(img, 24, 32), np.clip(np.rint(means), 0, 255).astype(np.uint8))


def test_the_area_shrink_does_not_alias_where_the_bilinear_sample_does():
    """A 1-pixel checkerboard at 1080p is mid-gray to any anti-aliased shrink; a 4-pixel bilinear
    sample lands on whichever squares the grid happens to hit."""
    yy, xx = np.mgrid[0:1080, 0:1920]
    board = np.where((yy + xx) % 2 == 0, 255, 0).astype(np.uint8)[:, :, None].repeat(3, axis=2)
    area = shrink_area(board, 224, 224)
    bilinear = resize_uint8(board, 224, 224)
    assert np.abs(area.astype(int) - 127.5).max() <= 1.5
    assert np.abs(bilinear.astype(int) - 127.5).max() >= 60


def test_noise_is_averaged_by_the_area_shrink():
    """Sensor noise of sd 40 on a flat gray 1080p frame: the area shrink averages 4 x 8 pixels per
    output pixel (sd / sqrt(32) before the last bilinear step), the bilinear sample about 2."""
    rng = np.random.default_rng(0)
    frame = np.clip(128 + rng.normal(0, 40, (1080, 1920, 3)), 0, 255).astype(np.uint8)
    assert shrink_area(frame, 224, 224).std() < 40 / np.sqrt(32) * 1.2
    assert resize_uint8(frame, 224, 224).std() > 40 / 2 * 0.8


@pytest.mark.parametrize("in_chans", [1, 3])
def test_bgr_frames_give_the_rgb_frames_bytes(in_chans):
    img = np.random.default_rng(5).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    rgb = frame_to_input_uint8(img, 28, 28, in_chans, "area")
    bgr = frame_to_input_uint8(np.ascontiguousarray(img[:, :, ::-1]), 28, 28, in_chans, "area", bgr=True)
    np.testing.assert_array_equal(rgb, bgr)


def test_older_models_keep_the_bilinear_resize_they_were_trained_with():
    img = np.random.default_rng(6).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    block = {"in_chans": 1, "input_size": [28, 28], "mean": [0.5], "std": [0.25]}
    for resize in (None, "bilinear"):
        pre = Preprocessor({**block, "resize": resize} if resize else block)
        assert pre.resize == "bilinear"
        # the whole frame converted to float and resized: what models trained before the area shrink saw
        whole = np.clip(np.rint(resize_bilinear(to_gray(img).astype(np.float32), 28, 28)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(pre._from_uint8(img), pre._lut[0][whole[:, :, 0]][None])
    with pytest.raises(ValueError, match="resize 'lanczos'"):
        Preprocessor({**block, "resize": "lanczos"})


@pytest.mark.parametrize("shape", [(1080, 1920, 3), (61, 97, 3), (20, 30, 1), (480, 640, 3)])
@pytest.mark.parametrize("out", [(28, 28), (224, 224), (50, 40)])
def test_the_bilinear_resize_gathers_only_what_it_uses_bit_for_bit(shape, out):
    """The older resize reads only the rows and columns its taps touch: the same float arithmetic on
    the same pixels as resizing the whole converted frame."""
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    whole = np.clip(np.rint(resize_bilinear(img.astype(np.float32), *out)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(resize_uint8(img, *out), whole)
    if shape[2] == 3:
        gray = np.clip(np.rint(resize_bilinear(to_gray(img).astype(np.float32), *out)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(resize_uint8(img, *out, gray=True), gray)


@pytest.mark.parametrize("in_chans,fmt", [(3, "PNG"), (1, "JPEG"), (3, "JPEG")])
def test_training_reader_and_runtime_agree_bit_for_bit_on_camera_sized_files(tmp_path, in_chans, fmt):
    """The folder reader (training) and `Preprocessor` (a frame from OpenCV, BGR) make the same bytes
    from the same file at 2-8x the model's input."""
    from edgeexit.data.folder import decode_file

    rng = np.random.default_rng(in_chans)
    for i, (w, h) in enumerate([(640, 480), (250, 190), (97, 61)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 80 * np.sin(xx / 7.0 + i) * np.cos(yy / 5.0)
        arr = np.clip(base[:, :, None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"f{i}.{fmt.lower()}"
        Image.fromarray(arr).save(path, format=fmt)
        trained = decode_file(str(path), [28, 32], in_chans)  # (C, H, W) uint8
        decoded = np.asarray(Image.open(path).convert("RGB"))
        pre = Preprocessor(
            {"in_chans": in_chans, "input_size": [28, 32], "mean": [0.5] * in_chans, "std": [0.25] * in_chans,
             "resize": "area"},
            input_order="BGR",
        )  # fmt: skip
        ran = pre(np.ascontiguousarray(decoded[:, :, ::-1]))
        expected = (trained.astype(np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.25)
        np.testing.assert_array_equal(ran, expected)


def test_prediction_reports_the_frame_apart_from_the_cascade(tiny_artifact):
    from edgeexit.runtime import Cascade

    with Cascade.load(tiny_artifact, backend="onnxruntime", input_order="BGR") as cascade:
        small = np.full((28, 28, 3), 90, np.uint8)
        big = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        for frame in (small, big):
            cascade.predict(frame)  # warm-up
        p_small, p_big = cascade.predict(small), cascade.predict(big)
        for p in (p_small, p_big):
            assert p.preprocess_ms > 0 and p.latency_ms > 0
            assert p.total_ms == pytest.approx(p.preprocess_ms + p.latency_ms)
        # the same answer as the frame converted beforehand: the split changes what is timed, not what runs
        ready = cascade.preprocessor(big)
        assert cascade.predict(ready).label == p_big.label
        batch = cascade.predict_batch([big, big, small])
        assert len({p.preprocess_ms for p in batch}) == 1 and batch[0].preprocess_ms > 0


@pytest.mark.slow
def test_calibrate_frame_size_budgets_the_frame(artifact_copy):
    """--frame-size: preprocessing at that size is measured here and taken off the budget; a share
    budget is of the full model's frame-to-answer time. Without it the block says the budget covers
    the cascade on network-size frames."""
    from edgeexit.calibrate.run import run_calibration
    from edgeexit.runtime.artifact import Artifact

    r = run_calibration(
        artifact_copy, budget_fraction=1.5, backend="onnxruntime", repeats=30, verify_images=100,
        iso_accuracy=False, ladder_steps=2, frame_size=(1280, 720))  # fmt: skip
    frame = r["frame"]
    assert frame["covers"] == "frame" and frame["size"] == [1280, 720] and frame["network_size"] == [28, 28]
    pre_ms = frame["preprocess"]["mean_ms"]
    assert pre_ms > 0 and frame["rounds"] > 0
    # the cascade gets 150 % of (full model + preprocessing), less the preprocessing
    assert r["budget_ms"] == pytest.approx(1.5 * (r["full_model"]["predicted_ms"] + pre_ms) - pre_ms)
    stored = Artifact.load(artifact_copy).calibration.block["frame"]  # read back frozen (tuples)
    assert list(stored["size"]) == [1280, 720] and stored["preprocess"]["mean_ms"] == pre_ms
    from typer.testing import CliRunner

    from edgeexit.cli import app

    shown = CliRunner().invoke(app, ["info", str(artifact_copy)], terminal_width=200)
    assert shown.exit_code == 0 and "the budget covers 1280x720 frames: preprocessing" in shown.output
    plain = run_calibration(
        artifact_copy, budget_fraction=1.5, backend="onnxruntime", repeats=30, verify_images=100,
        iso_accuracy=False, ladder_steps=2)  # fmt: skip
    assert plain["frame"] == {"size": None, "network_size": [28, 28], "covers": "cascade"}
    shown = CliRunner().invoke(app, ["info", str(artifact_copy)], terminal_width=200)
    assert "the budget covers the cascade on 28x28 frames" in shown.output
    assert plain["budget_ms"] == pytest.approx(1.5 * plain["full_model"]["predicted_ms"])


@pytest.mark.parametrize(
    "args,says",
    [
        (["--frame-size", "1920"], "--frame-size must be WIDTHxHEIGHT"),
        (["--frame-size", "0x480"], "each 1..16384"),
        # calibrate profiles the units and times a 1920x1080 conversion before it can refuse
        pytest.param(
            ["--frame-size", "1920x1080", "--budget", "1us"],
            "used up by converting a 1920x1080 frame",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_calibrate_frame_size_refusals_are_one_line(artifact_copy, args, says):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    argv = ["calibrate", str(artifact_copy), "--backend", "onnxruntime", "--repeats", "20", *args]
    if "--budget" not in args:
        argv += ["--budget", "50%"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output


def test_run_budget_has_calibrates_meaning(artifact_copy):
    """`run --budget` after `calibrate --frame-size`: the budget covers the frame, so the controller
    holds the cascade at the budget less the preprocessing calibrate measured; a hostile value there
    is a one-line refusal."""
    import json

    from edgeexit.cli import _run_budget_ms
    from edgeexit.errors import UserError
    from edgeexit.runtime.manifest import write_calibration

    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    block = {
        "thresholds": [2.0] * 7 + [0.0], "metric": "mean", "full_model": {"predicted_ms": 2.0},
        "frame": {"size": [1920, 1080], "covers": "frame", "preprocess": {"mean_ms": 1.5, "p95_ms": 2.0}},
    }  # fmt: skip
    from edgeexit.runtime.artifact import Artifact

    art = Artifact.load(artifact_copy)
    write_calibration(art, {**(manifest.get("calibration") or {}), **block})
    assert _run_budget_ms(artifact_copy, "5ms") == pytest.approx(3.5)
    assert _run_budget_ms(artifact_copy, "50%") == pytest.approx(0.5 * (2.0 + 1.5) - 1.5)
    with pytest.raises(UserError, match="used up by converting a 1920x1080 frame"):
        _run_budget_ms(artifact_copy, "1ms")
    block["frame"]["preprocess"]["mean_ms"] = "abc"
    with pytest.raises(UserError, match="calibration.frame.preprocess.mean_ms must be a number"):
        write_calibration(Artifact.load(artifact_copy), {**(manifest.get("calibration") or {}), **block})
    from conftest import edit_manifest  # a hostile manifest on disk: refused when read, one line

    edit_manifest(artifact_copy, lambda m: m["calibration"]["frame"]["preprocess"].update(mean_ms="abc"))
    with pytest.raises(UserError, match="calibration.frame.preprocess.mean_ms must be a number"):
        _run_budget_ms(artifact_copy, "5ms")
