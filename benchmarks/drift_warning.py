"""The drift warning (runtime/monitor.py): false alarms without drift, detection delay under drift,
against two plain alternatives, and what the monitor costs per frame.

    nice -n 10 python benchmarks/drift_warning.py runs/x/model.edgeexit --digits digits.csv.gz

Every per-frame value comes from the real cascade (ONNX Runtime, the calibrated plan): the first
evaluated exit's confidence (``Prediction.first_confidence``) and the answered class, computed once
per image (clean Fashion-MNIST test images, each shifted image, each noisy copy of a held frame).
Streams are then sequences of those per-image values, so 10^6 frames cost 10^6 monitor updates, not
10^6 forward passes.

1. **No drift.** ``--streams`` i.i.d. streams of ``--frames`` frames (the 10,000 test images in a
   fresh random order each pass), through the real `DriftMonitor`; and video-like streams, each
   image held ``--hold`` frames with small pixel noise (each held frame run through the cascade),
   sampled every frame and every ``--hold``-th frame. A monitor restarts after each alarm; the table
   gives the false alarms against the guarantee's at most one per 1/alpha sampled frames.
2. **Drift.** ``--pre`` in-distribution frames, then the shifted images (brightness down/up,
   contrast, Gaussian noise, blur, rotation, occlusion, inversion, a two-class prior shift, and
   the digits shipped with scikit-learn resized to 28x28), two severities each: detection delay in
   sampled frames after the change (median, p90, share detected within ``--post`` frames) for the
   e-detector (a vectorised copy of `DriftMonitor`, checked equal to it on the first streams), a
   windowed confidence-mean z-test and ADWIN, both on the first evaluated exit's confidence.
3. **Overhead.** `DriftMonitor.observe` alone (bare loop subtracted), and `Cascade.predict` with
   the monitor vs without, in rounds whose order is random, beside an A/A difference (a second
   cascade without it) as the noise floor of the same run (the house method of
   benchmarks/controller_overhead.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import random
import subprocess
import time
from pathlib import Path

import numpy as np

from edgeexit.runtime.monitor import (
    BET_GAPS,
    LABEL_MIX,
    LABEL_RATE,
    LEVEL_EVERY,
    DriftMonitor,
    DriftOptions,
    _bets,
    frame_levels,
)

# --- per-image values from the real cascade ---------------------------------------------------------------


def first_exit_values(view, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first evaluated exit's confidence, answered class, input brightness `input_level`) of every
    uint8 frame, from the cascade and its preprocessing."""
    x = view.preprocessor.batch(frames)
    out = view.predict_arrays(x)
    return out["first_confidence"].astype(np.float64), out["label"].astype(np.int64), frame_levels(x)[0]


def digits_28(path: str | None) -> np.ndarray:
    """scikit-learn's 8x8 digits (0..16) as 28x28 uint8 frames: each digit resized to 20x20 and
    centred, as MNIST places its digits."""
    import cv2

    try:
        from sklearn.datasets import load_digits

        raw = load_digits().images
    except ImportError:
        if path is None:
            raise SystemExit(
                "the OOD shift needs scikit-learn's digits: pip install scikit-learn, or --digits FILE"
            ) from None
        with gzip.open(path, "rt") as f:
            raw = np.loadtxt(f, delimiter=",")[:, :64].reshape(-1, 8, 8)
    out = np.zeros((len(raw), 28, 28, 1), np.uint8)
    for i, d in enumerate(raw):
        out[i, 4:24, 4:24, 0] = np.clip(cv2.resize((d * (255 / 16)).astype(np.float32), (20, 20)), 0, 255)
    return out


