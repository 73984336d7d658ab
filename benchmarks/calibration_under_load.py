"""Calibration on a busy device: the same artifacts calibrated again and again beside other work.

    # 1. calibrate: every model x condition x repeat x budget, appended to --out as it goes
    python benchmarks/calibration_under_load.py calibrate --models 4=runs/e4/model.edgeexit \\
        8=runs/e8/model.edgeexit 9=runs/e9/model.edgeexit --conditions quiet busy1 busy2 bursty --repeats 2
    # 2. measure every plan found, interleaved with the full model and MSDNet's family, on test images
    python benchmarks/calibration_under_load.py measure --out docs/calibration_under_load.json

Conditions (the load processes are started and stopped by this script, each a Python spin loop):
quiet = nothing added; busy1 / busy2 = one / two processes spinning all the time; bursty = one
process spinning 0.5 s, sleeping 0.5 s. Each calibration is `run_calibration` on a fresh copy of the
artifact (its stored frames, 5,000 held-out images; the exit-statistics cache copied along, so only
profiling, choosing and verifying run), with --accept-load so that every plan a user could have been
given is seen, with its load verdict.

`measure` runs every distinct plan, the full model and MSDNet plans spanning the same costs on
--test-images test images through the real cascade, frame by frame, interleaved in blocks of 25 (the
same moments of the device): a plan's *latency ratio* is the median over blocks of its block mean
over the full model's.
Test accuracy is exact, from the exit statistics of all 10,000 test images. "MSDNet at the same
cost" interpolates the MSDNet plans' test accuracy at the plan's measured ratio.

`wander` (profiles only, no calibration: how far independent profiles price the same plans, per
estimator and profile length) and then `share-noise` (calibrate's latency check repeated on the same
plans, read by the old and the new estimator, against a quiet reference on the test images) take the
same --out; `share-noise` picks its plans from the `wander` profiles:

    python benchmarks/calibration_under_load.py wander --models 8=runs/e8/model.edgeexit --conditions busy2 \
        --repeats 6 --rounds 200 --out w.json
    python benchmarks/calibration_under_load.py share-noise --models 8=runs/e8/model.edgeexit \
        --conditions busy2 quiet --repeats 8 --verify-images 300 --test-images 2000 --out w.json

`--label` tags the calibrations (e.g. "before" for an older checkout run with PYTHONPATH pointing at
it: the script only uses run_calibration's options that every version has, plus accept_load when
the version has it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPIN = "while True: pass"
BURSTY = "import time\nwhile True:\n    t = time.time()\n    while time.time() - t < 0.5: pass\n    time.sleep(0.5)"
LOADS = {"quiet": [], "busy1": [SPIN], "busy2": [SPIN, SPIN], "bursty": [BURSTY]}


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text())["calibrations"] if path.is_file() else []


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _start(condition: str) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", code]) for code in LOADS[condition]]
    time.sleep(1.0 if procs else 0.0)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)


def _calibrate_one(artifact: str, fraction: float, args, key: str = "") -> dict:
    from edgeexit.calibrate.run import run_calibration

    if args.in_place:  # one copy per model, condition and budget, calibrated again at every repeat
        work = Path(tempfile.gettempdir()) / f"cul_in_place_{_digest(artifact, key)}" / "m.edgeexit"
        if not work.is_dir():
            shutil.copytree(artifact, work)
    else:
        work = Path(tempfile.mkdtemp(prefix="cul")) / "m.edgeexit"
        shutil.copytree(artifact, work)
    kw = {"budget_fraction": fraction, "backend": "onnxruntime", "iso_accuracy": False, "ladder_steps": 2,
          "verify_images": args.verify_images, "images": args.images}  # fmt: skip
    if "accept_load" in inspect.signature(run_calibration).parameters or _has_option("accept_load"):
        kw["accept_load"] = True
    t = time.perf_counter()
    try:
        try:
            r = run_calibration(work, **kw)
        except Exception as e:  # noqa: BLE001 - a calibration that fails is a result too (its message kept)
            return {"seconds": time.perf_counter() - t, "error": str(e), "thresholds": None, "load": None}
        for stats in work.glob("calibration_stats.*.npz"):  # the exit statistics, for the next copies
            if not (Path(artifact) / stats.name).exists():
                shutil.copy2(stats, Path(artifact) / stats.name)
    finally:
        if not args.in_place:
            shutil.rmtree(work.parent, ignore_errors=True)
    return {
        "seconds": time.perf_counter() - t,
        "thresholds": r["thresholds"],
        "full_predicted_ms": r["full_model"]["predicted_ms"],
        "predicted_ms": r["predicted"]["mean_ms"],
        "predicted_accuracy": r["predicted"]["accuracy"],
        "calibrate_fraction_of_full": r["measured"].get("fraction_of_full"),
        "chosen": (r.get("cross_fit") or {}).get("chosen"),
        "load": r.get("load"),
        "correction": r.get("latency_correction"),
        "budget_ms": r.get("budget_ms"),
        "latency": r.get("latency"),  # the cost model the plan was chosen on (`bound` re-uses it)
        "kept_previous": r.get("kept_previous") is not None,
    }


def _digest(path: str, key: str) -> str:
    import hashlib

    return hashlib.sha1(f"{os.path.realpath(path)}|{key}".encode()).hexdigest()[:12]


def _has_option(name: str) -> bool:
    try:
        from edgeexit.calibrate.options import CalibrationOptions
    except ImportError:
        return False
    return name in CalibrationOptions.__dataclass_fields__


def calibrate(args) -> None:
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"calibrations": []}
    models = dict(m.split("=", 1) for m in args.models)
    for name, path in models.items():
        for condition in args.conditions:
            for rep in range(args.first_repeat, args.first_repeat + args.repeats):
                procs = _start(condition)
                try:
                    for f in args.budgets:
                        row = {"label": args.label, "model": name, "condition": condition, "repeat": rep,
                               "budget": f, "time": time.strftime("%H:%M:%S"),
                               "loadavg": os.getloadavg()[0], "in_place": args.in_place,
                               **_calibrate_one(path, f, args, f"{args.label}/{condition}/{f}")}  # fmt: skip
                        doc["calibrations"].append(row)
                        _write(out, doc)
                        v = (row["load"] or {}).get("verdict", "-")
                        if row["thresholds"] is None:
                            print(f"{args.label} {name} {condition} #{rep} {100 * f:.0f}%: {row['error']}", flush=True)
                            continue
                        print(f"{args.label} {name} {condition} #{rep} {100 * f:.0f}%: "
                              f"predicted {row['predicted_ms'] / row['full_predicted_ms']:.3f} of full "
                              f"({row['full_predicted_ms']:.3f} ms), calibrate's measured share "
                              f"{row['calibrate_fraction_of_full']}, load {v}, {row['seconds']:.0f} s",
                              flush=True)  # fmt: skip
                finally:
                    _stop(procs)
                if args.pause:
                    time.sleep(args.pause)


def _msdnet_span(conf, k: int, n: int = 8) -> list:
    """MSDNet plans whose share of frames reaching the last exit spans cheap to dear."""
    import numpy as np

    from edgeexit.runtime.plan import MSDNET_QS, CascadePlan

    plans = [CascadePlan.msdnet(conf, q) for q in MSDNET_QS]
    last = [float((p.exit_positions(conf) == k - 1).mean()) for p in plans]
    picks = sorted({int(np.argmin([abs(v - t) for v in last])) for t in np.linspace(0.0, 0.9, n)})
    return [plans[i] for i in picks]


def measure(args) -> None:
    import numpy as np

    from edgeexit.data.frames import load_frames
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan
    from edgeexit.runtime.profiling import verify_together

    out = Path(args.out)
    doc = json.loads(out.read_text())
    rows = doc["calibrations"]
    models = dict(m.split("=", 1) for m in args.models)
    doc["measured"] = doc.get("measured", {})
    for name, path in models.items():
        c = Cascade.load(path, backend="onnxruntime")
        k = c.num_exits
        frames, labels, _ = load_frames(c.artifact, None, "test", None)
        stats = c.exit_statistics(c.preprocessor.batch(frames))
        conf, correct = stats["confidence"], stats["prediction"] == labels[:, None]
        plans = {tuple(r["thresholds"]) for r in rows if r["model"] == name and r["thresholds"] is not None}
        msd = _msdnet_span(conf, k)
        full = CascadePlan.full_model(k)
        order = [full] + [CascadePlan.from_thresholds(list(t)) for t in sorted(plans)] + msd
        n = min(args.test_images, len(frames))
        t = time.perf_counter()
        runs = verify_together(c, frames[:n], labels[:n], order, block=25)
        full_ms = runs[0]["mean_ms"]

        def share(m, full=runs[0]) -> float:  # the median over interleaved blocks of the block ratio
            return float(np.median(np.divide(m["block_ms"], full["block_ms"])))

        def acc(plan, conf=conf, correct=correct) -> float:
            return float(correct[np.arange(len(conf)), plan.exit_positions(conf)].mean())

        doc["measured"][name] = {
            "test_images_timed": n,
            "seconds": time.perf_counter() - t,
            "full_ms": full_ms,
            "full_accuracy": acc(full),
            "plans": {json.dumps(list(p.to_list())): {"ratio": share(m), "accuracy": acc(p)}
                      for p, m in zip(order[1 : 1 + len(plans)], runs[1 : 1 + len(plans)], strict=True)},
            "msdnet": [{"ratio": share(m), "accuracy": acc(p)}
                       for p, m in zip(msd, runs[1 + len(plans) :], strict=True)],
        }  # fmt: skip
        c.close()
        _write(out, doc)
        print(f"measured {name}: {len(plans)} plans + {len(msd)} MSDNet on {n} test images", flush=True)
    summary(doc)


def _msdnet_at(points: list[dict], ratio: float) -> float | None:
    import numpy as np

    pts = sorted((p["ratio"], p["accuracy"]) for p in points)
    # MSDNet's best accuracy at or below that cost, linearly interpolated along its upper hull
    best, hull = -1.0, []
    for r, a in pts:
        if a > best:
            hull.append((r, a))
            best = a
    xs, ys = zip(*hull, strict=True)
    if ratio < xs[0]:
        return None
    return float(np.interp(ratio, xs, ys))


def summary(doc: dict) -> None:
    import numpy as np

    rows, meas = doc["calibrations"], doc.get("measured", {})
    print("\n| code | model | condition | budget | n | load verdicts | full model predicted ms (min-max) | "
          "latency ratio min / max (interleaved, test) | ratio / asked, worst | test accuracy spread pt | "
          "vs MSDNet at that cost pt (worst) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["label"], r["model"], r["condition"], r["budget"]) for r in rows},
                  key=lambda x: (x[0], int(x[1]), list(LOADS).index(x[2]), x[3]))  # fmt: skip
    for label, model, cond, f in keys:
        every = [r for r in rows if (r["label"], r["model"], r["condition"], r["budget"]) == (label, model, cond, f)]
        rs = [r for r in every if r["thresholds"] is not None]
        failed = len(every) - len(rs)
        m = meas.get(model)
        fulls = [r["full_predicted_ms"] for r in rs]
        verdicts = ",".join(sorted({(r["load"] or {}).get("verdict", "-") for r in rs}))
        if m is None or not rs:
            print(f"| {label} | {model} | {cond} | {100 * f:.0f}% | {len(every)} | every calibration failed |")
            continue
        pl = [m["plans"][json.dumps(r["thresholds"])] for r in rs]
        ratios, accs = [p["ratio"] for p in pl], [100 * p["accuracy"] for p in pl]
        gaps = [100 * (p["accuracy"] - (_msdnet_at(m["msdnet"], p["ratio"]) or np.nan)) for p in pl]
        print(f"| {label} | {model} | {cond} | {100 * f:.0f}% | {len(rs)}{f' ({failed} failed)' if failed else ''} | "
              f"{verdicts} | "
              f"{min(fulls):.3f}-{max(fulls):.3f} | {min(ratios):.2f} / {max(ratios):.2f} | "
              f"{max(ratios) / f:.2f} | {max(accs) - min(accs):.2f} | {np.nanmin(gaps):+.2f} |")  # fmt: skip
    _inversions(rows, meas)


def _inversions(rows: list[dict], meas: dict) -> None:
    """Within one model, code and condition, over the calibrations made in the same repeat: a larger
    budget whose plan measured cheaper than a smaller budget's."""
    groups: dict = {}
    for r in rows:
        if r["model"] in meas and r["thresholds"] is not None:
            key = (r["label"], r["model"], r["condition"], r["repeat"])
            groups.setdefault(key, []).append((r["budget"], meas[r["model"]]["plans"][json.dumps(r["thresholds"])]))
    bad = []
    for key, v in groups.items():
        ladder = [p["ratio"] for _, p in sorted(v, key=lambda x: x[0])]
        if any(b < a - 0.02 for a, b in zip(ladder, ladder[1:], strict=False)):
            bad.append(key)
    print(f"\ninversions (a larger budget's plan measured > 2 pt of the full model cheaper, same repeat): "
          f"{len(bad)} of {len(groups)} ladders {bad}")  # fmt: skip


