"""`edgeexit info` / export summary table (rich only)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table


def info_table(artifact) -> Table:
    """``artifact``: an `Artifact` (runtime/artifact.py)."""
    model, pre = artifact.model, artifact.preprocessing
    t = Table(
        title=f"{artifact.folder}  —  {model.config.get('arch', 'resnet18')} ×{model.width}, {model.num_exits} exits, "
        f"{pre.in_chans}×{pre.input_size[0]}×{pre.input_size[1]} input, {len(artifact.class_names)} classes"
    )
    for col in ("unit", "inputs → outputs", "MFLOPs", "params", "ONNX KB", "parity |Δ|", "engines"):
        t.add_column(col, justify="left" if col in ("unit", "inputs → outputs", "engines") else "right")
    for u in artifact.units:
        engines = ", ".join(
            f"{e.precision} ({e.info.get('device_name')}, TRT {e.info.get('trt_version')})" for e in u.engines
        )
        path = u.file("fp32")
        size = path.stat().st_size / 1024 if path.is_file() else float("nan")
        parity = u.parity_max_abs_diff
        t.add_row(
            u.name,
            f"{','.join(u.input_names)} → {','.join(u.output_names)}",
            f"{(u.flops or 0) / 1e6:.2f}",
            f"{u.params or 0:,}",
            f"{size:.1f}",
            f"{parity if parity is not None else float('nan'):.1e}",
            engines or "-",
        )
    cal = artifact.calibration.block if artifact.calibration is not None else None
    lines = _quantization_lines(artifact.quantization)
    parity = artifact.parity
    if parity:
        lines.append(
            f"parity: {parity['samples']} {parity.get('split', '')} images, max |Δlogit| "
            f"{parity['max_abs_logit_diff']:.2e} (tolerance {parity.get('tolerance')}), prediction agreement "
            f"{min(e['prediction_agreement'] for e in parity['exits']):.4f}"
        )
    if cal:
        lines += _calibration_lines(artifact, cal)
    else:
        lines.append("not calibrated: run `edgeexit calibrate ARTIFACT --budget 5ms`")
    t.caption = "\n".join(lines)
    return t


def _calibration_lines(artifact, cal: dict) -> list[str]:
    """The calibration as `calibrate` prints it: its goal (budget or --max-drop promise), each exit's
    threshold in words (skip / 0.8000 / accept all), what was measured, and the one speed-up figure."""
    from edgeexit.calibrate.history import PREVIOUS_NAME, plan_goal, threshold_words
    from edgeexit.calibrate.report import FRONTIER_WORDS, frontier_text, speedup

    meas = cal["measured"]
    lines = [
        f"calibrated {cal.get('created') or ''} on {cal['backend']} "
        f"({cal['device'].get('device') or cal['device'].get('cpu')}) for {plan_goal(cal)}",
        "thresholds: " + ", ".join(f"exit {k} {w}" for k, w in enumerate(threshold_words(cal["thresholds"]), 1)),
    ]
    full = (cal.get("full_model") or {}).get("measured")
    faster = ""
    if (
        isinstance(full, Mapping)
        and isinstance(meas, Mapping)
        and all(_positive(d.get("mean_ms")) for d in (full, meas))
    ):
        faster = f"; {speedup(full, meas):.2f}× as fast as the full model"
    lines.append(
        f"measured on {meas.get('samples', '?')} verification frames: accuracy {100 * meas['accuracy']:.2f}%, "
        f"mean {meas.get('mean_ms', meas['latency_ms']):.3f} ms{faster}"
    )
    covers = _frame_words(cal.get("frame"), artifact)
    if covers:
        lines.append(covers)
    cert = cal.get("certifiable")
    if isinstance(cert, dict) and isinstance(cert.get("frontier"), list):
        lines.append(
            f"{FRONTIER_WORDS}{frontier_text(cert['frontier'])} ({100 * cert['confidence']:.0f}% confidence, "
            f"{cert['n_frames']} frames)"
        )
    if (artifact.folder / PREVIOUS_NAME).is_file():
        lines.append(f"an earlier calibration is kept: `edgeexit calibrate {artifact.folder} --restore` puts it back")
    return lines


def _frame_words(frame, artifact) -> str:
    """What the budget covers, as calibrate said it: the cascade on network-size frames, or (after
    --frame-size) the camera's frame with its measured preprocessing."""
    h, w = artifact.preprocessing.input_size
    if not isinstance(frame, Mapping) or frame.get("covers") != "frame":
        return f"the budget covers the cascade on {w}x{h} frames; larger frames add their preprocessing (--frame-size)"
    size = frame.get("size")
    pre = frame.get("preprocess")
    ms = pre.get("mean_ms") if isinstance(pre, Mapping) else None
    if not (isinstance(size, list | tuple) and len(size) == 2 and _positive(ms)):
        return ""
    return f"the budget covers {size[0]}x{size[1]} frames: preprocessing {ms:.3f} ms (mean, measured), then the cascade"


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _quantization_lines(q) -> list[str]:
    if not q:
        return []
    p = q["parity"]
    return [
        f"INT8 units: {q['format']}, weights {q['weights']}, activations {q['activations']}, {q['method']} "
        f"ranges from {q['images']} images; heads {q['units']['heads']}; worst per-exit accuracy drop "
        f"{p['max_drop_pt']:.2f} pt on {p['images']} held-out images (tolerance {p['tolerance_pt']:.2f} pt)"
    ]
