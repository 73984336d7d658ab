"""Backend-independent behaviour of `Cascade`, on a scripted runner whose every call is recorded.

Each "image" is one float, the sample's id; head k answers with the scripted logits of that sample
at exit k. So each test knows exactly what the cascade should do and sees what it did.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.runtime import Cascade, CascadeOptions
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.backends import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.plan import SKIP, CascadePlan, segment_groups
from edgeexit.runtime.policies import margin, softmax

K, C = 4, 3


class ScriptedRunner(Runner):
    thread_safe = True

    def __init__(self, logits: np.ndarray, fuses: bool = True, max_batch: int | None = None) -> None:
        self.logits = logits  # (N, K, C)
        self.calls: list[tuple] = []
        self.info = RunnerInfo(name="scripted", version="0", device="cpu", fuses=fuses, max_batch=max_batch)
        self.fuses = fuses

    def from_host(self, x):
        self.check_batch(len(x))
        self.calls.append(("from_host", len(x)))
        return (x.reshape(len(x)).astype(np.int64),)

    def run_segment(self, pos, state):
        self.calls.append(("segment", pos, len(state[0])))
        return state

    def run_segments(self, first_pos, last_pos, state, fuse=True):
        if not (self.fuses and fuse):
            return super().run_segments(first_pos, last_pos, state, fuse)
        self.calls.append(("fused", first_pos, last_pos))
        return state

    def run_head(self, pos, tap):
        self.calls.append(("head", pos, len(tap)))
        z = self.logits[tap, pos]
        return HeadOutput(softmax(z).max(axis=1), z)

    def take(self, state, rows):
        self.calls.append(("take", tuple(int(r) for r in rows)))
        return tuple(s[rows] for s in state)

    def synchronize(self):
        pass

    def close(self):
        self.calls.append(("close",))


def manifest(k: int = K, calibration: dict | None = None) -> Artifact:
    """The artifact a scripted runner stands for: ``k`` exits, ``C`` classes, 1x1 frames."""
    pre = {"in_chans": 1, "input_size": [1, 1], "mean": [0.0], "std": [1e-3]}  # ids up to 1000
    return Artifact.in_memory(k, [f"c{i}" for i in range(C)], pre, calibration)


def scripted_logits(n: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2.5, (n, K, C)).astype(np.float32)


def frame(i: int) -> np.ndarray:
    return np.full((1, 1, 1), float(i), np.float32)


def cascade(thresholds, logits=None, **kw) -> tuple[Cascade, ScriptedRunner]:
    runner = ScriptedRunner(scripted_logits() if logits is None else logits, **kw.pop("runner", {}))
    owns = kw.pop("owns_runner", False)
    return Cascade(manifest(), runner, thresholds, CascadeOptions(**kw), owns_runner=owns), runner


def expected(logits, thresholds, policy=None):
    conf = np.stack([(policy or (lambda z: softmax(z).max(1)))(logits[:, p]) for p in range(K)], 1)
    pos = CascadePlan.from_thresholds(thresholds).exit_positions(conf)
    labels = logits[np.arange(len(pos)), pos].argmax(1)
    return pos + 1, labels, conf[np.arange(len(pos)), pos]


def test_predict_follows_the_plan_sample_by_sample():
    th = [0.9, 0.7, 0.8, 0.0]
    c, _ = cascade(th)
    exits, labels, conf = expected(c.runner.logits, th)
    preds = [c.predict(frame(i)) for i in range(64)]
    assert [p.exit_index for p in preds] == list(exits)
    assert [p.label for p in preds] == list(labels)
    np.testing.assert_allclose([p.confidence for p in preds], conf, rtol=1e-6)
    assert len(set(exits)) >= 3


def test_a_skipped_exit_never_runs_its_head_even_if_it_would_be_confident():
    logits = scripted_logits()
    logits[:, 1] = [20.0, 0.0, 0.0]  # exit 2 certain about everything
    c, runner = cascade([0.99, SKIP, 0.99, 0.0], logits=logits)
    preds = [c.predict(frame(i)) for i in range(64)]
    assert all(p.exit_index != 2 for p in preds)
    assert not [call for call in runner.calls if call[:2] == ("head", 1)]
    # the same thresholds with exit 2 evaluated: it takes everything that reaches it
    c2, _ = cascade([0.99, 0.5, 0.99, 0.0], logits=logits)
    assert {p.exit_index for p in (c2.predict(frame(i)) for i in range(64))} <= {1, 2}


def test_the_confidence_policy_decides_the_exit():
    logits = scripted_logits()
    th = [0.6, 0.6, 0.6, 0.0]
    c, _ = cascade(th, policy="margin")
    exits, labels, conf = expected(logits, th, policy=margin)
    preds = [c.predict(frame(i)) for i in range(64)]
    assert [p.exit_index for p in preds] == list(exits)
    np.testing.assert_allclose([p.confidence for p in preds], conf, rtol=1e-6)
    max_softmax_exits, _, _ = expected(logits, th)
    assert list(exits) != list(max_softmax_exits)  # the policy really changes decisions here


def test_fusion_runs_each_group_as_one_call_and_off_runs_units_one_by_one():
    th = [0.9, SKIP, SKIP, 0.0]
    c, runner = cascade(th, logits=np.zeros((64, K, C), np.float32))  # nobody confident: all reach exit 4
    c.predict(frame(0))
    assert [call for call in runner.calls if call[0] in ("segment", "fused")] == [("segment", 0, 1), ("fused", 1, 3)]
    unfused, runner2 = cascade(th, logits=np.zeros((64, K, C), np.float32), fuse=False)
    unfused.predict(frame(0))
    assert [call[:2] for call in runner2.calls if call[0] in ("segment", "fused")] == [
        ("segment", 0),
        ("segment", 1),
        ("segment", 2),
        ("segment", 3),
    ]


def test_predict_batch_compacts_the_samples_still_running():
    th = [0.9, 0.8, 0.7, 0.0]
    c, runner = cascade(th)
    exits, labels, _ = expected(runner.logits, th)
    preds = c.predict_batch([frame(i) for i in range(64)])
    assert [p.exit_index for p in preds] == list(exits) and [p.label for p in preds] == list(labels)
    heads = [call for call in runner.calls if call[0] == "head"]
    reaching = [int((exits >= p + 1).sum()) for p in range(K)]
    assert [h[2] for h in heads] == reaching  # each head saw only the samples that reached it
    takes = [call[1] for call in runner.calls if call[0] == "take"]
    assert len(takes[0]) == reaching[1]


def test_batches_are_sliced_to_the_runners_max_batch():
    th = [0.9, 0.8, 0.7, 0.0]
    c, runner = cascade(th, runner={"max_batch": 5})
    exits, _, _ = expected(runner.logits, th)
    preds = c.predict_batch([frame(i) for i in range(23)])
    assert [p.exit_index for p in preds] == list(exits[:23])
    stats = c.exit_statistics(np.stack([frame(i) for i in range(23)]), batch_size=256)
    assert stats["confidence"].shape == (23, K)
    assert max(call[1] for call in runner.calls if call[0] == "from_host") == 5


def test_set_thresholds_swaps_one_plan_object():
    c, _ = cascade([0.9, 0.8, 0.7, 0.0])
    before = c.plan
    c.set_thresholds([SKIP, SKIP, SKIP, 0.0])
    assert c.plan is not before and c.plan == CascadePlan.full_model(K)
    assert before.thresholds == (0.9, 0.8, 0.7, 0.0)  # the old plan is untouched
    with pytest.raises(ValueError, match="one value per exit"):
        c.set_thresholds([0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        c.set_thresholds([0.5, float("nan"), 0.5, 0.0])


def test_derive_leaves_the_original_alone_and_does_not_close_the_runner():
    c, runner = cascade([0.9, 0.8, 0.7, 0.0], owns_runner=True)
    view = c.derive(CascadePlan.first_exit(K), fuse=False)
    assert {view.predict(frame(i)).exit_index for i in range(10)} == {1}
    assert c.plan.thresholds == (0.9, 0.8, 0.7, 0.0) and c.options.fuse
    view.close()
    assert ("close",) not in runner.calls
    c.close()
    assert ("close",) in runner.calls


def test_unit_timing_is_opt_in():
    c, _ = cascade([0.9, SKIP, SKIP, 0.0], logits=np.zeros((64, K, C), np.float32))
    assert c.predict(frame(0)).unit_latency_ms is None
    timed, _ = cascade([0.9, SKIP, SKIP, 0.0], logits=np.zeros((64, K, C), np.float32), unit_timing=True)
    assert set(timed.predict(frame(0)).unit_latency_ms) == {"seg_01", "head_01", "seg_02-04", "head_04"}


def test_plan_rules():
    plan = CascadePlan.from_thresholds([0.5, 1.5, 1.0, 0.3])
    assert plan.evaluated == (True, False, True, True) and plan.evaluated_exits == [1, 3, 4]
    assert plan.groups == segment_groups(plan.evaluated) == ((0, 0), (1, 2), (3, 3))
    assert plan.group_names == ("seg_01", "seg_02-03", "seg_04")
    assert plan.accepts(3, 0.0) and not plan.accepts(0, 0.49) and plan.accepts(2, 1.0)
    assert plan.to_list() == [0.5, SKIP, 1.0, 0.0]
    conf = np.array([[0.6, 1.0, 0.2, 0.1], [0.1, 1.0, 1.0, 0.1], [0.1, 1.0, 0.2, 0.0]])
    assert list(plan.exit_positions(conf)) == [0, 2, 3]  # exit 2 is skipped however confident
    assert CascadePlan.full_model(3).evaluated_exits == [3] and CascadePlan.first_exit(3).evaluated_exits == [1, 2, 3]


def test_a_runner_must_implement_the_protocol():
    class Half(Runner):
        def from_host(self, x):
            return (x,)

    with pytest.raises(TypeError):
        Half()
    with pytest.raises(TypeError, match="Runner"):
        Cascade(manifest(), object())


class SlowRunner(ScriptedRunner):
    """Every segment takes ``delay_s`` (the device's speed); nobody is confident anywhere."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(np.zeros((64, K, C), np.float32), fuses=False)
        self.delay_s = delay_s

    def run_segment(self, pos, state):
        import time

        time.sleep(self.delay_s)
        return state


def ladder_calibration() -> dict:
    rows = [  # exit 1 (1 segment), exit 2 (2 segments), the full model (4 segments); 1 ms per segment
        {"thresholds": [0.0, 0.0, 0.0, 0.0], "predicted_ms": 1.0, "predicted_accuracy": 0.80},
        {"thresholds": [SKIP, 0.0, 0.0, 0.0], "predicted_ms": 2.0, "predicted_accuracy": 0.85},
        {"thresholds": [SKIP, 0.0, 0.0, 0.0], "predicted_ms": 2.0, "predicted_accuracy": 0.85},
        {"thresholds": [SKIP, SKIP, SKIP, 0.0], "predicted_ms": 4.0, "predicted_accuracy": 0.90},
    ]
    return {"thresholds": [SKIP, SKIP, SKIP, 0.0], "ladder": rows}


def ladder_manifest(**calibration) -> Artifact:
    return manifest(calibration={**ladder_calibration(), **calibration})


class ClockRunner(SlowRunner):
    """SlowRunner on a simulated clock: every segment advances it by ``delay_s`` (no sleep, so a loaded
    machine cannot blur the device's speed), plus a little jitter as a real device has."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.now = 0.0
        self.rng = np.random.default_rng(0)

    def perf_counter(self) -> float:
        return self.now

    def run_segment(self, pos, state):
        self.now += self.delay_s * (1 + 0.03 * self.rng.standard_normal())
        return state


def test_the_budget_controller_moves_down_when_the_device_slows_and_back_up_when_it_recovers(monkeypatch):
    import types

    import edgeexit.runtime.cascade as cascade_module

    runner = ClockRunner(0.001)
    monkeypatch.setattr(cascade_module, "time", types.SimpleNamespace(perf_counter=runner.perf_counter))
    c = Cascade(ladder_manifest(), runner, options=CascadeOptions(budget_ms=2.8))
    assert len(c.controller.ladder) == 3 and c.plan.evaluated_exits[0] == 2  # start: best predicted to fit
    first_exits = {c.predict(frame(0)).exit_index for _ in range(200)}
    assert first_exits == {2}
    runner.delay_s = 0.002  # the device halves its speed: exit 2 now takes 4 ms > 2.8
    exits = [c.predict(frame(0)).exit_index for _ in range(100)]
    assert exits[-1] == 1 and c.controller.slowdown > 1.5
    assert exits.index(1) <= c.controller.window  # a step is answered within one window
    runner.delay_s = 0.001  # recovered: exit 2 fits again; the full model (4 ms) never
    exits = [c.predict(frame(0)).exit_index for _ in range(400)]
    assert exits[-1] == 2 and 4 not in exits
    assert exits.index(2) <= 3 * c.controller.window  # back after two agreeing windows (plus the mixed one)
    state = c.controller.state()
    assert state["switches"] == 2 and state["budget_ms"] == 2.8


def test_without_a_budget_nothing_moves_and_a_missing_ladder_is_an_error():
    from edgeexit.errors import ArtifactError

    c = Cascade(ladder_manifest(), SlowRunner(0.0))
    assert c.controller is None and c.plan == CascadePlan.full_model(K)
    m = manifest(calibration={"thresholds": [SKIP, SKIP, SKIP, 0.0]})
    with pytest.raises(ArtifactError, match="ladder"):
        Cascade(m, SlowRunner(0.0), options=CascadeOptions(budget_ms=2.0))
    with pytest.raises(ValueError, match="budget_ms"):
        Cascade(ladder_manifest(), SlowRunner(0.0), options=CascadeOptions(budget_ms=float("nan")))


def test_a_different_device_is_named_once_at_load():
    m = ladder_manifest(device={"backend": "scripted", "cpu": "Some Other CPU", "device": "cpu"})
    with pytest.warns(RuntimeWarning, match="cpu: calibrated 'Some Other CPU'"):
        c = Cascade(m, SlowRunner(0.0))
    assert any(change.startswith("cpu:") for change in c.fingerprint_changes)
