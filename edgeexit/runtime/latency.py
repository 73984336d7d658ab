"""One latency summary and one percentile for every number edgeexit reports or compares (numpy only).

A percentile interpolates linearly between the two closest ranks: ``np.percentile``'s default
(method "linear", Hyndman and Fan's type 7). The p95 of 1, 2, ..., 10 ms is 9.55 ms, where the
nearest-rank rule says 10 ms: on the 64 frames of a controller window, or a short run, the two
rules differ by up to one whole gap between samples, so a budget held on one definition and
reported on another would disagree. Profiling, `run`, `Streams`, the budget controller,
calibration and the optimiser's p95 constraint all call `percentile` or `LatencyStats` here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def percentile(samples_ms, q: float) -> float:
    """The ``q``-th percentile (0 to 100) of ``samples_ms``, interpolated linearly between ranks."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("a percentile needs at least one sample")
    return float(np.percentile(a, q))


def percentile_along(samples_ms, q: float, axis: int) -> np.ndarray:
    """`percentile` of ``samples_ms`` along ``axis`` (the median of each round: ``q=50, axis=-1``)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("a percentile needs at least one sample")
    return np.percentile(a, q, axis=axis)


@dataclass(frozen=True)
class LatencyStats:
    """``n`` latencies summarised: mean, p50, p95, p99 and max, in milliseconds."""

    n: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_samples(cls, samples_ms) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=np.float64).ravel()
        if a.size == 0:
            raise ValueError("latency statistics need at least one sample")
        p50, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
        return cls(int(a.size), float(a.mean()), p50, p95, p99, float(a.max()))

    def to_dict(self) -> dict:
        return asdict(self)


def run_summary(samples_ms) -> dict:
    """``{"mean", "p50", "p95", "max"}`` in ms, each None when there is no sample: the form of the
    ``run`` command's summary and ``--json`` (one stream or many)."""
    if len(samples_ms) == 0:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    s = LatencyStats.from_samples(samples_ms)
    return {"mean": s.mean_ms, "p50": s.p50_ms, "p95": s.p95_ms, "max": s.max_ms}
