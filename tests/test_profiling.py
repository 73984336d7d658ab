"""runtime.profiling.verify_together: plans compared on the same moments of a drifting device."""

from __future__ import annotations

import types

import numpy as np
import pytest
from test_cascade_logic import SKIP, ClockRunner, frame, ladder_manifest

from edgeexit.runtime import Cascade
from edgeexit.runtime.profiling import verify, verify_together


class SlowingRunner(ClockRunner):
    """A device that gets steadily slower: every segment costs more than the one before (throttling)."""

    def run_segment(self, pos, state):
        self.delay_s *= 1.002
        return super().run_segment(pos, state)


def test_interleaved_plans_see_the_same_device_where_one_after_the_other_do_not(monkeypatch):
    import edgeexit.runtime.cascade as cascade_module

    full, first_two = [SKIP, SKIP, SKIP, 0.0], [SKIP, 0.0, 0.0, 0.0]  # 4 segments vs 2: a true 2x
    frames, labels = np.stack([frame(i % 64) for i in range(200)]), np.zeros(200, np.int64)

    def fresh():
        runner = SlowingRunner(0.001)
        monkeypatch.setattr(cascade_module, "time", types.SimpleNamespace(perf_counter=runner.perf_counter))
        return Cascade(ladder_manifest(), runner)

    c = fresh()
    seq = [verify(c, frames, labels, th) for th in (first_two, full)]  # the full model runs later: slower
    c = fresh()
    together = verify_together(c, frames, labels, [first_two, full], block=10)
    assert seq[1]["mean_ms"] / seq[0]["mean_ms"] > 2.5  # a speed-up the device's drift made up
    assert together[1]["mean_ms"] / together[0]["mean_ms"] == pytest.approx(2.0, rel=0.1)
    for a, b in zip(seq, together, strict=True):  # accuracy and exits do not depend on the order
        assert a["accuracy"] == b["accuracy"] and a["exit_histogram"] == b["exit_histogram"]
        assert b["samples"] == 200
    assert not c.closed  # the cascade itself stays open (only the views are closed)
