"""`edgeexit export`: checkpoint -> NAME.edgeexit/ (ONNX per unit, parity, engines, manifest).

Everything is written into a temporary folder beside the destination and renamed at the end, so
an interrupted or failed export leaves nothing behind (and an existing artifact is only replaced,
with --force, once the new one is complete).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from edgeexit import __version__
from edgeexit.errors import UserError
from edgeexit.runtime.artifact import MANIFEST_NAME, Artifact, Unit
from edgeexit.util import atomic_write_json, esc, remove_stale_temps, temp_prefix

MIN_OPSET, MAX_OPSET = 17, 20


def _stage(console, text: str, t0: float) -> None:
    if console is not None:
        console.print(f"  {text} [dim]({time.perf_counter() - t0:.1f}s)[/]")


@dataclass(frozen=True)
class ExportOptions:
    """Every option of `edgeexit export`, validated in one place. Field ``x_y`` is the flag ``--x-y``
    (errors name the flag)."""

    out: str | os.PathLike | None = None
    format: str = "onnx"
    half: bool = False
    batch: int = 64  # the TensorRT profile's largest batch
    batch_opt: int = 1  # the TensorRT profile is tuned for this batch (the camera path runs 1)
    workspace: float = 2.0  # GiB
    opset: int = 17
    simplify: bool = True
    parity_images: int = 256
    tolerance: float = 1e-3
    force: bool = False
    data_dir: str | None = None
    calib_images: int = 5000  # held-out images stored in the artifact for on-device calibration
    int8: bool = False  # also write Q/DQ INT8 units
    int8_images: int = 512  # held-out images that calibrate the INT8 activation ranges
    int8_method: str = "minmax"
    int8_tolerance: float = 0.01  # largest per-exit accuracy drop INT8 vs FP32 (fraction) before failing

    def __post_init__(self) -> None:
        from edgeexit.export.quantize import METHODS

        choices = {"format": ("onnx", "engine"), "int8_method": METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{_flag(name)} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        for name, (low, high) in {**_INT_RANGES, "batch_opt": (1, self.batch)}.items():
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and low <= v <= high):
                raise UserError(f"{_flag(name)} must be within {low}..{high}, got {v!r}")
        for name, (bottom, top, bottom_included) in _REAL_RANGES.items():
            x = getattr(self, name)
            finite = isinstance(x, int | float) and math.isfinite(x)
            above = finite and (bottom < x or (bottom_included and x == bottom))
            if not (above and x < top):
                raise UserError(f"{_flag(name)} must be {_real_range(bottom, top)}, got {x}")
        defaults = {f.name: f.default for f in fields(self)}
        engine_only = [_flag(k) for k in ENGINE_ONLY if getattr(self, k) != defaults[k]]
        if self.format == "onnx" and engine_only:
            raise UserError(
                f"{', '.join(engine_only)} configure{'s' if len(engine_only) == 1 else ''} the TensorRT engines: "
                "add --format engine, or leave them out"
            )


def _flag(field_name: str) -> str:
    """An `ExportOptions` field's flag: the field is the flag (``int8_images`` is ``--int8-images``)."""
    return "--" + field_name.replace("_", "-")


# Range checks, one small table per kind of value.
_INT_RANGES = {  # low..high, both included (--batch-opt: 1..--batch, checked beside them)
    "int8_images": (16, 10_000),
    "calib_images": (0, 100_000),
    "opset": (MIN_OPSET, MAX_OPSET),
    "parity_images": (1, 1_000_000),
    "batch": (1, 4096),
}
_REAL_RANGES = {  # low < value < high; True: low itself allowed (an INT8 drop of nothing)
    "int8_tolerance": (0.0, 1.0, True),
    "workspace": (0.0, math.inf, False),  # GiB
    "tolerance": (0.0, math.inf, False),
}


def _real_range(low: float, high: float) -> str:
    return "a positive number" if high == math.inf else f"within {low:g}..{high:g}"