def shifted(name: str, level: int, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``frames`` (N, 28, 28, 1) uint8 under shift ``name`` at severity ``level`` (0 moderate, 1 strong)."""
    import cv2

    x = frames.astype(np.float32)
    if name == "brightness down":
        x = x * (0.5, 0.25)[level]
    elif name == "brightness up":
        x = x + (64, 128)[level]
    elif name == "contrast":
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - m) * (0.5, 0.25)[level] + m
    elif name == "gaussian noise":
        x = x + rng.normal(0, (25, 50)[level], x.shape)
    elif name == "blur":
        s = (1.0, 2.0)[level]
        x = np.stack([cv2.GaussianBlur(f[..., 0], (0, 0), s)[..., None] for f in x])
    elif name == "rotation":
        deg = (20, 45)[level]
        rot = cv2.getRotationMatrix2D((13.5, 13.5), deg, 1.0)
        x = np.stack([cv2.warpAffine(f[..., 0], rot, (28, 28))[..., None] for f in x])
    elif name == "occlusion":
        size = (10, 16)[level]
        for f in x:
            r, c = rng.integers(0, 28 - size + 1, 2)
            f[r : r + size, c : c + size] = 128
    elif name == "inverted":
        x = 255 - x
    else:
        raise ValueError(name)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# Mixture shifts: the moderate severity is half of the frames shifted, the strong one all of them.
MIXED = ("inverted", "class prior (two classes)", "out of distribution (digits)")
SHIFTS = (
    "brightness down",
    "brightness up",
    "contrast",
    "gaussian noise",
    "blur",
    "rotation",
    "occlusion",
    *MIXED,
)
PRIOR_CLASSES = (0, 6)  # T-shirt/top and shirt: the answered classes of the prior shift


# --- the three detectors, vectorised over streams ------------------------------------------------------------


def _factor_rows(block: dict) -> tuple[float, np.ndarray, np.ndarray]:
    """(q, e-values for x = 0, e-values for x = 1) of one binary statistic's ten bets, as `DriftMonitor`."""
    hi, lo = float(block["high"]), float(block["low"])
    lu, ld = np.array(_bets(hi, True)), np.array(_bets(lo, False))
    f0 = np.concatenate([1 - lu * hi, 1 + ld * lo])
    f1 = np.concatenate([1 + lu * (1 - hi), 1 - ld * (1 - lo)])
    return float(block["q"]), f0, f1


@np.errstate(over="ignore")
def e_detector_delays(
    ref: dict, pos: int, conf: np.ndarray, label: np.ndarray | None, alpha: float, level: np.ndarray | None = None
) -> np.ndarray:
    """First alarm (1-based sampled frame, 0: none) of each stream (rows) under the same arithmetic as
    `DriftMonitor`, all streams at once. ``label`` None: no label channel (``DriftOptions(labels=False)``);
    ``level`` None: no input-brightness channel (a reference without it); with it, the level is read on
    every `LEVEL_EVERY`-th frame. After an alarm a CUSUM may overflow to inf: only the first alarm counts."""
    q, f0, f1 = _factor_rows(ref["exits"][pos])
    k = len(BET_GAPS)
    r, t_len = conf.shape
    m = np.ones((r, 2 * k))
    first = np.zeros(r, np.int64)
    if level is not None:
        lq, l0, l1 = _factor_rows(ref["level"])
        mlev = np.ones((r, 2 * k))
    lev_sum = np.full(r, 2.0 * k) if level is not None else np.zeros(r)
    w = 1 / (2 + (2 if level is not None else 0) + (1 if label is not None else 0))
    if label is not None:
        counts = np.asarray(ref["classes"]["counts"], np.float64)
        pi, chi = counts / counts.sum(), np.asarray(ref["classes"]["high"], np.float64)
        ml, b, g, rows = np.ones(r), np.tile(pi, (r, 1)), np.ones(r), np.arange(r)
    for t in range(t_len):
        m = np.maximum(m, 1.0) * np.where((conf[:, t] < q)[:, None], f1, f0)
        if level is not None and (t + 1) % LEVEL_EVERY == 0:
            mlev = np.maximum(mlev, 1.0) * np.where((level[:, t] < lq)[:, None], l1, l0)
            lev_sum = mlev.sum(axis=1)
        s = w / k * (m.sum(axis=1) + lev_sum)
        if label is not None:
            y = label[:, t]
            p_hat = (1 - LABEL_MIX) * pi[y] + LABEL_MIX * b[rows, y] / g
            ml = np.maximum(ml, 1.0) * (p_hat / chi[y])
            g = g / (1 - LABEL_RATE)
            b[rows, y] += LABEL_RATE * g
            big = g > 1e100
            if big.any():
                b[big] /= g[big, None]
                g[big] = 1.0
            s = s + w * ml
        new = (s >= 1 / alpha) & (first == 0)
        first[new] = t + 1
    return first


def windowed_delays(conf: np.ndarray, mu: float, sd: float, window: int, z: float) -> np.ndarray:
    """First alarm of a sliding-window z-test of the mean confidence against the calibration frames'
    mean ``mu`` (``sd`` per frame): |mean_W - mu| / (sd / sqrt(W)) > z, tested at every frame."""
    c = np.cumsum(np.pad(conf, ((0, 0), (1, 0))), axis=1)
    mean = (c[:, window:] - c[:, :-window]) / window  # windows ending at frames window..T
    hit = np.abs(mean - mu) > z * sd / math.sqrt(window)
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + window, 0)
    return first