def _test_statistics(path: str, which: str) -> tuple:
    """(confidence, correct) per frame and exit: ``which`` = test (every test image) or heldout (the
    frames stored in the artifact, which calibrate decides on). Cached beside the artifact copy."""
    import numpy as np

    from edgeexit.data.frames import load_frames
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames

    cache = Path(tempfile.gettempdir()) / f"cul_stats_{_digest(path, which)}.npz"
    if cache.is_file():
        z = np.load(cache)
        return z["conf"], z["correct"]
    c = Cascade.load(path, backend="onnxruntime")
    try:
        if which == "test":
            frames, labels, _ = load_frames(c.artifact, None, "test", None)
        else:
            stored = load_calibration_frames(c.artifact)
            frames, labels = stored["frames"], stored["labels"]
        stats = c.exit_statistics(c.preprocessor.batch(frames))
    finally:
        c.close()
    conf, correct = stats["confidence"], stats["prediction"] == np.asarray(labels)[:, None]
    np.savez(cache, conf=conf, correct=correct)
    return conf, correct


def bound(args) -> None:
    """How far each calibrated plan is from the best thresholds found on the test set itself at the same
    cost (an attainable upper bound: fitted on the frames it is scored on), by the cost model the plan
    was chosen on; and where that gap comes from: each approach calibrate chooses between (the free
    optimiser, MSDNet's family), fitted on the stored frames, scored on the test set at the same cost."""
    import numpy as np

    from edgeexit.calibrate.optimizer import CostModel, cross_fitted, evaluate, msdnet_baseline, optimize

    out = Path(args.out)
    doc = json.loads(out.read_text())
    models = dict(m.split("=", 1) for m in args.models)
    rows = []
    for r in doc["calibrations"]:
        if r["model"] not in models or r.get("latency") is None or r["thresholds"] is None:
            continue
        conf, correct = _test_statistics(models[r["model"]], "test")
        held_conf, held_correct = _test_statistics(models[r["model"]], "heldout")
        cost = CostModel.from_latency_block(r["latency"], conf.shape[1])
        plan = evaluate(conf, correct, cost, r["thresholds"])
        best = optimize(conf, correct, cost, plan.latency_ms)[0]
        msd = msdnet_baseline(conf, correct, cost, plan.latency_ms)
        fits = cross_fitted(held_conf, held_correct, cost, r["budget_ms"]).fits
        on_test = {a: None if s is None else evaluate(conf, correct, cost, s.thresholds) for a, s in fits.items()}
        per_frame = correct[np.arange(len(conf)), _positions(conf, r["thresholds"])].astype(float)
        oracle = correct[np.arange(len(conf)), _positions(conf, best.thresholds)].astype(float)
        row = {"model": r["model"], "budget": r["budget"], "repeat": r["repeat"], "condition": r["condition"],
               "chosen": r["chosen"], "plan_accuracy": plan.accuracy, "plan_ms": plan.latency_ms,
               "full_ms": cost.full_ms(), "bound_accuracy": best.accuracy, "bound_ms": best.latency_ms,
               "gap_pt": 100 * (plan.accuracy - best.accuracy), "gap_ci_pt": _paired_ci(per_frame - oracle),
               "msdnet_accuracy": None if msd is None else msd.accuracy,
               "approaches_on_test": {a: None if v is None else {"accuracy": v.accuracy, "ms": v.latency_ms}
                                      for a, v in on_test.items()}}  # fmt: skip
        rows.append(row)
        msd_txt = "-" if msd is None else f"{100 * (plan.accuracy - msd.accuracy):+.2f}"
        appr = ", ".join(f"{a} {100 * v.accuracy:.2f}% at {v.latency_ms / cost.full_ms():.3f}"
                         for a, v in on_test.items() if v is not None)  # fmt: skip
        print(
            f"{r['model']}-exit {100 * r['budget']:.0f}% #{r['repeat']} ({r['chosen']}): plan "
            f"{100 * plan.accuracy:.2f}% at {plan.latency_ms / cost.full_ms():.3f} of full; test-set bound "
            f"{100 * best.accuracy:.2f}% (gap {row['gap_pt']:+.2f} pt [{row['gap_ci_pt'][0]:+.2f}, "
            f"{row['gap_ci_pt'][1]:+.2f}]); vs MSDNet {msd_txt} pt; fitted on stored frames: {appr}",
            flush=True,
        )
    doc["bound"] = rows
    _write(out, doc)


