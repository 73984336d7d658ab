"""edgeexit.runtime.latency: the one percentile and latency summary every report and the controller use."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgeexit.runtime.controller import BudgetController, Rung
from edgeexit.runtime.latency import LatencyStats, percentile, run_summary


def test_p95_interpolates_between_ranks_as_numpy_does():
    # 1..10 ms: rank (10 - 1) * 0.95 = 8.55 lies between 9 and 10 ms; nearest-rank would say 10
    assert percentile(range(1, 11), 95) == pytest.approx(9.55)
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 1001):
        x = rng.lognormal(0.0, 0.5, n)
        for q in (50, 95, 99):
            assert percentile(x.tolist(), q) == pytest.approx(float(np.percentile(x, q)), rel=1e-12)


def test_latency_stats_of_known_samples():
    s = LatencyStats.from_samples([4.0, 1.0, 3.0, 2.0])
    assert (s.n, s.mean_ms, s.p50_ms, s.max_ms) == (4, 2.5, 2.5, 4.0)
    assert s.p95_ms == pytest.approx(3.85)  # rank 3 * 0.95 = 2.85: 3 + 0.85 * (4 - 3)
    assert s.p99_ms == pytest.approx(3.97)
    assert s.to_dict() == {"n": 4, "mean_ms": 2.5, "p50_ms": 2.5, "p95_ms": s.p95_ms, "p99_ms": s.p99_ms, "max_ms": 4.0}
    with pytest.raises(ValueError, match="at least one sample"):
        LatencyStats.from_samples([])
    with pytest.raises(ValueError, match="at least one sample"):
        percentile([], 95)


def test_run_summary_is_none_without_samples_and_the_stats_otherwise():
    assert run_summary([]) == {"mean": None, "p50": None, "p95": None, "max": None}
    assert run_summary(np.array([])) == {"mean": None, "p50": None, "p95": None, "max": None}
    out = run_summary([1.0, 2.0, 3.0, 10.0])
    assert out == {"mean": 4.0, "p50": 2.5, "p95": pytest.approx(8.95), "max": 10.0}


def test_the_p95_controller_judges_a_window_by_the_same_p95():
    rungs = [Rung(f"plan{i}", c, 0.8 + 0.02 * i, calibrated=(i == 1)) for i, c in enumerate((10.0, 20.0, 40.0))]
    ctl = BudgetController(rungs, 30.0, window=20, metric="p95", measured_ms=20.0, noise=0.03)
    for ms in range(1, 21):
        ctl.observe(float(ms))
    # 1..20 ms: the interpolated p95 is 19.05 ms (nearest-rank: 19)
    assert ctl.windows == 1 and ctl.window_ms == pytest.approx(19.05)


def test_no_other_percentile_is_computed_in_the_package():
    """np.percentile / np.median appear only in runtime/latency.py, so there is one definition."""
    root = Path(__file__).resolve().parents[1] / "edgeexit"
    found = [
        f"{path.relative_to(root)}:{i}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "latency.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\b(np|numpy)\.(percentile|nanpercentile|median|nanmedian)\(|ceil\(0\.95", line)
    ]
    assert found == []
