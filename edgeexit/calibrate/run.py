"""`edgeexit calibrate`: profile on this device, collect exit statistics, choose thresholds, verify.

The held-out split recorded at training time is halved (seeded): thresholds are chosen on the
calibration half and checked on the verification half by running the real cascade frame by frame.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from pathlib import Path

import numpy as np

from edgeexit.calibrate.optimizer import CostModel, evaluate, msdnet_baseline, optimize
from edgeexit.calibrate.profiler import device_fingerprint, frame_overhead_ms, profile_units
from edgeexit.calibrate.thresholds import SKIP, geometric_thresholds
from edgeexit.errors import UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.manifest import write_manifest

ISO_ACCURACY_DROP = 0.005  # "within 0.5 pt of the final exit"


def load_frames(manifest: dict, data: str | None, split: str, data_dir: str | None):
    """(uint8 HWC frames, labels) of the chosen split, and a description of it."""
    from edgeexit.data import load_dataset
    from edgeexit.data.datasets import load_heldout

    name = data or manifest.get("dataset")
    if not name:
        raise UserError("the artifact records no dataset: pass --data")
    size = manifest["preprocessing"]["input_size"]
    if split == "heldout":
        ds = load_heldout(manifest["split"], data_dir, name)
    else:
        ds = load_dataset(name, "test", data_dir or manifest["split"].get("data_dir"), image_size=size)
    if ds.in_chans != manifest["preprocessing"]["in_chans"] or ds.input_size != list(size):
        raise UserError(
            f"{name} images are {ds.in_chans}x{ds.input_size} but the model expects "
            f"{manifest['preprocessing']['in_chans']}x{size}"
        )
    frames = ds.images.permute(0, 2, 3, 1).contiguous().numpy()
    return frames, ds.labels.numpy(), name


def _stats_cached(cascade: Cascade, folder: Path, key: str, x: np.ndarray, progress=None) -> dict:
    path = folder / f"calibration_stats.{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {"confidence": z["confidence"], "prediction": z["prediction"]}
    stats = cascade.exit_statistics(x, progress=progress)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **stats)
    tmp.replace(path)
    return stats


def verify(cascade: Cascade, frames: np.ndarray, labels: np.ndarray, thresholds) -> dict:
    """Run the real cascade frame by frame (the camera path, preprocessing included)."""
    cascade.set_thresholds(thresholds)
    lat, correct, exits = [], [], []
    for f, y in zip(frames, labels, strict=True):
        p = cascade.predict(f)
        lat.append(p.latency_ms)
        correct.append(p.label == y)
        exits.append(p.exit_index)
    lat_a = np.asarray(lat)
    counts = np.bincount(np.asarray(exits) - 1, minlength=cascade.num_exits)
    return {
        "accuracy": float(np.mean(correct)),
        "latency_ms": float(lat_a.mean()),
        "mean_ms": float(lat_a.mean()),
        "p50_ms": float(np.median(lat_a)),
        "p95_ms": float(np.percentile(lat_a, 95)),
        "p99_ms": float(np.percentile(lat_a, 99)),
        "samples": len(lat),
        "exit_shares": (counts / len(exits)).tolist(),
        "exit_histogram": {str(k + 1): int(c) for k, c in enumerate(counts)},
    }


def min_latency_for_accuracy(conf, correct, cost: CostModel, target: float, metric: str = "mean", iters: int = 14):
    """Cheapest thresholds whose calibration accuracy is >= target (bisection on the budget)."""
    lo, hi = cost.min_ms(), cost.exit_costs(np.ones(conf.shape[1], bool))[-1] * 1.01
    best, _ = optimize(conf, correct, cost, hi, metric)
    if best.accuracy < target:
        return None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        sol, _ = optimize(conf, correct, cost, mid, metric)
        if sol.accuracy >= target:
            best, hi = sol, mid
        else:
            lo = mid
    return best


def run_calibration(
    artifact,
    *,
    budget_ms: float | None = None,
    budget_fraction: float | None = None,
    metric: str = "mean",
    backend: str = "auto",
    data: str | None = None,
    split: str = "heldout",
    limit: int | None = None,
    verify_limit: int | None = None,
    repeats: int = 200,
    policy: str = "max_softmax",
    data_dir: str | None = None,
    plot=None,
    console=None,
    seed: int = 0,
    iso_accuracy: bool = True,
) -> dict:
    from rich.progress import Progress

    from edgeexit.data import split_calibration

    t_start = time.perf_counter()
    folder = Path(artifact)
    cascade = Cascade.load(folder, backend=backend, policy=policy)
    manifest = cascade.manifest
    say = console.print if console is not None else (lambda *a, **k: None)
    frames, labels, name = load_frames(manifest, data, split, data_dir)
    calib_idx, verify_idx = split_calibration(np.arange(len(labels)), seed)
    if limit:
        calib_idx = calib_idx[:limit]
    verify_idx = verify_idx[: min(len(verify_idx), verify_limit if verify_limit else len(verify_idx))]
    if len(calib_idx) < 20 or len(verify_idx) < 20:
        raise UserError(f"the {split} split has too few images ({len(labels)}) to calibrate and verify")
    say(
        f"[bold]calibrate[/] {folder} on {cascade.backend_name}: {len(calib_idx)} calibration + "
        f"{len(verify_idx)} verification images ({name} {split})"
    )
    x_calib = cascade.preprocess.batch(frames[calib_idx])

    with Progress(console=console, transient=True, disable=console is None) as prog:
        task = prog.add_task("profiling units", total=cascade.num_exits)
        prof = profile_units(
            cascade, x_calib[0], batch=1, repeats=repeats, progress=lambda k: prog.update(task, completed=k)
        )
        p50 = {n: v["p50_ms"] for n, v in prof["units"].items()}
        overhead = frame_overhead_ms(cascade, frames[calib_idx[0]], p50)
        task = prog.add_task("exit statistics", total=len(x_calib))
        key = hashlib.sha1(
            f"{cascade.backend_name}|{policy}|{name}|{split}|{seed}|{len(calib_idx)}|{manifest.get('created')}".encode()
        ).hexdigest()[:12]
        stats = _stats_cached(cascade, folder, key, x_calib, progress=lambda n: prog.update(task, completed=n))
    correct = stats["prediction"] == labels[calib_idx][:, None]
    conf = stats["confidence"]
    k = cascade.num_exits
    field = "mean_ms" if metric == "mean" else "p95_ms"
    cost = CostModel(
        segment_ms=[prof["units"][f"seg_{i + 1:02d}"][field] for i in range(k)],
        head_ms=[prof["units"][f"head_{i + 1:02d}"][field] for i in range(k)],
        decision_ms=prof["decision"][field],
        overhead_ms=overhead,
    )
    full_ms = cost.full_ms()
    if budget_ms is None:
        if budget_fraction is None:
            raise UserError("give a budget in time (5ms) or as a share of the full model (50%)")
        budget_ms = budget_fraction * full_ms
        say(f"  budget = {100 * budget_fraction:.0f}% of the full model = {budget_ms:.3f} ms")
    final_acc = float(correct[:, -1].mean())
    say(
        f"  full model (every intermediate exit skipped): {full_ms:.3f} ms predicted; cheapest cascade "
        f"{cost.min_ms():.3f} ms"
    )
    chosen, frontier = optimize(conf, correct, cost, budget_ms, metric)
    note = None
    if budget_ms >= full_ms:
        note = (
            f"budget {budget_ms:.3f} ms is at or above the full model ({full_ms:.3f} ms): final-exit accuracy "
            f"({final_acc:.4f}) is kept; thresholds only add exits that help"
        )
        say(f"  [yellow]{note}[/]")
    base = msdnet_baseline(conf, correct, cost, budget_ms, metric)

    vf, vl = frames[verify_idx], labels[verify_idx]
    measured = verify(cascade, vf, vl, chosen.thresholds)
    base_measured = verify(cascade, vf, vl, base.thresholds) if base is not None else None
    full_measured = verify(cascade, vf, vl, [SKIP] * (k - 1) + [0.0])
    iso = None
    if iso_accuracy:
        target = final_acc - ISO_ACCURACY_DROP
        sol = min_latency_for_accuracy(conf, correct, cost, target, metric)
        if sol is not None:
            iso_measured = verify(cascade, vf, vl, sol.thresholds)
            iso = {
                "target_accuracy": target,
                "predicted": _pred(sol),
                "measured": _meas(iso_measured),
                "thresholds": sol.to_dict()["thresholds"],
                "latency_fraction_of_full": iso_measured["latency_ms"] / full_measured["latency_ms"],
                "accuracy_drop_vs_full_measured": full_measured["accuracy"] - iso_measured["accuracy"],
            }
    cascade.set_thresholds(chosen.thresholds)

    msd_curve = []
    for q in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 3.0):
        s = evaluate(conf, correct, cost, geometric_thresholds(conf, q), metric)
        msd_curve.append({"q": q, "accuracy": s.accuracy, "latency_ms": s.latency_ms})
    result = {
        "artifact": str(folder),
        "budget_ms": budget_ms,
        "metric": metric,
        "policy": policy,
        "thresholds": chosen.to_dict()["thresholds"],
        "evaluated_exits": chosen.evaluated_exits,
        "predicted": _pred(chosen),
        "measured": _meas(measured),
        "baseline_msdnet": (
            {
                "accuracy": base_measured["accuracy"],
                "latency_ms": base_measured["latency_ms"],
                "predicted": _pred(base),
                "thresholds": base.to_dict()["thresholds"],
            }
            if base is not None
            else None
        ),
        "full_model": {"predicted_ms": full_ms, "measured": _meas(full_measured), "calibration_accuracy": final_acc},
        "iso_accuracy": iso,
        "note": note,
        "device": device_fingerprint(cascade),
        "latency": {
            "batch": 1,
            "units": prof["units"],
            "decision_ms": prof["decision"]["mean_ms"],
            "frame_overhead_ms": overhead,
        },
        "data": {
            "dataset": name,
            "split": split,
            "calibration_images": int(len(calib_idx)),
            "verification_images": int(len(verify_idx)),
            "seed": seed,
        },
        "frontier": [{"accuracy": s.accuracy, "latency_ms": s.latency_ms} for s in frontier],
        "msdnet_curve": msd_curve,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    calibration = {k2: v for k2, v in result.items() if k2 not in ("artifact", "frontier", "msdnet_curve")}
    calibration["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    calibration["backend"] = cascade.backend_name
    manifest["calibration"] = calibration
    write_manifest(folder, manifest)
    plot_path = Path(plot) if plot else folder / "calibration.png"
    try:
        from edgeexit.calibrate.report import calibration_plot

        calibration_plot(result, plot_path)
        result["plot"] = str(plot_path)
    except ImportError:
        say("  (matplotlib not installed: no plot)")
    cascade.close()
    return result


def _pred(s) -> dict:
    return {
        "accuracy": s.accuracy,
        "latency_ms": s.latency_ms,
        "mean_ms": s.mean_ms,
        "p95_ms": s.p95_ms,
        "exit_shares": s.exit_shares,
    }


def _meas(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "latency_ms", "mean_ms", "p50_ms", "p95_ms", "samples", "exit_shares")}
