"""On-device latency of every unit, the per-exit decision and the per-frame overhead (numpy only).

Units are timed one at a time on real inputs (a held-out image pushed through the preceding
units), after a warm-up, for at least ``repeats`` runs or ``min_seconds``, whichever comes first
after ``min_repeats``. GPU runners synchronise after every run so a time is the unit's own.
This is the runtime's supported profiling mode: calibrate and bench call it, nothing else pokes
at the cascade's insides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

from edgeexit.runtime.backends.base import HeadOutput, Runner
from edgeexit.runtime.latency import LatencyStats, percentile, percentile_along
from edgeexit.runtime.plan import SKIP, CascadePlan, exit_group_name, head_name, segment_name

Confidence = Callable[[HeadOutput], np.ndarray]  # a head's output → one confidence per row (a policy)
CHUNK = 256  # frames per call into a runner when a caller gives more


def exit_group_plan(k: int, first: int, last: int) -> CascadePlan:
    """The plan whose fused call runs segments ``first``..``last`` and head ``last``: the exit before
    ``first`` and exit ``last`` evaluated (the earlier one hands over the state), every other skipped."""
    th = [SKIP] * (k - 1) + [0.0]
    th[last] = 0.0
    if first > 0:
        th[first - 1] = 0.0
    return CascadePlan.from_thresholds(th)


def latency_stats(samples_ms) -> dict:
    """A unit's timing as profile tables keep it (`LatencyStats`, with ``repeats`` for its ``n``)."""
    s = LatencyStats.from_samples(samples_ms)
    return {"p50_ms": s.p50_ms, "p95_ms": s.p95_ms, "p99_ms": s.p99_ms, "mean_ms": s.mean_ms, "repeats": s.n}


def time_call(fn, sync, repeats: int = 200, min_seconds: float = 1.0, warmup: int = 10, min_repeats: int = 30) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        n = len(times)
        if n >= repeats or (n >= min_repeats and time.perf_counter() - start >= min_seconds):
            break
    return latency_stats(times)


def chunk_size(runner: Runner, requested: int | None = None, chunk: int = CHUNK) -> int:
    """Rows per runner call: ``requested`` (at most ``chunk``), within the runner's max batch."""
    limit = runner.info.max_batch
    size = min(requested or chunk, chunk)
    return min(size, limit) if limit else size


def exit_statistics(
    runner: Runner,
    plan: CascadePlan,
    x: np.ndarray,
    confidence: Confidence | None = None,
    batch_size: int = CHUNK,
    progress=None,
) -> dict[str, np.ndarray]:
    """Every unit of ``plan``'s model on preprocessed images ``x``: (N, K) ``confidence`` (the head's
    own max-softmax, or ``confidence(head)``) and ``prediction``. Batches respect the runner's max batch."""
    from edgeexit.runtime.chain import chain_outputs

    size = chunk_size(runner, batch_size)
    out = chain_outputs(runner, x, plan.num_exits, size, confidence, progress=progress)
    return {"confidence": out["confidence"], "prediction": out["prediction"]}


def profile_units(
    runner: Runner,
    plan: CascadePlan,
    image: np.ndarray,
    batch: int = 1,
    repeats: int = 200,
    min_seconds: float = 1.0,
    progress=None,
    confidence: Confidence | None = None,
) -> dict:
    """Per-unit latency at ``batch`` (a real preprocessed image repeated), plus the decision:
    reading a head's confidence (``confidence``, the cascade's policy) and comparing it with a threshold."""
    runner.check_batch(batch)
    x = np.ascontiguousarray(np.repeat(image[None], batch, axis=0), dtype=np.float32)
    state = runner.from_host(x)
    units: dict[str, dict] = {}
    head: HeadOutput | None = None
    for pos in range(plan.num_exits):
        s_in = state
        units[segment_name(pos)] = time_call(
            lambda s_in=s_in, pos=pos: runner.run_segment(pos, s_in), runner.synchronize, repeats, min_seconds
        )
        state = runner.run_segment(pos, state)
        tap = state[-1]
        units[head_name(pos)] = time_call(
            lambda tap=tap, pos=pos: runner.run_head(pos, tap), runner.synchronize, repeats, min_seconds
        )
        if head is None:
            head = runner.run_head(pos, tap)
        if progress is not None:
            progress(pos + 1)
    if head is None:
        raise ValueError("profile_units needs a plan with at least one exit")
    first: HeadOutput = head
    conf = (lambda h: h.confidence) if confidence is None else confidence
    decision = time_call(lambda: float(conf(first)[0]) >= 0.5, lambda: None, repeats, 0.2)
    return {"batch": batch, "units": units, "decision": decision}