def _positions(conf, thresholds):
    from edgeexit.runtime.plan import exit_positions

    return exit_positions(conf, np.asarray(thresholds, dtype=np.float64))


def _paired_ci(diff, resamples: int = 2000) -> list[float]:
    """95 % bootstrap interval of the mean of a per-frame difference, in points."""
    rng = np.random.default_rng(0)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)]
    return [float(100 * np.percentile(means, 2.5)), float(100 * np.percentile(means, 97.5))]


ESTIMATORS = ("quiet-rounds", "calls-p25", "calls-p50")


def _estimate(names: list[str], samples, how: str) -> dict:
    """Per piece ``{"mean_ms", "p50_ms"}`` from raw profile samples (rounds, pieces, calls):
    quiet-rounds = what calibrate uses (`summarise_rounds`); calls-pNN = that percentile of every call."""
    from edgeexit.runtime.profiling import summarise_rounds

    if how == "quiet-rounds":
        return {n: {"mean_ms": v["mean_ms"], "p50_ms": v["p50_ms"]}
                for n, v in summarise_rounds(names, samples).stats.items()}  # fmt: skip
    q = float(how.split("-p")[1])
    vals = np.percentile(samples.transpose(1, 0, 2).reshape(len(names), -1), q, axis=1)
    return {n: {"mean_ms": float(v), "p50_ms": float(v)} for n, v in zip(names, vals, strict=True)}