ENGINE_ONLY = ("batch", "batch_opt", "workspace")  # refused with --format onnx (Ultralytics' validate_args)


def _engines(tmp: Path, units: list[Unit], heldout, opts, dest: Path, console) -> tuple[list[Unit], dict]:
    """Build one TensorRT plan per unit, then run them on the parity images before publishing; the
    units with their engines, and the check."""
    from edgeexit.export.tensorrt import build_engines

    t0 = time.perf_counter()
    units = build_engines(
        tmp,
        units,
        half=opts.half,
        max_batch=opts.batch,
        workspace_gib=opts.workspace,
        opt_batch=opts.batch_opt,
        timing_cache=_previous_timing_cache(dest),
        int8=opts.int8,
    )
    precision = "int8" if opts.int8 else ("fp16" if opts.half else "fp32")
    _stage(console, f"{len(units)} TensorRT plans ({precision}, batch 1..{opts.batch})", t0)
    return units, _check_engines(tmp, units, heldout, opts, precision, console)


def export_checkpoint(checkpoint: str | os.PathLike, *, console=None, **options) -> tuple[dict, Path]:
    """Export ``checkpoint`` (see `ExportOptions`); returns the manifest and the artifact's path."""
    from edgeexit.data.datasets import load_heldout
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint

    opts = ExportOptions(**options)
    t_start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if opts.format == "engine":
        from edgeexit.runtime.backends.tensorrt import import_tensorrt

        import_tensorrt()  # fail before any work if TensorRT is missing
    ckpt = load_checkpoint(checkpoint)
    check_finite_weights(ckpt.get("state_dict") or {}, checkpoint, opts.half)
    model = model_from_checkpoint(ckpt)
    dest, tmp = _prepare_destination(checkpoint, opts)
    try:
        if console is not None:
            console.print(f"[bold]export[/] {esc(str(checkpoint))} → {esc(str(dest))}")
        units = _write_units(model, ckpt, tmp, opts, console)
        heldout = load_heldout(ckpt["split"], opts.data_dir, ckpt.get("dataset"))
        units, parity = _check_parity(model, heldout, tmp, units, opts, console)
        frames = write_calibration_frames(heldout, tmp, opts.calib_images, ckpt["split"]) if opts.calib_images else None
        units, quantization = _quantize(tmp, units, heldout, opts, console) if opts.int8 else (units, None)
        units, fp16 = _write_fp16(tmp, units, heldout, opts, console) if opts.half else (units, None)
        _write_weights(ckpt, tmp)
        plans = opts.format == "engine"
        units, engine_check = _engines(tmp, units, heldout, opts, dest, console) if plans else (units, None)
        blocks = build_manifest(
            ckpt,
            len(units) // 2,
            parity,
            opset=opts.opset,
            simplified=opts.simplify,
            export_s=time.perf_counter() - t_start,
            checkpoint=checkpoint,
            extra={
                "calibration_frames": frames,
                "quantization": quantization,
                "fp16": fp16,
                "engine_parity": engine_check,
            },
        )
        artifact = Artifact.create(tmp, units, blocks)  # the reader's checks, before anything is written
        atomic_write_json(tmp / MANIFEST_NAME, artifact.to_json())
        Artifact.load(tmp)  # and on what was written, before anything is published
        _publish(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return artifact.to_json(), dest


FP16_MAX = 65504.0


def check_finite_weights(state_dict, checkpoint: Path, half: bool) -> None:
    """Refuse, naming the tensor, a checkpoint whose weights hold NaN or infinity (INT8 calibration
    would stop on a bare "scale issue", FP32 export would ship a model that answers NaN) and, for
    --half, one whose weights exceed FP16's range (they would become infinity)."""
    import torch

    for name, t in state_dict.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise UserError(
                f"{checkpoint}: tensor {name} holds {bad} NaN/infinite value(s) of {t.numel()}: the training diverged; "
                "export an earlier checkpoint (last.pt) or train again with a lower --lr"
            )
        if half and t.numel() and float(t.abs().max()) > FP16_MAX:
            raise UserError(
                f"{checkpoint}: tensor {name} reaches {float(t.abs().max()):.4g}, beyond FP16's largest value "
                f"({FP16_MAX:g}): it would overflow to infinity; export without --half"
            )


def _previous_timing_cache(dest: Path) -> Path | None:
    """The timing cache of the artifact being replaced, when it has a plain one: it makes the
    rebuild fast (TensorRT refuses one from another version or GPU, and we stop then)."""
    path = dest / "timing.cache"
    return path if path.is_file() and not path.is_symlink() and not dest.is_symlink() else None


def _prepare_destination(checkpoint: Path, opts: ExportOptions) -> tuple[Path, Path]:
    """The artifact's path and a fresh temporary folder beside it. ``--force`` replaces only a
    previous edgeexit artifact, and never a folder that holds the source checkpoint."""
    dest = Path(opts.out) if opts.out is not None else checkpoint.with_suffix(".edgeexit")
    remove_stale_temps(dest.parent, dest.name)  # what an interrupted export of this artifact left
    if dest.exists():
        if not opts.force:
            raise UserError(f"{dest} exists: pass --force to replace it")
        _check_replaceable(dest, checkpoint)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=".partial", dir=dest.parent))
    except OSError as e:
        raise UserError(f"cannot write to {dest.parent}: {e.strerror or e}") from None
    return dest, tmp