class UnitLatency(NamedTuple):
    """Per-unit p95 latency by 0-based position: what ``predict(frame, deadline_ms=...)`` plans with."""

    segment_ms: tuple[float, ...]
    head_ms: tuple[float, ...]


def unit_latency_table(plan: CascadePlan, p95_ms: Mapping[str, float]) -> UnitLatency:
    """``p95_ms`` (unit name → ms: calibration's ``latency_p95_ms``, or `profile_units` p95s) as the
    table for ``plan``'s model: every segment and head must be there, as a finite number >= 0."""
    if not isinstance(p95_ms, Mapping):
        raise ValueError(f"unit latencies must be a mapping of unit name to ms, got {type(p95_ms).__name__}")

    def ms(name: str) -> float:
        if name not in p95_ms:
            raise ValueError(f"unit latencies lack {name} (every segment and head needs a p95 in ms)")
        try:
            v = float(p95_ms[name])
        except (TypeError, ValueError):
            v = float("nan")
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"unit latency of {name} must be a finite number of ms >= 0, got {p95_ms[name]!r}")
        return v

    k = plan.num_exits
    return UnitLatency(tuple(ms(segment_name(p)) for p in range(k)), tuple(ms(head_name(p)) for p in range(k)))


def frame_overhead_ms(cascade, frame, unit_p50: dict, repeats: int = 100) -> float:
    """Per-frame cost outside the units (validation, preprocessing, host↔device copy, bookkeeping):
    median end-to-end ``predict`` of the plain model (every intermediate exit skipped), run unit by
    unit, minus the units it ran. Unfused, so the overhead is what surrounds the units the cost
    model adds up (fusion at run time only makes the real cascade faster than predicted)."""
    k = cascade.num_exits
    plain = cascade.derive(CascadePlan.full_model(k), fuse=False)
    lat = time_call(lambda: plain.predict(frame), cascade.runner.synchronize, repeats, 0.5)["p50_ms"]
    units = sum(unit_p50[segment_name(pos)] for pos in range(k)) + unit_p50[head_name(k - 1)]
    return max(0.0, lat - units)


def profile_exit_groups(cascade, image: np.ndarray, repeats: int, min_seconds: float = 0.1, progress=None) -> dict:
    """On a runner that fuses, the latency of every group a plan can make: segments a..b and head b,
    the one call the cascade makes per evaluated exit. What runs is what is timed: fusion removes
    the calls and the (de)quantisation between units, which unit-by-unit timing would charge.
    The K(K+1)/2 graphs are built in memory, one group at a time, and not cached in the artifact
    (together they hold ~10x the model's weights); the plan calibrate picks is cached when it loads."""
    runner, k = cascade.runner, cascade.num_exits
    states = [runner.from_host(np.ascontiguousarray(image[None], dtype=np.float32))]
    for pos in range(k - 1):
        states.append(runner.run_segment(pos, states[-1]))
    groups: dict[str, dict] = {}
    for first in range(k):
        for last in range(first, k):
            runner.prepare(exit_group_plan(k, first, last), True, cache=False)  # built in memory only
            groups[exit_group_name(first, last)] = time_call(
                lambda a=first, b=last: runner.run_exit(a, b, states[a]), runner.synchronize, repeats, min_seconds
            )
            runner.forget([cascade.plan])  # K(K+1)/2 groups: keep only what the cascade's own plan uses
        if progress is not None:
            progress(first + 1)
    return groups


def fused_frame_overhead_ms(cascade, frame, first_group_p50: float, repeats: int = 200) -> float:
    """Per-frame cost outside the group calls: ``predict`` of the cheapest plan as it runs (fused)
    minus its one group call."""
    cheapest = cascade.derive(CascadePlan.first_exit(cascade.num_exits), fuse=True)
    lat = time_call(lambda: cheapest.predict(frame), cascade.runner.synchronize, repeats, 0.5)["p50_ms"]
    return max(0.0, lat - first_group_p50)


