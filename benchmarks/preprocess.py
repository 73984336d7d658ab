"""What a camera frame costs before the cascade sees it: edgeexit's preprocessing against OpenCV's,
at camera resolutions, and against the 224-px model's cascade.

    python benchmarks/preprocess.py --json docs/preprocess.json --before ee369cf   # timing tables
    python benchmarks/preprocess.py --artifact224 runs/cam/model.edgeexit  # + the cascade at 1080p
    python benchmarks/preprocess.py --accuracy /tmp/run/model.edgeexit     # + the shrink's accuracy effect
    python benchmarks/preprocess.py --predict runs/x/model.edgeexit        # + whole predict, area vs bilinear

1. Timing. Two models (28-px gray, 224-px RGB) x four frames (the model's own size, 640x480,
   1280x720, 1920x1080, uint8 BGR as OpenCV captures them) x four ways to make the network's float
   input: edgeexit's ``Preprocessor`` with the area shrink (the default for new models), the same with
   the older bilinear resize (models trained before it), and OpenCV pipelines a user would write
   (``cvtColor`` + ``resize`` with INTER_AREA or INTER_LINEAR + normalisation in numpy). Every round
   runs all four once, in a random order (interleaved, so each comparison is made on the same moments
   of the machine); medians over rounds, and the ratio ours / OpenCV INTER_AREA with a bootstrap 95 %
   interval over rounds.
2. The cascade (``--artifact224``): ``Cascade.predict`` on a 1080p BGR frame with the artifact's
   thresholds, its full model, and its first exit only, interleaved: ``preprocess_ms`` against
   ``latency_ms`` (the cascade).
3. Accuracy (``--accuracy ART``, a model trained on 28-px Fashion-MNIST): the test images shown as a
   camera would show them, larger than the model's input (bilinear upscale by k = 2..8, plus sensor
   noise), brought back to 28 px by the area shrink and by the bilinear resize; the full model's test
   accuracy for each, and the paired difference with a 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np

SIZES = [(640, 480), (1280, 720), (1920, 1080)]


def _opencv_pipeline(cv2, interp, in_chans, size, mean, std):
    h, w = size
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(-1, 1, 1)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(-1, 1, 1)
    code = cv2.COLOR_BGR2GRAY if in_chans == 1 else cv2.COLOR_BGR2RGB

    def run(frame):
        img = cv2.resize(cv2.cvtColor(frame, code), (w, h), interpolation=interp)
        img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
        return img.astype(np.float32) * scale - shift

    return run


def _old_preprocessor(rev: str):
    """`Preprocessor` as it was at git revision ``rev`` (the before of a before/after table)."""
    import importlib.util
    import subprocess
    import tempfile

    text = subprocess.run(
        ["git", "show", f"{rev}:edgeexit/runtime/preprocessing.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"preprocessing_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Preprocessor


BEFORE: str | None = None  # --before REV


def _methods(in_chans, size):
    import cv2

    from edgeexit.runtime.preprocessing import Preprocessor

    mean, std = [0.5] * in_chans, [0.25] * in_chans
    block = {"in_chans": in_chans, "input_size": list(size), "mean": mean, "std": std}
    before = {f"edgeexit at {BEFORE}": _old_preprocessor(BEFORE)(block, input_order="BGR")} if BEFORE else {}
    return {
        **before,
        "edgeexit area": Preprocessor({**block, "resize": "area"}, input_order="BGR"),
        "edgeexit bilinear (older models)": Preprocessor({**block, "resize": "bilinear"}, input_order="BGR"),
        "OpenCV INTER_AREA": _opencv_pipeline(cv2, cv2.INTER_AREA, in_chans, size, mean, std),
        "OpenCV INTER_LINEAR": _opencv_pipeline(cv2, cv2.INTER_LINEAR, in_chans, size, mean, std),
    }


def _interleaved(fns: dict, arg, rounds: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = random.Random(seed)
    names = list(fns)
    for name in names:  # warm-up: first-call allocations out of the measurement
        fns[name](arg)
    times = {n: [] for n in names}
    clock = time.perf_counter
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t = clock()
            fns[name](arg)
            times[name].append((clock() - t) * 1e3)
    return {n: np.asarray(v) for n, v in times.items()}


def _ratio_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of medians a/b over paired rounds, with a bootstrap 95 % interval (rounds resampled)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    boots = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return float(np.median(a) / np.median(b)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def timing(rounds: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for in_chans, model_size in ((1, (28, 28)), (3, (224, 224))):
        fns = _methods(in_chans, model_size)
        for w, h in [(model_size[1], model_size[0]), *SIZES]:
            # a frame with image-like structure (smooth gradients + texture), not white noise
            yy, xx = np.mgrid[0:h, 0:w]
            base = (127 + 60 * np.sin(xx / 37.0) * np.cos(yy / 23.0))[:, :, None]
            frame = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            times = _interleaved(fns, frame, rounds)
            ours, area = times["edgeexit area"], times["OpenCV INTER_AREA"]
            ratio, lo, hi = _ratio_ci(ours, area)
            row = {
                "model": f"{model_size[0]}-px {'gray' if in_chans == 1 else 'RGB'}",
                "frame": f"{w}x{h}",
                **{f"{k} ms": round(float(np.median(v)), 4) for k, v in times.items()},
                "ours / OpenCV INTER_AREA": [round(ratio, 3), round(lo, 3), round(hi, 3)],
            }
            rows.append(row)
            print(json.dumps(row))
    return rows


def _interleaved_predicts(views: dict, frame: np.ndarray, rounds: int, seed: int) -> dict[str, dict[str, list]]:
    """Each cascade view's `predict` on ``frame`` once per round, in a random order per round (after
    one warm-up call each): per view the preprocess, cascade and whole-call ms of every round."""
    order = list(views)
    got = {m: {"pre": [], "casc": [], "total": []} for m in order}
    for m in order:
        views[m].predict(frame)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for m in order:
            t = time.perf_counter()
            p = views[m].predict(frame)
            got[m]["total"].append((time.perf_counter() - t) * 1e3)
            got[m]["pre"].append(p.preprocess_ms)
            got[m]["casc"].append(p.latency_ms)
    return got


def cascade_at_1080p(artifact: Path, rounds: int) -> dict:
    from edgeexit.runtime import Cascade

    cascade = Cascade.load(artifact, backend="onnxruntime", input_order="BGR")
    k = cascade.num_exits
    plans = {"full model": [2.0] * (k - 1) + [0.0], "first exit only": [0.0] + [2.0] * (k - 2) + [0.0]}
    if cascade.artifact.calibration is not None and cascade.artifact.calibration.thresholds is not None:
        plans = {"calibrated plan": list(cascade.artifact.calibration.thresholds), **plans}
    views = {name: cascade.derive(thresholds=th) for name, th in plans.items()}
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    got = _interleaved_predicts(views, frame, rounds, seed=2)
    pre, casc = {n: got[n]["pre"] for n in views}, {n: got[n]["casc"] for n in views}
    out = {}
    for name in views:
        pm, cm = float(np.median(pre[name])), float(np.median(casc[name]))
        out[name] = {
            "preprocess_ms": round(pm, 4),
            "cascade_ms": round(cm, 4),
            "preprocess / cascade": round(pm / cm, 4),
        }
        print(name, json.dumps(out[name]))
    cascade.close()
    return out


def whole_predict(artifact: Path, rounds: int) -> list[dict]:
    """`Cascade.predict` on uint8 BGR frames of each size, the frame shrunk by area and by the older
    bilinear resize (the same cascade, its preprocessor swapped), interleaved: median preprocessing,
    cascade and total ms (the issue's before/after table)."""
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.preprocessing import Preprocessor

    base = Cascade.load(artifact, backend="onnxruntime", input_order="BGR")
    views = {}
    for method in ("area", "bilinear"):
        view = base.derive()
        view.preprocessor = Preprocessor({**base.artifact.preprocessing.to_dict(), "resize": method}, "BGR")
        views[method] = view
    if BEFORE:
        view = base.derive()
        view.preprocessor = _old_preprocessor(BEFORE)(base.artifact.preprocessing.to_dict(), "BGR")
        views[f"at {BEFORE}"] = view
    h, w = base.preprocessor.height, base.preprocessor.width
    rng = np.random.default_rng(3)
    rows = []
    for fw, fh in [(w, h), *SIZES]:
        frame = rng.integers(0, 256, (fh, fw, 3), dtype=np.uint8)
        got = _interleaved_predicts(views, frame, rounds, seed=4)
        row = {"frame": f"{fw}x{fh}"}
        for m in views:
            row[f"{m}: preprocess ms"] = round(float(np.median(got[m]["pre"])), 3)
            row[f"{m}: cascade ms"] = round(float(np.median(got[m]["casc"])), 3)
            row[f"{m}: whole predict ms"] = round(float(np.median(got[m]["total"])), 3)
        rows.append(row)
        print(json.dumps(row))
    base.close()
    return rows


def accuracy(
    artifact: Path, factors=(2, 2.5, 3, 4, 5.5, 8), noise: float = 12.0, limit: int = 10000, upscale: str = "bilinear"
) -> list[dict]:
    """The full model's accuracy on test images shown larger than its input, per resize. ``upscale``:
    how the larger image is made from the 28-px one: "bilinear" (smooth; a bilinear sample at the
    right phase recovers the original pixels exactly, which favours the bilinear resize) or "nearest"
    (each original pixel a k x k patch), both aligned with the model's grid, which a point sample at
    the right phase undoes; or "camera": the object off the grid (rotated up to 4 degrees, scaled
    k +- 5 %, shifted by a sub-pixel offset, bicubic), as a camera sees it."""
    from PIL import Image

    from edgeexit.data import load_dataset
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.preprocessing import Preprocessor

    test = load_dataset("fashion-mnist", "test")
    images = test.images[:limit].numpy()[:, 0]  # (N, 28, 28) uint8
    labels = test.labels[:limit].numpy()
    cascade = Cascade.load(artifact, backend="onnxruntime")
    full = cascade.derive(thresholds=[2.0] * (cascade.num_exits - 1) + [0.0])
    block = cascade.artifact.preprocessing
    pres = {m: Preprocessor({**block.to_dict(), "resize": m}) for m in ("area", "bilinear")}
    rng = np.random.default_rng(0)
    rows = []
    for k in factors:
        size = round(28 * k)
        correct = {m: np.zeros(len(images), bool) for m in pres}
        for i, img in enumerate(images):
            if upscale == "camera":
                # an object the camera sees off the training grid: a small rotation, a sub-pixel offset
                # and a scale a few percent off k, resampled bicubically (an inverse affine map)
                theta, zoom = np.deg2rad(rng.uniform(-4, 4)), k * rng.uniform(0.95, 1.05)
                c, s_ = np.cos(theta) / zoom, np.sin(theta) / zoom
                cx = 14 - (c * size / 2 - s_ * size / 2) + rng.uniform(-0.5, 0.5)
                cy = 14 - (s_ * size / 2 + c * size / 2) + rng.uniform(-0.5, 0.5)
                big = Image.fromarray(img).transform((size, size), Image.AFFINE, (c, -s_, cx, s_, c, cy), Image.BICUBIC)
                big = np.asarray(big, np.float32)
            else:
                how = Image.BILINEAR if upscale == "bilinear" else Image.NEAREST
                big = np.asarray(Image.fromarray(img).resize((size, size), how), np.float32)
            big = np.clip(big + rng.normal(0, noise, big.shape), 0, 255).astype(np.uint8)
            for m, pre in pres.items():
                x = pre(big)
                correct[m][i] = full.predict(x).label == labels[i]
        d = correct["area"].astype(float) - correct["bilinear"].astype(float)
        boot = np.random.default_rng(1).integers(0, len(d), (2000, len(d)))
        lo, hi = np.percentile(d[boot].mean(axis=1), [2.5, 97.5]) * 100
        row = {
            "shown at": f"{size}x{size} ({k}x, {upscale} upscale, noise sd {noise:g})",
            "area %": round(100 * correct["area"].mean(), 2),
            "bilinear %": round(100 * correct["bilinear"].mean(), 2),
            "area - bilinear pt": [round(100 * d.mean(), 2), round(float(lo), 2), round(float(hi), 2)],
        }
        rows.append(row)
        print(json.dumps(row))
    cascade.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--artifact224", type=Path, help="a 224-px RGB artifact: time its cascade at 1080p")
    ap.add_argument("--accuracy", type=Path, help="a 28-px Fashion-MNIST artifact: the shrink's accuracy effect")
    ap.add_argument("--predict", type=Path, help="an artifact: whole Cascade.predict per frame size, area vs bilinear")
    ap.add_argument("--accuracy-images", type=int, default=10000)
    ap.add_argument("--upscale", choices=["bilinear", "nearest", "camera", "all"], default="all")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--before", metavar="REV", help="also time Preprocessor as it was at this git revision")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global BEFORE
    BEFORE = args.before
    import cv2
    import onnxruntime

    result = {
        "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "onnxruntime": onnxruntime.__version__,
        "rounds": args.rounds,
    }
    if not args.skip_timing:
        result["timing"] = timing(args.rounds)
    if args.artifact224:
        result["cascade_1080p"] = cascade_at_1080p(args.artifact224, max(20, args.rounds // 4))
    if args.predict:
        result["whole_predict"] = whole_predict(args.predict, max(20, args.rounds // 4))
    if args.accuracy:
        ups = ["bilinear", "nearest", "camera"] if args.upscale == "all" else [args.upscale]
        result["accuracy"] = [r for u in ups for r in accuracy(args.accuracy, limit=args.accuracy_images, upscale=u)]
    if args.json:
        from edgeexit.util import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