def adwin_first(x: np.ndarray, delta: float, start: int = 0, min_cut: int = 16) -> int:
    """ADWIN (Bifet & Gavaldà 2007; the variance form of its bound), cut points at powers of two from
    the newest frame: the first frame (1-based) at which the window's two parts differ, 0: none.
    After a detection ADWIN keeps the newer part; `adwin_alarms` follows it."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    c2 = np.concatenate([[0.0], np.cumsum(x * x)])
    t_all = np.arange(start + 2 * min_cut, len(x) + 1)  # the window is x[start:t]
    if len(t_all) == 0:
        return 0
    n = (t_all - start).astype(np.float64)
    tot = c[t_all] - c[start]
    var = np.maximum((c2[t_all] - c2[start]) / n - (tot / n) ** 2, 1e-12)
    hit = np.zeros(len(t_all), bool)
    n1 = min_cut
    while n1 <= n.max() - min_cut:
        ok = n - n1 >= min_cut
        s1 = c[t_all] - c[np.maximum(t_all - n1, 0)]
        n0 = n - n1
        mean1, mean0 = s1 / n1, (tot - s1) / np.maximum(n0, 1)
        m = 1.0 / (1.0 / np.maximum(n0, 1) + 1.0 / n1)
        d = math.log(2.0) + np.log(np.maximum(n, 2.0) / delta)  # ln(2 / delta'), delta' = delta / n
        eps = np.sqrt(2.0 / m * var * d) + 2.0 / (3.0 * m) * d
        hit |= ok & (np.abs(mean1 - mean0) > eps)
        n1 *= 2
    return int(t_all[hit.argmax()]) if hit.any() else 0


def adwin_alarms(x: np.ndarray, delta: float) -> list[int]:
    """Every detection of ADWIN over ``x``; after one it starts afresh at the next frame (as a false
    alarm would be handled: the operator is told, the detector restarts)."""
    out, start = [], 0
    while True:
        t = adwin_first(x, delta, start)
        if t == 0:
            return out
        out.append(t)
        start = t


# --- 1: no drift ----------------------------------------------------------------------------------------------


def false_alarms_real(
    ref: dict, options: DriftOptions, pos: int, conf: np.ndarray, label: np.ndarray, plan, level: np.ndarray
):
    """The real `DriftMonitor` over one stream, restarted after each alarm: (alarms, sampled frames)."""
    alarms, sampled = 0, 0
    m = DriftMonitor(ref, options)
    for c, y, v in zip(conf.tolist(), label.tolist(), level.tolist(), strict=True):
        if m.observe(pos, c, y, plan, level=v):
            alarms += 1
            sampled += m.sampled
            m = DriftMonitor(ref, options)
    return alarms, sampled + m.sampled


def windowed_alarms(conf: np.ndarray, mu: float, sd: float, window: int, z: float) -> int:
    """Alarms of the windowed test over one stream, restarted after each one (its next window holds
    only frames after the alarm)."""
    c = np.cumsum(np.concatenate([[0.0], conf]))
    mean = (c[window:] - c[:-window]) / window  # mean[j]: the window of frames j..j+window-1
    starts = np.flatnonzero(np.abs(mean - mu) > z * sd / math.sqrt(window))
    n, start = 0, 0
    while True:
        i = np.searchsorted(starts, start)
        if i == len(starts):
            return n
        n += 1
        start = starts[i] + window  # the frame after the alarm


# --- 3: overhead ----------------------------------------------------------------------------------------------


class _NoOp:
    """A method call that takes a lock and does nothing else: the floor any per-frame hook pays."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()

    def observe(self, pos, c, y, plan=None, x=None) -> bool:
        with self._lock:
            return False