def _cost_from(stats: dict, k: int):
    from edgeexit.calibrate.optimizer import CostModel
    from edgeexit.runtime.plan import head_name, segment_name
    from edgeexit.runtime.profiling import exit_step_from, overhead_from

    overhead = overhead_from(stats, k, False)
    step = exit_step_from(stats, k, False, overhead)
    units = {n: stats[n] for n in (f(p) for p in range(k) for f in (segment_name, head_name))}
    return CostModel.from_timings(k, units, "mean_ms", stats["decision"]["mean_ms"], overhead, None, step)


def wander(args) -> None:
    """How far apart independent profiles of one device price the same plans, per estimator of a
    piece's quiet cost and per profile length: each profile loads the artifact afresh (as a new
    calibration does) and times every piece as calibrate does (`profile_rounds`, --rounds rounds); its
    first 50 rounds and all of them are each summarised by every estimator in ESTIMATORS. For every
    summary the optimiser then picks the plan at each --budgets share of the full model on the stored
    frames; afterwards every plan so picked is priced, as a share of the full model, by every summary of
    the same estimator and length (the wander), and scored on the test images (the accuracy spread)."""
    from edgeexit.calibrate.optimizer import evaluate, optimize
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames
    from edgeexit.runtime.profiling import cost_pieces, profile_rounds

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    rows = doc.setdefault("wander", [])
    for key, path in (m.split("=", 1) for m in args.models):
        held_conf, held_correct = _test_statistics(path, "heldout")
        conf, correct = _test_statistics(path, "test")
        k = conf.shape[1]
        for condition in args.conditions:
            for rep in range(args.repeats):
                procs = _start(condition)
                try:
                    c = Cascade.load(path, backend="onnxruntime")
                    try:
                        frames = load_calibration_frames(c.artifact)["frames"]
                        calls, cleanup = cost_pieces(c, c.preprocessor.batch(frames[:1])[0], frames[0])
                        try:
                            p = profile_rounds(calls, c.runner.synchronize, args.rounds, 4, max_seconds=1e9)
                        finally:
                            cleanup()
                    finally:
                        c.close()
                finally:
                    _stop(procs)
                names = list(p.stats)
                for length in sorted({50, args.rounds}):
                    for how in ESTIMATORS:
                        stats = _estimate(names, p.samples[:length], how)
                        cost = _cost_from(stats, k)
                        full = cost.full_ms()
                        plans = {}
                        for b in args.budgets:
                            sol = optimize(held_conf, held_correct, cost, b * full)[0]
                            test = evaluate(conf, correct, cost, sol.thresholds)
                            plans[str(b)] = {"thresholds": [float(t) for t in sol.plan.to_list()],
                                             "test_accuracy": test.accuracy}  # fmt: skip
                        rows.append({"model": key, "condition": condition, "repeat": rep, "rounds": length,
                                     "estimator": how, "stats": stats, "load": p.load, "plans": plans})  # fmt: skip
                        print(f"{key} {condition} #{rep} {length} rounds {how}: full {full:.3f} ms, " + ", ".join(
                            f"{100 * float(b):.0f}% {100 * v['test_accuracy']:.2f}%" for b, v in plans.items()),
                            flush=True)  # fmt: skip
                _write(out, doc)
    _wander_summary(doc, dict(m.split("=", 1) for m in args.models))