# --- A cost model that holds on a busy device: every piece timed in interleaved rounds -----------------------

QUIET_SHARE = 1 / 3  # the fastest third of the rounds estimate the quiet device
MIN_QUIET_ROUNDS = 3
INTERRUPTED = 2.0  # a call above this many times its piece's quiet median was interrupted


@dataclass(frozen=True)
class RoundsProfile:
    """Pieces timed in interleaved rounds: per piece, the `latency_stats` of its calls in the quiet
    rounds (plus ``spread``: how far load moved it, the (p75 - p25) / p50 of its per-round medians
    over every round), and ``load``, how busy the device was while they ran."""

    stats: dict[str, dict]
    load: dict
    samples: np.ndarray  # (rounds, pieces, calls per round) in ms, the pieces in ``stats``' order

    def pooled(self, other: RoundsProfile) -> RoundsProfile:
        """Both profiles' rounds summarised as one (the pieces must be the same): a second try on a
        busy device adds its quiet rounds to the first's. ``cpu_share`` and ``preemptions_per_s`` are
        averaged over the two tries' time."""
        a, b = self.load, other.load
        secs = a["seconds"] + b["seconds"]
        load = {"seconds": round(secs, 3)}
        for key in ("cpu_share", "preemptions_per_s"):
            if key in a and key in b:
                load[key] = (a[key] * a["seconds"] + b[key] * b["seconds"]) / max(secs, 1e-9)
        return summarise_rounds(list(self.stats), np.concatenate([self.samples, other.samples]), load)


def profile_rounds(
    calls: Mapping[str, Callable[[], object]],
    sync: Callable[[], object],
    rounds: int,
    per_round: int = 4,
    warmup: int = 3,
    max_seconds: float = 30.0,
    progress: Callable[[int], object] | None = None,
) -> RoundsProfile:
    """Time every piece in ``calls`` (name -> a call of it) in ``rounds`` rounds: each round runs
    every piece ``per_round`` times, the order reversed every other round, so that a burst of load
    lands on all pieces alike instead of on whichever was being timed. A round's time is the sum of
    its pieces' medians; the quiet device is what the fastest third of the rounds saw, every piece
    from the same rounds, so their ratios (a plan to the full model) are ratios of one moment.
    Stops early after ``max_seconds`` once 8 rounds are done (a large model on a slow device).
    ``progress(rounds done)`` after each round."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    sync()
    clock = time.perf_counter
    samples: list[np.ndarray] = []
    usage0, wall0 = _usage(), clock()
    for r in range(rounds):
        t_round = np.empty((len(names), per_round))
        order = range(len(names)) if r % 2 == 0 else range(len(names) - 1, -1, -1)
        for i in order:
            fn = calls[names[i]]
            for c in range(per_round):
                t = clock()
                fn()
                sync()
                t_round[i, c] = (clock() - t) * 1e3
        samples.append(t_round)
        if progress is not None:
            progress(r + 1)
        if r + 1 >= 8 and clock() - wall0 >= max_seconds:
            break
    load = _load(usage0, _usage(), clock() - wall0)
    return summarise_rounds(names, np.stack(samples), load)


def summarise_rounds(names: list[str], samples: np.ndarray, load: dict | None = None) -> RoundsProfile:
    """``samples`` (rounds, pieces, calls per round) in ms → `RoundsProfile` (see `profile_rounds`);
    ``load`` gains the round statistics. Rounds of several profiles may be stacked and summarised once."""
    medians = percentile_along(samples, 50, axis=2)  # (rounds, pieces)
    totals = medians.sum(axis=1)
    n_quiet = min(len(totals), max(MIN_QUIET_ROUNDS, math.ceil(len(totals) * QUIET_SHARE)))
    quiet = np.argsort(totals, kind="stable")[:n_quiet]
    stats, interrupted = {}, 0
    for i, name in enumerate(names):
        p25, p50, p75 = (percentile(medians[:, i], q) for q in (25, 50, 75))
        spread = (p75 - p25) / p50 if p50 > 0 else 0.0
        calm = samples[quiet, i, :].ravel()
        # a call that took more than twice the piece's quiet median was interrupted (the OS ran something
        # else): not the piece's cost
        limit = INTERRUPTED * percentile(calm, 50)
        interrupted += int((samples[:, i, :] > limit).sum())
        stats[name] = {**latency_stats(calm[calm <= limit]), "spread": spread}
    q = totals[quiet]
    rounds = {
        "rounds": int(len(totals)),
        "quiet_rounds": int(n_quiet),
        # a typical round against the quiet ones: 1.0 on a device nobody else uses
        "slowdown": percentile(totals, 50) / float(q.mean()),
        # how far the quiet rounds disagree among themselves: the quiet cost's own uncertainty
        "quiet_spread": float(q.max() / q.min() - 1.0),
        # the relative standard error of the quiet level (the quiet rounds' sd / mean / sqrt(n)): how
        # well the quiet cost is known; more rounds (calibrate --repeat) make it smaller
        "quiet_error": float(q.std(ddof=1) / q.mean() / math.sqrt(len(q))) if len(q) > 1 else 0.0,
        # calls slowed to more than twice their piece's quiet median, over every round
        "interrupted_share": interrupted / samples.size,
    }
    return RoundsProfile(stats, {**(load or {}), **rounds}, samples)


def _usage() -> tuple[float, int | None]:
    """This process's CPU time and involuntary context switches (preemptions) so far."""
    try:
        import resource

        switches: int | None = int(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)
    except (ImportError, OSError):  # not on every platform
        switches = None
    return time.process_time(), switches