def observe_ns(ref: dict, pos: int, values: tuple, xs: list, frames: int, rounds: int = 30) -> dict:
    """CPU ns (this thread's CPU time, so time the scheduler gives to other processes does not count)
    per call of `DriftMonitor.observe` (labels watched, and the input brightness where the reference
    has it) and of a no-op locked call, the bare loop subtracted; rounds interleaved in a random order,
    the fastest round of each kept (on a shared machine the fastest round is the one least disturbed
    by the others' work). ``values``: real (confidence, class) pairs, so that the monitor stays out
    of alarm as on a camera that looks like calibration; ``xs``: real network inputs, a few reused
    (hot in the cache, as the input a cascade just computed is)."""
    rng = random.Random(0)
    conf, lab = (np.resize(v, frames).tolist() for v in values)
    x_of = [xs[i % len(xs)] for i in range(frames)]
    calls = {"observe": lambda: DriftMonitor(ref, DriftOptions()).observe, "noop": lambda: _NoOp().observe}
    best = {"observe": math.inf, "noop": math.inf, "bare": math.inf}
    for _ in range(rounds):
        for name in rng.sample(list(best), 3):
            if name == "bare":
                t0 = time.thread_time_ns()
                for _c, _y, _x in zip(conf, lab, x_of, strict=True):
                    pass
            else:
                f = calls[name]()
                t0 = time.thread_time_ns()
                for c, y, x in zip(conf, lab, x_of, strict=True):
                    f(pos, c, y, None, x)
            best[name] = min(best[name], (time.thread_time_ns() - t0) / frames)
    return {
        "observe_ns": best["observe"] - best["bare"],
        "noop_locked_call_ns": best["noop"] - best["bare"],
        "input_level_read": "level" in ref,
        "rounds": rounds,
        "calls_per_round": frames,
    }