def _wander_summary(doc: dict, models: dict) -> None:
    from edgeexit.calibrate.optimizer import evaluate

    groups: dict = {}
    for r in doc.get("wander", []):
        groups.setdefault((r["model"], r["condition"], r["rounds"], r["estimator"]), []).append(r)
    for (model, condition, length, how), rs in sorted(groups.items()):
        if model not in models:
            continue
        held_conf, held_correct = _test_statistics(models[model], "heldout")
        k = held_conf.shape[1]
        costs = [_cost_from(r["stats"], k) for r in rs]
        parts = []
        for b in rs[0]["plans"]:
            shares = []  # every plan picked at this budget, priced by every profile: its (max - min) / median
            for r in rs:
                th = r["plans"][b]["thresholds"]
                s = [evaluate(held_conf, held_correct, c, th).latency_ms / c.full_ms() for c in costs]
                shares.append((max(s) - min(s)) / float(np.median(s)))
            acc = [100 * r["plans"][b]["test_accuracy"] for r in rs]
            wander_pc, worst_pc, spread = 100 * float(np.median(shares)), 100 * max(shares), max(acc) - min(acc)
            parts.append(f"{100 * float(b):.0f}%: price wander {wander_pc:.1f}% (worst {worst_pc:.1f}%), "
                         f"test accuracy spread {spread:.2f} pt")  # fmt: skip
        print(f"{model}-exit {condition} {length} rounds {how} ({len(rs)} profiles): " + "; ".join(parts))