def _load(before: tuple[float, int | None], after: tuple[float, int | None], wall_s: float) -> dict:
    """What the process got of the wall time: ``cpu_share`` is its CPU time over the wall time (the
    units run on one thread, so about 1.0 when nothing else wants the core, 0.5 when half the time
    went to other processes), ``preemptions_per_s`` how often the OS took the core away."""
    wall_s = max(wall_s, 1e-9)
    out = {"seconds": round(wall_s, 3), "cpu_share": (after[0] - before[0]) / wall_s}
    if before[1] is not None and after[1] is not None:
        out["preemptions_per_s"] = (after[1] - before[1]) / wall_s
    return out


def cost_pieces(cascade, image: np.ndarray, frame: np.ndarray) -> tuple[dict, Callable[[], None]]:
    """Everything the cost model adds up, as calls for `profile_rounds`, and a cleanup: every segment
    and head on a real image; ``decision`` (reading a head's confidence, comparing it); on a runner
    that fuses, every exit group (segments a..b and head b, the one call the cascade makes per
    evaluated exit, built in memory); and ``frame``, a whole ``predict`` of the cheapest plan as it
    runs (fused: one group) or of the plain model unit by unit, from which the per-frame overhead is
    read. The cleanup forgets the groups and closes the view."""
    runner, k = cascade.runner, cascade.num_exits
    states = [runner.from_host(np.ascontiguousarray(image[None], dtype=np.float32))]
    for pos in range(k):
        states.append(runner.run_segment(pos, states[-1]))
    calls: dict[str, Callable[[], object]] = {}
    for pos in range(k):
        calls[segment_name(pos)] = partial(runner.run_segment, pos, states[pos])
        calls[head_name(pos)] = partial(runner.run_head, pos, states[pos + 1][-1])
    fused = bool(cascade.options.fuse and runner.info.fuses)
    if fused:
        for first in range(k):
            for last in range(first, k):
                runner.prepare(exit_group_plan(k, first, last), True, cache=False)  # in memory only
                calls[exit_group_name(first, last)] = partial(runner.run_exit, first, last, states[first])
        view = cascade.derive(CascadePlan.first_exit(k), fuse=True)
    else:
        view = cascade.derive(CascadePlan.full_model(k), fuse=False)
    calls["frame"] = lambda: view.predict(frame)
    every = _every_exit_view(cascade, frame, fused)
    if every is not None:
        calls[EVERY_EXIT] = lambda: every.predict(frame)
    head = runner.run_head(0, states[1][-1])
    calls["decision"] = lambda: float(cascade.confidence(head)[0]) >= 0.5  # reading a confidence, comparing it

    def cleanup() -> None:
        view.close()
        if every is not None:
            every.close()
        if fused:
            runner.forget([cascade.plan])  # K(K+1)/2 groups: keep only what the cascade's own plan uses

    return calls, cleanup


EVERY_EXIT = "every_exit"  # the cost piece: a whole predict that evaluates every exit and leaves at the last