def predict_overhead(artifact: str, frames: np.ndarray, rounds: int, per_round: int) -> dict:
    """`Cascade.predict` with the monitor against without it and against a twin without it (A/A),
    rounds in a random order. Each round every cascade classifies the same ``per_round`` test images
    (a fresh random draw per round): in-distribution frames, so the monitor is out of alarm and the
    paths are the calibrated plan's mix of exits."""
    from edgeexit.runtime import Cascade

    cascades = {
        "plain": Cascade.load(artifact, backend="onnxruntime"),
        "twin": Cascade.load(artifact, backend="onnxruntime"),  # A/A: the noise floor
        "drift": Cascade.load(artifact, backend="onnxruntime", drift=True),
    }
    for c in cascades.values():
        for f in frames[:100]:
            c.predict(f)
    rng = np.random.default_rng(1)
    ab, aa, per = [], [], {}
    for _ in range(rounds):
        batch = list(frames[rng.choice(len(frames), per_round, replace=False)])
        for name in rng.permutation(list(cascades)):
            c = cascades[name]
            t0 = time.perf_counter()
            for f in batch:
                c.predict(f)
            per[name] = (time.perf_counter() - t0) / per_round
        ab.append(per["drift"] - per["plain"])
        aa.append(per["twin"] - per["plain"])
    state = cascades["drift"].drift.state()
    for c in cascades.values():
        c.close()

    def ci(d: list) -> dict:
        d = np.asarray(d) * 1e6
        boot = np.median(rng.choice(d, (2000, len(d))), axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return {"median_us": float(np.median(d)), "ci95_us": [float(lo), float(hi)]}

    return {
        "rounds": rounds,
        "frames_per_round": per_round,
        "plain_ms_per_frame": 1e3 * per["plain"],
        "drift_minus_plain": ci(ab),
        "aa_twin_minus_plain": ci(aa),
        "monitor_alarm_during_measurement": state["alarm"],
        "monitor_sampled_frames": state["sampled_frames"],
    }


# --- main -----------------------------------------------------------------------------------------------------


def summarise(first: np.ndarray, pre: int) -> dict:
    """Delays after the change (sampled frames) of streams whose first alarm came after it."""
    false_early = int(((first > 0) & (first <= pre)).sum())
    after = first[first > pre] - pre
    n = len(first)
    return {
        "streams": n,
        "detected": float(len(after) / n),
        "alarm_before_change": false_early,
        "median": float(np.median(after)) if len(after) > n / 2 else None,  # None: half or more never detected
        "p90": float(np.percentile(after, 90)) if len(after) >= 0.9 * n else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--digits", help="sklearn's digits.csv.gz when scikit-learn is not installed")
    ap.add_argument("--alpha", type=float, default=1e-4)
    ap.add_argument("--streams", type=int, default=20, help="i.i.d. no-drift streams")
    ap.add_argument("--frames", type=int, default=50_000, help="frames per no-drift stream")
    ap.add_argument("--video-streams", type=int, default=10)
    ap.add_argument("--hold", type=int, default=5, help="frames each image is held in a video-like stream")
    ap.add_argument("--drift-streams", type=int, default=100, help="streams per shift and severity")
    ap.add_argument("--pre", type=int, default=2000, help="in-distribution frames before the change")
    ap.add_argument("--post", type=int, default=5000, help="frames after the change")
    ap.add_argument("--window", type=int, default=100, help="the windowed test's window")
    ap.add_argument("--adwin-delta", type=float, default=0.002)
    ap.add_argument("--overhead-rounds", type=int, default=20)
    ap.add_argument("--overhead-frames", type=int, default=200, help="frames per cascade per overhead round")
    ap.add_argument("--overhead-only", action="store_true", help="re-measure part 3 only, into --json")
    ap.add_argument(
        "--statistic-only",
        action="store_true",
        help="the choice of q: delays of the confidence channel alone with q at the 25th, 50th and 75th "
        "percentile of the calibration confidences, moderate shifts, into --json",
    )
    ap.add_argument("--json", default="docs/drift_warning.json")
    ap.add_argument("--plot", default="docs/drift_warning.png")
    args = ap.parse_args()
    t_start = time.perf_counter()

    from edgeexit.data import load_dataset
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames
    from edgeexit.runtime.monitor import parse_reference

    cascade = Cascade.load(args.artifact, backend="onnxruntime")
    view = cascade.derive(first_confidence=True)
    plan = cascade.plan
    pos = plan.groups[0][1]
    ref = parse_reference(cascade.artifact.calibration.to_dict()["drift_reference"], cascade.num_exits)
    if args.statistic_only:
        result = json.loads(Path(args.json).read_text())
        result["statistic_choice"] = statistic_choice(args, view, ref, pos)
        _write_json(Path(args.json), result)
        return
    if args.overhead_only:
        result = json.loads(Path(args.json).read_text())
        ds = load_dataset("fashion-mnist", "test")
        frames = ds.images[:2000].permute(0, 2, 3, 1).numpy()
        result["overhead"] = overhead_block(args, ref, pos, frames)
        _write_json(Path(args.json), result)
        return
    opts = DriftOptions(alpha=args.alpha)
    ds = load_dataset("fashion-mnist", "test")
    test = ds.images.permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    clean_c, clean_y, clean_l = first_exit_values(view, test)
    stored = load_calibration_frames(cascade.artifact)
    cal_c, _, _ = first_exit_values(view, stored["frames"])
    mu, sd = float(cal_c.mean()), float(cal_c.std())
    print(
        f"exit {pos + 1} is the first evaluated; q = {ref['exits'][pos]['q']:.4f}, calibration below-q rate "
        f"bounds [{ref['exits'][pos]['low']:.4f}, {ref['exits'][pos]['high']:.4f}]; test images below q: "
        f"{(clean_c < ref['exits'][pos]['q']).mean():.4f} ({time.perf_counter() - t0:.0f} s)"
    )

    z = float(-_norm_ppf(args.alpha / 2))
    ctx = (args, ref, opts, pos, plan, view, test, clean_c, clean_y, clean_l, mu, sd, z, rng)
    no_drift = no_drift_rows(*ctx)
    cells = drift_cells(*ctx)

    # -- 3. overhead -------------------------------------------------------------------------------
    overhead = overhead_block(args, ref, pos, test[:2000])

    result = {
        "artifact": args.artifact,
        "machine": _machine(),
        "command": "nice -n 10 python benchmarks/drift_warning.py " + " ".join(_argv()),
        "alpha": args.alpha,
        "first_evaluated_exit": pos + 1,
        "reference": ref["exits"][pos],
        "calibration_confidence_mean_sd": [mu, sd],
        "windowed_test": {"window": args.window, "z": z},
        "adwin_delta": args.adwin_delta,
        "no_drift": no_drift,
        "drift": {"pre": args.pre, "post": args.post, "cells": cells},
        "overhead": overhead,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    _write_json(Path(args.json), result)
    plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot} ({result['seconds']:.0f} s)")


def no_drift_rows(args, ref, opts, pos, plan, view, test, clean_c, clean_y, clean_l, mu, sd, z, rng) -> list[dict]:
    """Part 1: false alarms on in-distribution streams (i.i.d. and video-like), with the baselines'."""
    # no drift -------------------------------------------------------------------------------
    n = len(test)
    iid = []
    for _ in range(args.streams):
        idx = np.concatenate([rng.permutation(n) for _ in range(math.ceil(args.frames / n))])[: args.frames]
        iid.append(idx)
    t0 = time.perf_counter()
    res_iid = [false_alarms_real(ref, opts, pos, clean_c[i], clean_y[i], plan, clean_l[i]) for i in iid]
    t_real = time.perf_counter() - t0
    # video-like: 2,000 images, each held `hold` frames, every held frame a noisy copy (sigma 4)
    base = rng.choice(n, 2000, replace=False)
    held = np.repeat(test[base][:, None], args.hold, axis=1).astype(np.float32)
    held = np.clip(np.rint(held + rng.normal(0, 4, held.shape)), 0, 255).astype(np.uint8)
    v_c, v_y, v_l = (v.reshape(2000, args.hold) for v in first_exit_values(view, held.reshape(-1, 28, 28, 1)))
    video = []
    per_stream = args.frames * 2 // args.hold
    for _ in range(args.video_streams):
        imgs = rng.integers(0, 2000, per_stream)
        video.append((v_c[imgs].reshape(-1), v_y[imgs].reshape(-1), v_l[imgs].reshape(-1)))
    res_video = [false_alarms_real(ref, opts, pos, c, y, plan, lv) for c, y, lv in video]
    h = args.hold
    res_video_k = [false_alarms_real(ref, opts, pos, c[::h], y[::h], plan, lv[::h]) for c, y, lv in video]

    def baseline_false(streams) -> dict:
        win = sum(windowed_alarms(c, mu, sd, args.window, z) for c in streams)
        adw = sum(len(adwin_alarms(c, args.adwin_delta)) for c in streams)
        return {"windowed": win, "adwin": adw}

    t0 = time.perf_counter()
    base_iid = baseline_false([clean_c[i] for i in iid])
    base_video = baseline_false([c for c, _, _ in video])
    t_base = time.perf_counter() - t0

    def row(res, name, every) -> dict:
        alarms, sampled = sum(a for a, _ in res), sum(s for _, s in res)
        return {
            "streams": name,
            "every": every,
            "sampled_frames": sampled,
            "false_alarms": alarms,
            "allowed_by_guarantee": sampled * args.alpha,
            "sampled_frames_per_false_alarm": sampled / alarms if alarms else None,
        }

    no_drift = [
        row(res_iid, f"{args.streams} i.i.d. (test images in random order)", 1),
        row(res_video, f"{args.video_streams} video-like (each image held {args.hold} frames, noise sigma 4)", 1),
        row(res_video_k, f"the same video-like streams sampled every {args.hold}th frame", args.hold),
    ]
    no_drift[0]["baselines_false_alarms"] = base_iid
    no_drift[1]["baselines_false_alarms"] = base_video
    print(f"no drift ({t_real:.0f} s real monitor, {t_base:.0f} s baselines):")
    for r in no_drift:
        print(
            f"  {r['streams']}: {r['false_alarms']} false alarms in {r['sampled_frames']:,} sampled frames "
            f"(guarantee: at most {r['allowed_by_guarantee']:.0f} on average)"
            + (
                f"; windowed test {r['baselines_false_alarms']['windowed']}, ADWIN "
                f"{r['baselines_false_alarms']['adwin']}"
                if "baselines_false_alarms" in r
                else ""
            )  # fmt: skip
        )

    return no_drift


def drift_cells(args, ref, opts, pos, plan, view, test, clean_c, clean_y, clean_l, mu, sd, z, rng) -> list[dict]:
    """Part 2: detection delay per shift and severity, the e-detector against the two baselines."""
    n = len(test)
    # drift ----------------------------------------------------------------------------------
    digits = digits_28(args.digits)
    dig_c, dig_y, dig_l = first_exit_values(view, digits)
    has_level = "level" in ref
    pool = rng.choice(n, 2000, replace=False)
    r_s, pre, post = args.drift_streams, args.pre, args.post
    cells = []
    checked = False
    for name in SHIFTS:
        for level in (0, 1):
            t0 = time.perf_counter()
            if name == "class prior (two classes)":
                keep = np.flatnonzero(np.isin(clean_y, PRIOR_CLASSES))
                s_c, s_y, s_l = clean_c[keep], clean_y[keep], clean_l[keep]
            elif name == "out of distribution (digits)":
                s_c, s_y, s_l = dig_c, dig_y, dig_l
            else:
                s_c, s_y, s_l = first_exit_values(view, shifted(name, level, test[pool], rng))
            mix = (0.5, 1.0)[level] if name in MIXED else 1.0
            a = rng.integers(0, n, (r_s, pre))
            take_shift = rng.random((r_s, post)) < mix
            b = rng.integers(0, len(s_c), (r_s, post))
            c_in = rng.integers(0, n, (r_s, post))
            conf, lab, lev = (
                np.concatenate([clean[a], np.where(take_shift, shift[b], clean[c_in])], axis=1)
                for clean, shift in ((clean_c, s_c), (clean_y, s_y), (clean_l, s_l))
            )
            first_e = e_detector_delays(ref, pos, conf, lab, args.alpha, lev if has_level else None)
            first_e_old = e_detector_delays(ref, pos, conf, lab, args.alpha) if has_level else first_e
            if not checked:  # the vectorised copy must alarm where the real monitor does
                for i in range(3):
                    m = DriftMonitor(ref, opts)
                    t_real_alarm = 0
                    streams_i = zip(conf[i].tolist(), lab[i].tolist(), lev[i].tolist(), strict=True)
                    for t, (cc, yy, vv) in enumerate(streams_i, 1):
                        if m.observe(pos, cc, yy, plan, level=vv):
                            t_real_alarm = t
                            break
                    assert t_real_alarm == first_e[i], (t_real_alarm, first_e[i])
                checked = True
            first_w = windowed_delays(conf, mu, sd, args.window, z)
            first_a = np.array([adwin_first(conf[i], args.adwin_delta) for i in range(r_s)])
            cell = {
                "shift": name,
                "severity": ("moderate", "strong")[level],
                "shifted_below_q": float((s_c < ref["exits"][pos]["q"]).mean()),
                "shifted_mean_confidence": float(s_c.mean()),
                "shifted_below_level_q": float((s_l < ref["level"]["q"]).mean()) if has_level else None,
                "mix": mix,
                "e_detector": summarise(first_e, pre),
                "e_detector_without_level": summarise(first_e_old, pre),
                "windowed": summarise(first_w, pre),
                "adwin": summarise(first_a, pre),
            }
            cells.append(cell)
            e = cell["e_detector"]
            print(
                f"  {name:32s} {cell['severity']:8s} below-q {cell['shifted_below_q']:.3f}: e-detector median "
                f"{e['median']} p90 {e['p90']} detected {e['detected']:.2f} (without the level channel "
                f"{cell['e_detector_without_level']['median']}); windowed {cell['windowed']['median']}; "
                f"ADWIN {cell['adwin']['median']} ({time.perf_counter() - t0:.0f} s)"
            )

    return cells


def statistic_choice(args, view, ref: dict, pos: int) -> dict:
    """Which quantile q of the first evaluated exit's calibration confidences makes the best 0/1
    statistic: the confidence channel alone (labels off), moderate shifts, each q with its own
    Clopper-Pearson bounds from the stored calibration frames."""
    from edgeexit.data import load_dataset
    from edgeexit.runtime.manifest import load_calibration_frames
    from edgeexit.runtime.monitor import REFERENCE_DELTA, clopper_pearson

    rng = np.random.default_rng(0)
    ds = load_dataset("fashion-mnist", "test")
    test = ds.images.permute(0, 2, 3, 1).numpy()
    clean_c, clean_y, _ = first_exit_values(view, test)
    cal_c, _, _ = first_exit_values(view, load_calibration_frames(view.artifact)["frames"])
    digits_c, _, _ = first_exit_values(view, digits_28(args.digits))
    pool = rng.choice(len(test), 2000, replace=False)
    shifted_c = {}
    for name in SHIFTS:
        if name == "class prior (two classes)":
            shifted_c[name] = clean_c[np.isin(clean_y, PRIOR_CLASSES)]
        elif name == "out of distribution (digits)":
            shifted_c[name] = digits_c
        else:
            shifted_c[name] = first_exit_values(view, shifted(name, 0, test[pool], rng))[0]
    out = {"quantiles": [0.25, 0.5, 0.75], "streams": args.drift_streams, "pre": args.pre, "post": args.post,
           "alpha": args.alpha, "median_delay": {}}  # fmt: skip
    for quantile in out["quantiles"]:
        q = float(np.quantile(cal_c, quantile))
        below = int((cal_c < q).sum())
        lo, hi = clopper_pearson(below, len(cal_c), REFERENCE_DELTA)
        exits = [dict(e) for e in ref["exits"]]
        exits[pos] = {"q": q, "below": below, "low": lo, "high": hi}
        ref_q = {**ref, "exits": exits}
        row = {}
        for name, s_c in shifted_c.items():
            mix = 0.5 if name in MIXED else 1.0
            r_s, pre, post = args.drift_streams, args.pre, args.post
            conf = np.empty((r_s, pre + post))
            conf[:, :pre] = clean_c[rng.integers(0, len(clean_c), (r_s, pre))]
            take = rng.random((r_s, post)) < mix
            conf[:, pre:] = np.where(take, s_c[rng.integers(0, len(s_c), (r_s, post))],
                                     clean_c[rng.integers(0, len(clean_c), (r_s, post))])  # fmt: skip
            row[name] = summarise(e_detector_delays(ref_q, pos, conf, None, args.alpha), pre)["median"]
        out["median_delay"][f"{quantile:g}"] = row
        print(f"q at the {100 * quantile:.0f}th percentile ({q:.4f}): " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return out


def overhead_block(args, ref: dict, pos: int, frames: np.ndarray) -> dict:
    """Part 3 on ``frames`` (uint8 test images): `observe` alone, then whole `Cascade.predict`."""
    from edgeexit.runtime import Cascade

    with Cascade.load(args.artifact, backend="onnxruntime") as c:
        view = c.derive(first_confidence=True)
        conf, lab, _ = first_exit_values(view, frames)
        xs = [c.preprocessor(f)[None] for f in frames[:64]]
    ns = observe_ns(ref, pos, (conf, lab), xs, 20_000, rounds=args.overhead_rounds)
    overhead = predict_overhead(args.artifact, frames, args.overhead_rounds, args.overhead_frames)
    print(
        f"overhead: DriftMonitor.observe {ns['observe_ns']:.0f} CPU ns per frame (a no-op locked call "
        f"{ns['noop_locked_call_ns']:.0f} ns); Cascade.predict drift - plain "
        f"{overhead['drift_minus_plain']['median_us']:+.2f} us {overhead['drift_minus_plain']['ci95_us']}, "
        f"A/A {overhead['aa_twin_minus_plain']['median_us']:+.2f} us {overhead['aa_twin_minus_plain']['ci95_us']} "
        f"(plain {overhead['plain_ms_per_frame']:.3f} ms a frame; monitor in alarm: "
        f"{overhead['monitor_alarm_during_measurement']})"
    )
    return {**ns, **overhead}


def _write_json(out: Path, result: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)  # write, then rename: a reader never sees half a file


def _norm_ppf(p: float) -> float:
    """The standard normal quantile (bisection on erfc; no scipy)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        name = platform.processor()
    return f"{name}, {platform.python_implementation()} {platform.python_version()}"


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def plot(result: dict, path: str) -> None:
    from plotting import figure

    fig, ax = figure((9, 4.2))
    cells = result["drift"]["cells"]
    labels = [f"{c['shift']}\n{c['severity']}" for c in cells]
    x = np.arange(len(cells))
    post = result["drift"]["post"]
    for j, (key, name) in enumerate((("e_detector", "e-detector (guarantee)"), ("windowed", "windowed z-test"),
                                     ("adwin", "ADWIN"))):  # fmt: skip
        med = [c[key]["median"] if c[key]["median"] is not None else post * 1.5 for c in cells]
        ax.bar(x + (j - 1) * 0.27, med, 0.27, label=name)
    ax.axhline(300, color="k", lw=0.8, ls="--", label="300 frames (target, moderate shifts)")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=90, fontsize=6)
    ax.set_title(
        f"median detection delay, alpha = {result['alpha']:g} (bars at {post * 1.5:.0f}: not detected in {post})",
        fontsize=8,
    )
    import matplotlib.pyplot as plt

    ax.set_ylabel("sampled frames after the change")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