def share_noise(args) -> None:
    """How noisy calibrate's latency check is beside other work, by two estimators on the same runs:
    plans of a wander profile (its --budgets shares, optimised on the stored frames) and the full model
    run interleaved on --verify-images of the stored verification frames, as calibrate's check runs them,
    --repeats times under each condition; each plan's share of the full model read as the median over
    blocks of the block-mean ratio (`block`) and as the ratio of quiet means per exit (`quiet`,
    `profiling.quiet_mean_ms`); then the reference: the same plans on --test-images test images with
    nothing added, read both ways."""
    from edgeexit.calibrate.optimizer import optimize
    from edgeexit.data.frames import load_frames
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames
    from edgeexit.runtime.plan import CascadePlan

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    rows = doc.setdefault("share_noise", [])
    for key, path in (m.split("=", 1) for m in args.models):
        held_conf, held_correct = _test_statistics(path, "heldout")
        w = next(r for r in doc["wander"] if r["model"] == key and r["estimator"] == "quiet-rounds")
        cost = _cost_from(w["stats"], held_conf.shape[1])
        plans = [optimize(held_conf, held_correct, cost, b * cost.full_ms())[0].plan.to_list() for b in args.budgets]
        c = Cascade.load(path, backend="onnxruntime")
        try:
            stored = load_calibration_frames(c.artifact)
            frames = stored["frames"][stored["verification"][: args.verify_images]]
            plans = [*plans, CascadePlan.full_model(held_conf.shape[1]).to_list()]  # the full model last
            for condition in args.conditions:
                for rep in range(args.repeats):
                    procs = _start(condition)
                    try:
                        rows += _read_shares(c, frames, plans, args.budgets, (key, "check", condition, rep))
                    finally:
                        _stop(procs)
            test_frames = load_frames(c.artifact, None, "test", None)[0][: args.test_images]
            rows += _read_shares(c, test_frames, plans, args.budgets, (key, "reference", "quiet", 0))
        finally:
            c.close()
        _write(out, doc)
        for b in args.budgets:
            ref = next(r for r in rows if r["model"] == key and r["label"] == "reference" and r["budget"] == b)
            for how in ("block", "quiet", *EXIT_STATS):
                for condition in args.conditions:
                    v = [r[how] for r in rows if r["model"] == key and r["label"] == "check"
                         and r["condition"] == condition and r["budget"] == b]  # fmt: skip
                    print(f"{key}-exit {100 * b:.0f}% {how} {condition}: {len(v)} checks, share {min(v):.3f}-"
                          f"{max(v):.3f} (sd {np.std(v, ddof=1):.3f}); reference {ref[how]:.3f}; worst / "
                          f"reference {max(abs(x / ref[how] - 1) for x in v):.1%}")  # fmt: skip


