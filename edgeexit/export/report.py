"""`edgeexit info` / export summary table (rich only)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def info_table(manifest: dict, folder) -> Table:
    folder = Path(folder)
    cfg = manifest["model"]["config"]
    t = Table(
        title=f"{folder}  —  {cfg.get('arch', 'resnet18')} ×{cfg['width']}, {manifest['model']['num_exits']} exits, "
        f"{cfg['in_chans']}×{cfg['input_size'][0]}×{cfg['input_size'][1]} input, "
        f"{len(manifest['class_names'])} classes"
    )
    for col in ("unit", "inputs → outputs", "MFLOPs", "params", "ONNX KB", "parity |Δ|", "engines"):
        t.add_column(col, justify="left" if col in ("unit", "inputs → outputs", "engines") else "right")
    for u in manifest["units"]:
        engines = ", ".join(
            f"{e['precision']} ({e['device_name']}, TRT {e['trt_version']})" for e in u.get("engines", [])
        )
        size = (folder / u["onnx"]).stat().st_size / 1024 if (folder / u["onnx"]).is_file() else float("nan")
        t.add_row(
            u["name"],
            f"{','.join(i['name'] for i in u['inputs'])} → {','.join(o['name'] for o in u['outputs'])}",
            f"{(u.get('flops') or 0) / 1e6:.2f}",
            f"{u.get('params') or 0:,}",
            f"{size:.1f}",
            f"{u.get('parity_max_abs_diff', float('nan')):.1e}",
            engines or "-",
        )
    cal = manifest.get("calibration")
    lines = _quantization_lines(manifest)
    parity = manifest.get("parity")
    if parity:
        lines.append(
            f"parity: {parity['samples']} {parity.get('split', '')} images, max |Δlogit| "
            f"{parity['max_abs_logit_diff']:.2e} (tolerance {parity.get('tolerance')}), prediction agreement "
            f"{min(e['prediction_agreement'] for e in parity['exits']):.4f}"
        )
    if cal:
        lines.append(
            f"calibrated on {cal['backend']} ({cal['device'].get('device') or cal['device'].get('cpu')}): "
            f"budget {cal['budget_ms']:.3f} ms ({cal['metric']}), thresholds "
            f"{[round(x, 4) for x in cal['thresholds']]}, measured accuracy {cal['measured']['accuracy']:.4f} at "
            f"{cal['measured']['latency_ms']:.3f} ms"
        )
        cert = cal.get("certifiable")
        if isinstance(cert, dict) and isinstance(cert.get("frontier"), list):
            from edgeexit.calibrate.report import frontier_text

            lines.append(
                f"certifiable drop vs the full model ({100 * cert['confidence']:.0f}%, {cert['n_frames']} frames): "
                + frontier_text(cert["frontier"])
            )
    else:
        lines.append("not calibrated: run `edgeexit calibrate ARTIFACT --budget 5ms`")
    t.caption = "\n".join(lines)
    return t


def _quantization_lines(manifest: dict) -> list[str]:
    q = manifest.get("quantization")
    if not q:
        return []
    p = q["parity"]
    return [
        f"INT8 units: {q['format']}, weights {q['weights']}, activations {q['activations']}, {q['method']} "
        f"ranges from {q['images']} images; heads {q['units']['heads']}; worst per-exit accuracy drop "
        f"{p['max_drop_pt']:.2f} pt on {p['images']} held-out images (tolerance {p['tolerance_pt']:.2f} pt)"
    ]