def _check_replaceable(dest: Path, checkpoint: Path) -> None:
    import json

    if not dest.is_dir() or dest.is_symlink():
        raise UserError(f"{dest} is not an edgeexit artifact folder: --force will not replace it")
    if checkpoint.resolve().is_relative_to(dest.resolve()):
        raise UserError(f"{dest} holds the checkpoint being exported ({checkpoint}): choose another --out")
    try:
        manifest = json.loads((dest / MANIFEST_NAME).read_text())
        is_artifact = isinstance(manifest, dict) and "schema_version" in manifest and "units" in manifest
    except (OSError, ValueError):
        is_artifact = False
    if not is_artifact:
        raise UserError(
            f"{dest} exists and is not an edgeexit artifact (no valid {MANIFEST_NAME}): --force only replaces "
            "a previous export; choose another --out or remove the folder yourself"
        )


def _write_units(model, ckpt: dict, tmp: Path, opts: ExportOptions, console) -> list[Unit]:
    from edgeexit.export.onnx_units import export_units

    t0 = time.perf_counter()
    units = export_units(model, tmp, opset=opts.opset, simplify=opts.simplify)
    _stage(
        console,
        f"{len(units)} ONNX units written (opset {opts.opset}"
        f"{', simplified with onnxslim' if opts.simplify else ''}, "
        f"{sum(u.extra['onnx_bytes'] for u in units) / 1e6:.2f} MB)",
        t0,
    )
    cost = {c["name"]: c for c in ckpt.get("units", [])}

    def counted(u: Unit) -> Unit:  # the checkpoint's cost count of the unit (None: it had none)
        c = cost.get(u.name, {})
        return replace(u, flops=c.get("flops"), params=c.get("params"), extra={**u.extra, "macs": c.get("macs")})

    return [counted(u) for u in units]