def _read_shares(cascade, frames, plans: list, budgets: list, tag: tuple) -> list[dict]:
    """Each plan's share of the last (the full model), run interleaved on ``frames``, read both ways."""
    from edgeexit.runtime.profiling import predict_interleaved, quiet_mean_ms

    key, label, condition, rep = tag
    runs = predict_interleaved(cascade, frames, plans, 50)
    blocks = [[float(np.mean([p.latency_ms for p in r[i : i + 50]])) for i in range(0, len(r), 50)] for r in runs]
    quiet = [quiet_mean_ms([p.latency_ms for p in r], [p.exit_index for p in r]) for r in runs]
    per_exit = {how: [_exit_stat_ms([p.latency_ms for p in r], [p.exit_index for p in r], how) for r in runs]
                for how in EXIT_STATS}  # fmt: skip
    rows = []
    for j, b in enumerate(budgets):
        block = float(np.median(np.divide(blocks[j], blocks[-1])))
        rows.append({"model": key, "label": label, "condition": condition, "repeat": rep, "budget": b,
                     "block": block, "quiet": quiet[j] / quiet[-1],
                     **{how: v[j] / v[-1] for how, v in per_exit.items()}})  # fmt: skip
        print(f"{key} {label} {condition} #{rep} {100 * b:.0f}%: block {rows[-1]['block']:.3f}, "
              f"quiet {rows[-1]['quiet']:.3f}", flush=True)  # fmt: skip
    return rows


# other per-exit readings of a plan's quiet mean, for comparison: the median, the first quartile, and
# the mean of the frames within 1.25x the first quartile
EXIT_STATS = ("median", "p25", "calm1.25", "calm-abs")


