"""The ladder's plans timed for real (a calibrate stage; it runs the cascade through the runtime's
`predict_interleaved`): every rung, the chosen plan and the full model, frame by frame, interleaved
in blocks on the same frames. `measure_ladder` returns a frozen `LadderMeasurement`; calibrate/run.py
writes its numbers into the report, where the runtime's budget controller reads them back as each
rung's quiet latency (runtime/controller.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard

from edgeexit.runtime.latency import LatencyStats
from edgeexit.runtime.plan import CascadePlan
from edgeexit.runtime.profiling import predict_interleaved


@dataclass(frozen=True)
class PlanTiming:
    """One plan's frames of the interleaved run, on some scale: mean and p95 latency, the frames
    behind them, and the mean latency per exit position taken (None where no frame left there)."""

    mean_ms: float
    p95_ms: float
    frames: int
    exit_ms: tuple[float | None, ...]

    def latency(self) -> dict:
        """``{mean_ms, p95_ms, frames}``: a ladder row's ``measured`` in the manifest."""
        return {"mean_ms": self.mean_ms, "p95_ms": self.p95_ms, "frames": self.frames}


@dataclass(frozen=True)
class LadderMeasurement:
    """What `measure_ladder` timed. ``rungs`` (in the order given) and ``reference`` (the chosen plan;
    its ``frames`` are the frames pooled) are on the reference scale: the interleaved run's speed times
    ``scale``. ``interleaved`` is the chosen plan as the interleaved run timed it, ``full_mean_ms`` the
    full model on the same moments. ``block_sd``: the relative block-to-block sd of the chosen plan's
    slowdown over blocks of ``block_frames`` (the noise of calibration conditions; None with one block)."""

    rungs: tuple[PlanTiming, ...]
    reference: PlanTiming
    interleaved: PlanTiming
    full_mean_ms: float
    scale: float
    block_frames: int
    block_sd: float | None

    @property
    def speedup(self) -> float:
        """The full model's mean latency over the chosen plan's, the two run on the same moments."""
        return self.full_mean_ms / self.interleaved.mean_ms


def measure_ladder(
    cascade,
    frames,
    chosen: Sequence[float],
    rungs: Sequence[Sequence[float]],
    verified: Mapping,
    max_frames: int = 600,
    block: int = 50,
    progress: Callable[[int], None] | None = None,
) -> LadderMeasurement:
    """Run every rung (thresholds), the ``chosen`` plan and the full model for real, frame by frame (the
    camera path), on up to ``max_frames`` of ``frames``, interleaved in blocks so that the device's drift
    during calibration touches all of them alike (on a shared or throttling device the speed wanders by
    tens of percent over seconds: plans timed one after the other are compared across moments).

    The scale: the interleaved run's speed pooled with the verification run's (``verified``: the chosen
    plan's ``mean_ms``, ``samples`` and ``exit_shares``; frame-weighted, compared through the exit mix),
    because both are samples of one wandering device; relative costs come from the interleaved run
    alone. The result is the budget controller's quiet reference. ``cascade`` is not changed."""
    k = cascade.num_exits
    frames = frames[: max(1, min(len(frames), max_frames))]
    plans = [list(chosen), CascadePlan.full_model(k)] + [list(r) for r in rungs]
    runs = predict_interleaved(cascade, frames, plans, block, warmup=10, progress=progress)
    lat = [[p.latency_ms for p in preds] for preds in runs]
    exits = [[p.exit_index - 1 for p in preds] for preds in runs]

    def timing(j: int, scale: float = 1.0) -> PlanTiming:
        s = LatencyStats.from_samples(lat[j])
        per = []
        for pos in range(k):
            xs = [t for t, e in zip(lat[j], exits[j], strict=True) if e == pos]
            per.append(scale * sum(xs) / len(xs) if xs else None)
        return PlanTiming(scale * s.mean_ms, scale * s.p95_ms, s.n, tuple(per))

    own = timing(0)
    scale, pooled = _pooled_scale(verified, own.exit_ms, len(lat[0]))
    ref = timing(0, scale)
    return LadderMeasurement(
        rungs=tuple(timing(j, scale) for j in range(2, len(plans))),
        reference=PlanTiming(ref.mean_ms, ref.p95_ms, pooled, ref.exit_ms),
        interleaved=own,
        full_mean_ms=timing(1).mean_ms,
        scale=scale,
        block_frames=block,
        block_sd=_block_sd(lat[0], [own.exit_ms[e] for e in exits[0]], block),
    )


def _block_sd(lat: list, expected: list, block: int) -> float | None:
    """The relative sd, block to block, of a plan's slowdown: each block's latency over what its frames'
    exits cost on average (None with fewer than two blocks)."""
    ratios = []
    for s in range(0, len(lat), block):
        num, den = sum(lat[s : s + block]), sum(expected[s : s + block])
        if den > 0:
            ratios.append(num / den)
    if len(ratios) < 2:
        return None
    m = sum(ratios) / len(ratios)
    return math.sqrt(sum((r - m) ** 2 for r in ratios) / (len(ratios) - 1)) / m


def _pooled_scale(verified: Mapping, exit_ms: Sequence[float | None], frames: int) -> tuple[float, int]:
    """The factor from the interleaved run's speed to the speed of both runs of the chosen plan
    pooled (frame-weighted): the verification run met other moments of the device. Its speed relative
    to the interleaved run is its mean latency over what its exit mix costs at the interleaved run's
    per-exit latencies. Returns (factor, frames pooled); (1, ``frames``) when the verification run
    cannot be compared (no mix, an exit unseen)."""
    mean, n, shares = verified.get("mean_ms"), verified.get("samples"), verified.get("exit_shares")
    if not (_positive(mean) and _positive(n) and isinstance(shares, list) and len(shares) == len(exit_ms)):
        return 1.0, frames
    if any(_positive(sh) and exit_ms[e] is None for e, sh in enumerate(shares)):
        return 1.0, frames
    expected = sum(sh * (exit_ms[e] or 0.0) for e, sh in enumerate(shares) if _positive(sh))
    if not expected > 0:
        return 1.0, frames
    n = int(n)
    return (n * (mean / expected) + frames) / (n + frames), n + frames


def _positive(x) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0