def _every_exit_view(cascade, frame: np.ndarray, fused: bool):
    """A view of ``cascade`` that evaluates every exit and lets the frame leave only at the last
    (threshold 1.0: a confidence never exceeds it), or None when this frame reaches 1.0 somewhere
    (it would leave early, so the piece would not time what it names) or there is one exit."""
    k = cascade.num_exits
    if k < 2:
        return None
    view = cascade.derive(CascadePlan.from_thresholds([1.0] * (k - 1) + [0.0]), fuse=fused)
    if view.predict(frame).exit_index != k:
        view.close()
        return None
    return view


def exit_step_from(stats: Mapping[str, dict], num_exits: int, fused: bool, overhead_ms: float) -> float:
    """What each evaluated exit costs beyond its units and the decision piece (the cascade's own
    per-exit work in ``predict``: the exit step, reading the state, the bookkeeping), from the
    ``every_exit`` piece timed on the same rounds: its whole predict minus what the cost model adds
    up for it, shared by its K - 1 intermediate exits (medians; 0 when not timed or not positive).
    The cost model charges it for every evaluated exit a frame passes without leaving; the plain
    model and a frame leaving at its first evaluated exit pass none."""
    k = num_exits
    if EVERY_EXIT not in stats or k < 2:
        return 0.0
    if fused:
        inside = sum(stats[exit_group_name(p, p)]["p50_ms"] for p in range(k))
    else:
        inside = sum(stats[segment_name(p)]["p50_ms"] + stats[head_name(p)]["p50_ms"] for p in range(k))
    modelled = overhead_ms + inside + k * stats["decision"]["p50_ms"]
    return max(0.0, (stats[EVERY_EXIT]["p50_ms"] - modelled) / (k - 1))


def overhead_from(stats: Mapping[str, dict], num_exits: int, fused: bool) -> float:
    """Per-frame cost outside the units, from `cost_pieces`' timings on the same rounds: the whole
    ``frame`` predict minus the pieces it ran (medians)."""
    k = num_exits
    if fused:
        inside = stats[exit_group_name(0, 0)]["p50_ms"]
    else:
        inside = sum(stats[segment_name(p)]["p50_ms"] for p in range(k)) + stats[head_name(k - 1)]["p50_ms"]
    return max(0.0, stats["frame"]["p50_ms"] - inside)


def verify(cascade, frames: np.ndarray, labels: np.ndarray, thresholds, keep_correct: bool = False) -> dict:
    """Run the real cascade frame by frame (the camera path, preprocessing included) with
    ``thresholds`` (a list or a CascadePlan), without changing ``cascade`` itself. ``keep_correct``:
    also return the per-frame correctness (for paired comparisons)."""
    return verify_together(cascade, frames, labels, [thresholds], keep_correct=keep_correct)[0]


def verify_together(
    cascade,
    frames: np.ndarray,
    labels: np.ndarray,
    plans: list,
    keep_correct: bool = False,
    block: int = 50,
    keep_frames: bool = False,
) -> list[dict]:
    """`verify` for several plans on the same moments (`predict_interleaved`). On a shared or
    throttling device the speed wanders by tens of percent over seconds (measured on this project's
    2-vCPU VM: ±30 %), so two plans timed one after the other compare two moments of the device, not
    two plans; interleaved, a speed-up is a speed-up. Accuracy and exits do not depend on the order.
    Each result also has ``block_ms``, the mean latency of every block of ``block`` frames, and with
    ``keep_frames`` every frame's latency and exit in order (``frame_ms``, ``frame_exit``: `quiet_share`)."""
    runs = predict_interleaved(cascade, frames, plans, block)
    out = []
    for preds in runs:
        lat = [p.latency_ms for p in preds]
        correct = [p.label == y for p, y in zip(preds, labels, strict=True)]
        v = _verified(lat, correct, [p.exit_index for p in preds], cascade.num_exits, keep_correct)
        # each block's mean: the blocks ran on the same moments for every plan, so a ratio of two plans'
        # blocks is free of the device's drift between blocks
        v["block_ms"] = [float(np.mean(lat[i : i + block])) for i in range(0, len(lat), block)]
        if keep_frames:
            v["frame_ms"], v["frame_exit"] = lat, [p.exit_index for p in preds]
        out.append(v)
    return out