def _check_parity(
    model, heldout, tmp: Path, units: list[Unit], opts: ExportOptions, console
) -> tuple[list[Unit], dict]:
    """ONNX Runtime vs PyTorch on held-out images, every unit and exit; fails above the tolerance.
    The units with their own difference recorded, and the check."""
    from edgeexit.data import normalize
    from edgeexit.export.parity import check_parity

    t0 = time.perf_counter()
    sample = heldout.subset(np.arange(min(opts.parity_images, len(heldout))))
    images = normalize(sample.images, sample.mean, sample.std).numpy().astype(np.float32)
    parity = check_parity(model, tmp, units, images, opts.tolerance)
    parity.update({"split": "held-out", "runtime": "onnxruntime-cpu"})
    units = [replace(u, parity_max_abs_diff=d["max_abs_diff"]) for u, d in zip(units, parity["units"], strict=True)]
    _stage(
        console,
        f"parity on {len(images)} held-out images: max |Δlogit| {parity['max_abs_logit_diff']:.2e}, "
        f"predictions agree {parity['min_prediction_agreement']:.4f}",
        t0,
    )
    if not parity["passed"]:
        worst = max(parity["exits"], key=lambda e: e["max_abs_logit_diff"])
        raise RuntimeError(
            f"parity check failed: exit {worst['exit']} differs by "
            f"{worst['max_abs_logit_diff']:.3g} > tolerance {opts.tolerance}"
        )
    return units, parity


def write_calibration_frames(heldout, folder: Path, limit: int, split: dict) -> dict:
    """Up to ``limit`` held-out images (uint8 HxWxC, the model's input size) with labels and the
    calibration/verification halves, so `calibrate` on the device needs neither torch nor the data.
    This picks the images; the file's format is `edgeexit.runtime.manifest.save_calibration_frames`'s,
    beside the reader."""
    from edgeexit.data import split_calibration
    from edgeexit.runtime.manifest import save_calibration_frames

    n = min(limit, len(heldout))
    idx = np.sort(np.random.default_rng(split.get("val_indices_seed", 0)).permutation(len(heldout))[:n])
    frames = heldout.images[idx].permute(0, 2, 3, 1).contiguous().numpy()
    labels = heldout.labels[idx].numpy().astype(np.int64)
    calib, verify = split_calibration(np.arange(n), 0)
    source = (
        f"held-out split of {split.get('dataset')} (val_size {split.get('val_size')}, "
        f"seed {split.get('val_indices_seed')})"
    )
    return save_calibration_frames(folder, frames, labels, calib, verify, source)