def _exit_stat_ms(latency_ms, exit_index, how: str) -> float:
    """Per exit, ``how`` of the latencies of the frames left there, weighted by that exit's share."""
    lat, exits = np.asarray(latency_ms), np.asarray(exit_index)
    # calm-abs: a frame over its exit's first quartile by more than the cheapest exit's first quartile
    # was interrupted, the same allowance in milliseconds for every exit
    allowance = min(np.percentile(lat[exits == e], 25) for e in np.unique(exits))

    def stat(x):
        if how == "calm-abs":
            return x[x <= np.percentile(x, 25) + allowance].mean()
        if how == "median":
            return np.median(x)
        if how == "p25":
            return np.percentile(x, 25)
        return x[x <= 1.25 * np.percentile(x, 25)].mean()

    return float(sum((exits == e).mean() * stat(lat[exits == e]) for e in np.unique(exits)))


def plot(doc: dict, png: str) -> None:
    """Each calibration's plan: test accuracy against its measured latency ratio (interleaved with the
    full model), by label (fresh copies / recalibrating one copy), beside MSDNet's plans; the asked
    budgets as vertical lines. One panel per model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from plotting import figure, finish

    meas = doc["measured"]
    models = sorted(meas, key=int)
    fig, axes = figure((5.5 * len(models), 4.2))
    fig.clear()
    marks = {"fresh": ("o", "tab:blue"), "fresh-v2": ("o", "tab:cyan"), "in-place": ("s", "tab:orange"),
             "in-place-v2": ("D", "tab:red"), "after": ("^", "tab:green")}  # fmt: skip
    for n, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), n + 1)
        m = meas[model]
        msd = sorted((p["ratio"], 100 * p["accuracy"]) for p in m["msdnet"])
        ax.plot(*zip(*msd, strict=True), "x--", color="grey", label="MSDNet's thresholds (measured)")
        budgets = sorted({r["budget"] for r in doc["calibrations"] if r["model"] == model})
        for b in budgets:
            ax.axvline(b, color="lightgrey", lw=0.8)
        for label, (marker, color) in marks.items():
            pts = [m["plans"][json.dumps(r["thresholds"])] for r in doc["calibrations"]
                   if r["model"] == model and r["label"] == label and r["thresholds"] is not None]  # fmt: skip
            if pts:
                ax.scatter([p["ratio"] for p in pts], [100 * p["accuracy"] for p in pts], marker=marker,
                           facecolors="none", edgecolors=color, label=f"{label}: one calibration's plan")  # fmt: skip
        ax.set_title(f"{model}-exit model")
        if n < len(models) - 1:
            ax.set_xlabel("plan latency / full model (test images, interleaved)")
            ax.set_ylabel("test accuracy, %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            finish(fig, ax, png, "plan latency / full model (test images, interleaved)", "test accuracy, %")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["calibrate", "measure", "summary", "bound", "plot", "wander", "share-noise"])
    ap.add_argument("--png", default="docs/calibration_under_load.png")
    ap.add_argument("--models", nargs="+", default=[])
    ap.add_argument("--conditions", nargs="+", default=list(LOADS), choices=list(LOADS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--verify-images", type=int, default=500)
    ap.add_argument("--images", type=int, default=None, help="calibration images (default: all stored)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--first-repeat", type=int, default=0, help="number of the first repeat (to add repeats)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between repeats")
    ap.add_argument("--label", default="after")
    ap.add_argument("--in-place", action="store_true",
                    help="calibrate one copy per model, condition and budget again at every repeat (a user "
                    "recalibrating their artifact), instead of a fresh copy each time")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=200, help="wander: rounds per profile")
    ap.add_argument("--out", default="docs/calibration_under_load.json")
    args = ap.parse_args()
    if args.step == "calibrate":
        calibrate(args)
    elif args.step == "measure":
        measure(args)
    elif args.step == "bound":
        bound(args)
    elif args.step == "wander":
        wander(args)
    elif args.step == "share-noise":
        share_noise(args)
    elif args.step == "plot":
        plot(json.loads(Path(args.out).read_text()), args.png)
    else:
        summary(json.loads(Path(args.out).read_text()))


if __name__ == "__main__":
    main()
