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


class BusyDevice:
    """A simulated clock on a device shared with other work: every call advances time by its own cost
    times the device's slowdown at that moment. ``bursts``: (period, busy) in ms of simulated time, the
    device running ``factor`` times slower during the first ``busy`` ms of every ``period``;
    ``spikes``: every n-th call is interrupted for ``spike_ms`` more (the OS ran something else)."""

    def __init__(self, bursts=None, factor=3.0, spike_every=0, spike_ms=0.0):
        self.t, self.bursts, self.factor = 0.0, bursts, factor
        self.spike_every, self.spike_ms, self.calls = spike_every, spike_ms, 0

    def perf_counter(self) -> float:
        return self.t / 1e3

    def process_time(self) -> float:
        return self.t / 1e3

    def piece(self, cost_ms: float):
        def call():
            slow = 1.0
            if self.bursts is not None and self.t % self.bursts[0] < self.bursts[1]:
                slow = self.factor
            self.calls += 1
            spike = self.spike_ms if self.spike_every and self.calls % self.spike_every == 0 else 0.0
            self.t += cost_ms * slow + spike

        return call


def _profile(monkeypatch, device, costs, rounds=60):
    import edgeexit.runtime.profiling as profiling

    monkeypatch.setattr(profiling, "time", types.SimpleNamespace(perf_counter=device.perf_counter,
                                                                  process_time=device.process_time))  # fmt: skip
    calls = {name: device.piece(ms) for name, ms in costs.items()}
    return profiling.profile_rounds(calls, lambda: None, rounds, per_round=4, warmup=0)


def test_interleaved_rounds_keep_the_quiet_costs_and_ratios_where_pieces_timed_one_after_another_do_not(
    monkeypatch,
):
    """Bursts of load (3x slower for 60 of every 100 ms) hit the pieces timed one after another
    unevenly, so their ratio is off; timed in interleaved rounds, the quiet third of the rounds gives
    each piece's quiet cost and so the true ratio, and the load is reported as a slowdown."""
    import edgeexit.runtime.profiling as profiling

    costs = {"seg": 0.5, "head": 0.1, "full": 2.0}
    device = BusyDevice(bursts=(100.0, 60.0))
    monkeypatch.setattr(profiling, "time", types.SimpleNamespace(perf_counter=device.perf_counter))
    one_by_one = {n: profiling.time_call(device.piece(ms), lambda: None, 40, 0.0, 0, 40) for n, ms in costs.items()}
    p = _profile(monkeypatch, BusyDevice(bursts=(100.0, 60.0)), costs)
    assert abs(one_by_one["full"]["mean_ms"] / one_by_one["seg"]["mean_ms"] / 4 - 1) > 0.2  # the ratio is off
    for name, ms in costs.items():
        assert p.stats[name]["mean_ms"] == pytest.approx(ms, rel=0.05)
        assert p.stats[name]["p95_ms"] == pytest.approx(ms, rel=0.05)
    assert p.stats["full"]["mean_ms"] / p.stats["seg"]["mean_ms"] == pytest.approx(4.0, rel=0.05)
    assert p.load["rounds"] == 60 and p.load["quiet_rounds"] == 20
    assert p.load["slowdown"] > 1.05  # a typical round ran in a burst part of the time


def test_a_quiet_device_reports_no_load_and_interrupted_calls_are_not_a_pieces_cost(monkeypatch):
    quiet = _profile(monkeypatch, BusyDevice(), {"a": 1.0, "b": 0.25})
    assert quiet.load["slowdown"] == pytest.approx(1.0) and quiet.load["quiet_error"] == pytest.approx(0.0)
    assert quiet.load["interrupted_share"] == 0 and quiet.load["cpu_share"] == pytest.approx(1.0)
    # every 7th call interrupted for 5 ms: the interruptions are counted, not charged to the pieces
    spiky = _profile(monkeypatch, BusyDevice(spike_every=7, spike_ms=5.0), {"a": 1.0, "b": 0.25})
    assert spiky.stats["a"]["mean_ms"] == pytest.approx(1.0) and spiky.stats["b"]["mean_ms"] == pytest.approx(0.25)
    assert spiky.load["interrupted_share"] == pytest.approx(1 / 7, abs=0.01)


def test_pooled_profiles_summarise_every_round_of_both(monkeypatch):
    a = _profile(monkeypatch, BusyDevice(bursts=(50.0, 45.0), factor=2.0), {"a": 1.0, "b": 0.5}, rounds=12)
    b = _profile(monkeypatch, BusyDevice(), {"a": 1.0, "b": 0.5}, rounds=12)
    both = a.pooled(b)
    assert both.load["rounds"] == 24 and both.load["quiet_rounds"] == 8
    assert both.load["seconds"] == pytest.approx(a.load["seconds"] + b.load["seconds"], abs=1e-3)
    # the second, quiet profile's rounds are the quiet ones: the costs are the quiet costs
    assert both.stats["a"]["mean_ms"] == pytest.approx(1.0) and both.stats["b"]["mean_ms"] == pytest.approx(0.5)
    assert a.stats["a"]["mean_ms"] > 1.5  # the first alone saw the device slow nearly all the time


def test_the_exit_step_is_what_a_whole_predict_costs_beyond_its_pieces():
    """The every-exit predict, timed on the same rounds as the pieces, costs K - 1 exit steps more than
    the pieces add up to; the cost model charges one per evaluated exit a frame passes, so it predicts
    both timed plans (the plain model and every exit) exactly, and leaving early passes fewer."""
    from edgeexit.calibrate.optimizer import CostModel
    from edgeexit.runtime.plan import head_name, segment_name
    from edgeexit.runtime.profiling import EVERY_EXIT, exit_step_from

    k, seg, head, decision, overhead, step = 4, 1.0, 0.2, 0.01, 0.3, 0.05
    units = {n: {"p50_ms": v} for p in range(k) for n, v in ((segment_name(p), seg), (head_name(p), head))}
    stats = {**units, "decision": {"p50_ms": decision}}
    every = overhead + k * (seg + head + decision) + (k - 1) * step
    assert exit_step_from(stats, k, False, overhead) == 0.0  # not timed: no correction
    stats[EVERY_EXIT] = {"p50_ms": every}
    e = exit_step_from(stats, k, False, overhead)
    assert e == pytest.approx(step)
    cost = CostModel.from_timings(k, units, "p50_ms", decision, overhead, None, e)
    assert cost.all_exits_ms() == pytest.approx(every)
    assert cost.full_ms() == pytest.approx(overhead + k * seg + head + decision)  # the plain model: unchanged
    assert cost.min_ms() == pytest.approx(overhead + seg + head + decision)  # leaving at exit 1: no step
    every_exit = np.ones(k, bool)
    assert np.diff(cost.exit_costs(every_exit)) == pytest.approx([seg + head + decision + step] * (k - 1))
    stats[EVERY_EXIT] = {"p50_ms": every - k * step}  # faster than its pieces (noise): no negative step
    assert exit_step_from(stats, k, False, overhead) == 0.0
    assert exit_step_from(stats, 1, False, overhead) == 0.0  # one exit: no intermediate step to charge