def _quantize(tmp: Path, units: list[Unit], heldout, opts: ExportOptions, console) -> tuple[list[Unit], dict]:
    """INT8 Q/DQ units calibrated on the first ``int8_images`` held-out images, checked for
    per-exit accuracy against FP32 on up to 1,000 other held-out images."""
    from edgeexit.data import normalize
    from edgeexit.export.quantize import int8_parity, quantize_units

    t0 = time.perf_counter()
    n = min(opts.int8_images, len(heldout) // 2)
    images = normalize(heldout.images, heldout.mean, heldout.std).numpy().astype(np.float32)
    units, settings = quantize_units(tmp, units, images[:n], opts.int8_method)
    rest = slice(n, n + 1000)
    parity = int8_parity(tmp, units, images[rest], heldout.labels[rest].numpy(), opts.int8_tolerance)
    _stage(
        console,
        f"INT8 Q/DQ units ({opts.int8_method}, {n} calibration images): worst per-exit accuracy drop "
        f"{parity['max_drop_pt']:.2f} pt on {parity['images']} held-out images",
        t0,
    )
    if not parity["passed"]:
        raise RuntimeError(
            f"INT8 parity failed: an exit lost {parity['max_drop_pt']:.2f} pt > {100 * opts.int8_tolerance:.2f} pt; "
            "try --int8-method entropy or percentile, more --int8-images, or a larger --int8-tolerance"
        )
    from edgeexit.export.tensorrt import trt_int8_parity

    trt_parity = trt_int8_parity(tmp, units, images[rest], heldout.labels[rest].numpy(), opts.int8_tolerance)
    if trt_parity.get("checked") and not trt_parity["passed"]:
        raise RuntimeError(
            f"the TensorRT INT8 units (onnx_int8_trt) fail: {trt_parity['failures'][0]}; "
            "try --int8-method entropy or percentile, or more --int8-images"
        )
    return units, {**settings, "parity": parity, "trt_parity": trt_parity}


def _held_out_images(heldout, n: int):
    from edgeexit.data import normalize

    sample = heldout.subset(np.arange(min(n, len(heldout))))
    images = normalize(sample.images, sample.mean, sample.std).numpy().astype(np.float32)
    return images, sample.labels.numpy()


def _write_fp16(tmp: Path, units: list[Unit], heldout, opts: ExportOptions, console) -> tuple[list[Unit], dict]:
    """--half: FP16 ONNX segments (what a strongly typed TensorRT builds), compared with FP32 in
    ONNX Runtime on the parity images (recorded, not enforced: the device's engine gate enforces)."""
    from edgeexit.export.onnx_units import fp16_parity, write_fp16_units

    t0 = time.perf_counter()
    units = write_fp16_units(tmp, units)
    images, labels = _held_out_images(heldout, opts.parity_images)
    parity = fp16_parity(tmp, units, images, labels)
    verdict = "within the fp16 tolerance" if parity["passed"] else f"beyond the fp16 tolerance: {parity['failures'][0]}"
    diff = parity["max_abs_logit_diff"]
    _stage(console, f"FP16 units vs FP32 (ONNX Runtime): max |Δlogit| {diff:.2e}, {verdict}", t0)
    return units, parity


def _check_engines(tmp: Path, units: list[Unit], heldout, opts: ExportOptions, precision: str, console) -> dict:
    """Run the built engines before publishing them: every exit against the FP32 ONNX units on as
    many held-out images as the artifact stores for calibration (at least the parity images),
    with CUDA graphs off and on (`edgeexit.export.tensorrt.engine_gate`)."""
    from edgeexit.export.tensorrt import ENGINE_GATE_FRAMES, engine_gate, gate_summary

    t0 = time.perf_counter()
    n = min(max(opts.parity_images, opts.calib_images), ENGINE_GATE_FRAMES)
    images, labels = _held_out_images(heldout, n)
    check = engine_gate(tmp, units, images, labels, precision)
    _stage(console, gate_summary(check), t0)
    if not check["passed"]:
        raise RuntimeError(
            f"TensorRT {precision} engines differ from FP32 beyond tolerance: {check['failures'][0]}: not published"
        )
    return check


def _write_weights(ckpt: dict, tmp: Path) -> None:
    import torch

    blob = {"format": "edgeexit-weights", "config": ckpt["config"], "state_dict": ckpt["state_dict"]}
    torch.save(blob, tmp / "weights.pt")


def _publish(tmp: Path, dest: Path) -> None:
    """Rename the finished artifact into place; an old one is moved aside first and then removed."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_manifest(
    ckpt: dict,
    num_exits: int,
    parity: dict,
    *,
    opset: int,
    simplified: bool,
    export_s: float,
    checkpoint: Path,
    extra: dict | None = None,
) -> dict:
    """manifest.json's blocks besides the units (schema in runtime/artifact.py: `Artifact.create`
    adds the typed units); ``extra``: calibration_frames, quantization, fp16, engine_parity (None
    when that step did not run)."""
    import onnx
    import onnxruntime
    import torch

    return {
        "edgeexit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "config": ckpt["config"],
            "method": ckpt.get("method"),
            "num_exits": num_exits,
            "checkpoint": str(checkpoint),
            "metrics": {k: v for k, v in ckpt.get("metrics", {}).items() if k != "history"},
        },
        "preprocessing": ckpt["preprocessing"],
        "class_names": ckpt["class_names"],
        "dataset": ckpt.get("dataset") or ckpt["split"].get("dataset"),
        "split": ckpt["split"],
        "parity": parity,
        "weights": "weights.pt",
        "export": {
            "opset": opset,
            "simplified": simplified,
            "export_s": round(export_s, 2),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "host": platform.node(),
            "machine": platform.machine(),
        },
        "calibration": None,
        **(extra or {}),
    }