def quiet_share(a: tuple, b: tuple, block: int = 50, resamples: int = 400, level: float = 0.9) -> tuple:
    """Plan a's quiet mean latency over plan b's (`quiet_mean_ms`), the two run interleaved on the same
    frames (``a``, ``b``: (latency_ms, exit_index) per frame, in frame order), and a ``level`` interval:
    the blocks of ``block`` frames resampled with replacement, the same blocks for both plans (a block
    is one moment of the device for both). Returns (ratio, low, high)."""
    (a_ms, a_exit), (b_ms, b_exit) = (tuple(np.asarray(x) for x in p) for p in (a, b))
    point = float(np.float64(quiet_mean_ms(a_ms, a_exit)) / quiet_mean_ms(b_ms, b_exit))  # 0 ms: inf, not a raise
    n = min(len(a_ms), len(b_ms))
    starts = np.arange(0, n, block)
    if len(starts) < 3:  # too few blocks to resample: no interval
        return point, point, point
    rng = np.random.default_rng(0)  # a fixed seed: the same runs give the same interval
    ratios = []
    for _ in range(resamples):
        pick = np.concatenate([np.arange(s0, min(s0 + block, n)) for s0 in rng.choice(starts, len(starts))])
        ratios.append(np.float64(quiet_mean_ms(a_ms[pick], a_exit[pick])) / quiet_mean_ms(b_ms[pick], b_exit[pick]))
    tail = 100 * (1 - level) / 2
    return point, percentile(ratios, tail), percentile(ratios, 100 - tail)


def quiet_mean_ms(latency_ms, exit_index) -> float:
    """A plan's mean latency on the quiet device, from frames run beside other work: per exit the
    frames left there, less those slowed to more than INTERRUPTED times that exit's first quartile (the
    OS ran something else meanwhile: not the plan's cost), weighted by the share of frames that exit
    took. Every frame leaving at one exit runs the same units, so their latencies sit together and
    other work only adds to them: the first quartile stands while up to three frames in four are hit. A
    preemption of a few milliseconds lands on a frame of a fraction of one, so a block mean hit by one
    moves by tens of percent, and a 50-frame block beside two busy processes is hit more often than not."""
    lat, exits = np.asarray(latency_ms, dtype=np.float64), np.asarray(exit_index)
    total = 0.0
    for e in np.unique(exits):
        at = lat[exits == e]
        calm = at[at <= INTERRUPTED * percentile(at, 25)]
        total += len(at) / len(lat) * float(calm.mean())
    return total


def predict_interleaved(cascade, frames, plans: list, block: int = 50, warmup: int = 0, progress=None) -> list[list]:
    """Every frame through every plan (a list or a CascadePlan each), one at a time (the camera path),
    without changing ``cascade``: the frames in blocks of ``block``, every plan running each block in
    turn, the order alternating per block, so that no plan always follows the same one and a drift of
    the device touches all alike. ``warmup``: frames each plan runs first, unrecorded (fused graphs,
    caches). ``progress(frames done)`` after each block. Returns each plan's Predictions in frame order."""
    views = [cascade.derive(p) for p in plans]
    runs: list[list] = [[] for _ in views]
    try:
        for v in views:
            for f in frames[:warmup]:
                v.predict(f)
        for start in range(0, len(frames), block):
            part = frames[start : start + block]
            order = range(len(views)) if (start // block) % 2 == 0 else range(len(views) - 1, -1, -1)
            for j in order:
                runs[j].extend(views[j].predict(f) for f in part)
            if progress is not None:
                progress(min(len(frames), start + block))
    finally:
        for v in views:
            v.close()
    return runs


def _verified(lat: list, correct: list, exits: list, num_exits: int, keep_correct: bool) -> dict:
    s = LatencyStats.from_samples(lat)
    counts = np.bincount(np.asarray(exits) - 1, minlength=num_exits)
    return {
        "accuracy": float(np.mean(correct)),
        "latency_ms": s.mean_ms,
        "mean_ms": s.mean_ms,
        "p50_ms": s.p50_ms,
        "p95_ms": s.p95_ms,
        "p99_ms": s.p99_ms,
        "samples": s.n,
        "exit_shares": (counts / len(exits)).tolist(),
        "exit_histogram": {str(k + 1): int(c) for k, c in enumerate(counts)},
        **({"correct": np.asarray(correct, bool)} if keep_correct else {}),
    }
