"""`Cascade`'s construction: typed options (`CascadeOptions`, per-backend options), who closes the
runner (Polygraphy's rule), views, and the calibration services in runtime/profiling.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_cascade_logic import K, ScriptedRunner, SlowRunner, frame, ladder_manifest, manifest, scripted_logits

from edgeexit.runtime import Cascade, CascadeOptions, OnnxRuntimeOptions, TensorRTOptions, TorchOptions, profiling
from edgeexit.runtime.backends import backend_options, create_backend
from edgeexit.runtime.cascade import CascadeClosedError
from edgeexit.runtime.plan import SKIP, CascadePlan
from edgeexit.runtime.policies import margin

TH = [0.9, SKIP, 0.8, 0.0]


# -- CascadeOptions -------------------------------------------------------------------------------
def test_options_are_frozen_checked_at_construction_and_replaced_not_mutated():
    o = CascadeOptions(budget_ms=np.int64(5), fuse=0)
    assert o.budget_ms == 5.0 and type(o.budget_ms) is float and o.fuse is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.fuse = True
    p = o.replace(input_order="BGR")
    assert (p.input_order, o.input_order, p.budget_ms) == ("BGR", "RGB", 5.0)
    for bad, match in (
        ({"budget_ms": True}, "budget_ms must be a positive number"),
        ({"budget_ms": float("nan")}, "budget_ms must be a positive number"),
        ({"budget_ms": -1}, "budget_ms must be a positive number"),
        ({"budget_ms": "5"}, "budget_ms must be a positive number"),
        ({"input_order": "rgb"}, "input_order must be RGB or BGR"),
        ({"policy": "softest"}, "unknown confidence policy 'softest'"),
        ({"budget_window": 1}, "budget_window must be a whole number of frames >= 2"),
        ({"budget_window": 2.5}, "budget_window"),
    ):
        with pytest.raises(ValueError, match=match):
            CascadeOptions(**bad)


def test_a_cascade_takes_one_options_object_and_an_artifact():
    typed = Cascade(manifest(), ScriptedRunner(scripted_logits()), TH, CascadeOptions(unit_timing=True, fuse=False))
    assert typed.options == CascadeOptions(policy="max_softmax", unit_timing=True, fuse=False)
    assert "seg_01" in typed.predict(frame(3)).unit_latency_ms  # unfused: each unit timed by its name
    with pytest.raises(TypeError, match="unit_timing"):
        Cascade(manifest(), ScriptedRunner(scripted_logits()), TH, unit_timing=True)  # the field, not a keyword
    with pytest.raises(TypeError, match="options must be a CascadeOptions"):
        Cascade(manifest(), ScriptedRunner(scripted_logits()), TH, {"fuse": False})
    with pytest.raises(TypeError, match="must be an Artifact"):
        Cascade({"units": [], "class_names": ["a"]}, ScriptedRunner(scripted_logits()), TH)


def test_a_view_is_built_from_the_options_of_its_parent():
    c = Cascade(manifest(), ScriptedRunner(scripted_logits()), TH, CascadeOptions(policy="margin", unit_timing=True))
    view = c.derive(CascadePlan.first_exit(K), fuse=False, input_order="BGR")
    assert view.options == c.options.replace(fuse=False, input_order="BGR")
    assert c.options.fuse and c.options.input_order == "RGB"  # the parent is untouched
    assert view.runner is c.runner and view.num_exits == K and view.class_names == c.class_names
    p = view.predict(frame(7))
    z = scripted_logits()[7, 0]
    assert p.exit_index == 1 and p.confidence == pytest.approx(float(margin(z[None])[0]), rel=1e-6)
    assert set(p.unit_latency_ms) == {"seg_01", "head_01"}  # unit timing is inherited


# -- ownership ------------------------------------------------------------------------------------
def test_a_runner_handed_in_stays_the_callers_unless_owns_runner():
    lent = ScriptedRunner(scripted_logits())
    c = Cascade(manifest(), lent, TH)
    assert not c.owns_runner
    c.close()
    assert ("close",) not in lent.calls and c.closed
    with pytest.raises(CascadeClosedError):
        c.predict(frame(0))
    again = Cascade(manifest(), lent, TH)  # still usable by its owner
    fresh = Cascade(manifest(), ScriptedRunner(scripted_logits()), TH)
    for i in range(20):
        p, q = again.predict(frame(i)), fresh.predict(frame(i))
        assert (p.label, p.exit_index) == (q.label, q.exit_index)

    given = ScriptedRunner(scripted_logits())
    owner = Cascade(manifest(), given, TH, owns_runner=True)
    view = owner.derive([0.0] * K)
    assert owner.owns_runner and not view.owns_runner
    view.close()
    assert ("close",) not in given.calls
    owner.close()
    owner.close()  # twice is harmless
    assert given.calls.count(("close",)) == 1 and view.closed


def test_a_failing_constructor_closes_the_runner_only_when_it_owns_it():
    from edgeexit.errors import ArtifactError

    m = manifest(calibration={"thresholds": [SKIP, SKIP, SKIP, 0.0]})  # no ladder: budget_ms must fail
    for owns in (False, True):
        runner = ScriptedRunner(scripted_logits())
        with pytest.raises(ArtifactError, match="ladder"):
            Cascade(m, runner, options=CascadeOptions(budget_ms=2.0), owns_runner=owns)
        assert (("close",) in runner.calls) is owns


def test_load_owns_its_runner_and_a_borrowed_runner_outlives_the_borrower(tiny_artifact, test_frames):
    frames, _ = test_frames
    th = [0.8] * 8
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=th)
    closes = []
    real_close = c.runner.close
    c.runner.close = lambda: (closes.append(1), real_close())  # count the calls into the real runner
    assert c.owns_runner
    borrower = Cascade(c.artifact, c.runner, th)  # the Polygraphy rule: the loaded cascade lends its runner
    want = [(p.label, p.exit_index) for p in c.predict_batch(frames[:64])]
    assert len({e for _, e in want}) >= 2
    assert [(p.label, p.exit_index) for p in borrower.predict_batch(frames[:64])] == want
    borrower.close()
    assert closes == [] and borrower.closed and not c.closed
    assert [(p.label, p.exit_index) for p in c.predict_batch(frames[:64])] == want  # the runner still runs
    c.derive([0.5] * 8).close()
    assert closes == []
    c.close()
    assert closes == [1]
    with pytest.raises(CascadeClosedError):
        c.predict(frames[0])


# -- the budget controller and views ---------------------------------------------------------------
def test_a_view_without_thresholds_follows_the_controller_it_feeds():
    runner = SlowRunner(0.001)
    c = Cascade(ladder_manifest(), runner, options=CascadeOptions(budget_ms=2.8))
    assert c.plan is c.controller.plan and c.plan.evaluated_exits[0] == 2  # _controller's initial plan
    view = c.derive(fuse=False)  # e.g. `run` deriving a view for a source's channel order
    own = c.derive([SKIP, SKIP, SKIP, 0.0])
    assert view.controller is c.controller and own.controller is None and own.options.budget_ms is None
    runner.delay_s = 0.003  # the device slows down: exit 2 (two segments) takes 6 ms > 2.8
    exits = [view.predict(frame(0)).exit_index for _ in range(120)]
    assert c.controller.switches >= 1 and exits[-1] == 1
    assert view.plan is c.plan is c.controller.plan  # the view runs what the controller chose
    assert own.plan == CascadePlan.from_thresholds([SKIP, SKIP, SKIP, 0.0])  # a view of its own stays


def test_the_controller_window_is_an_option():
    assert Cascade(ladder_manifest(), SlowRunner(0.0), options=CascadeOptions(budget_ms=2.8)).controller.window == 64
    c = Cascade(ladder_manifest(), SlowRunner(0.0), options=CascadeOptions(budget_ms=2.8, budget_window=np.int64(8)))
    assert c.controller.window == 8 and c.options.budget_window == 8


# -- typed backend options ------------------------------------------------------------------------
def test_backend_options_are_typed_per_backend():
    assert backend_options("onnxruntime-cpu") == OnnxRuntimeOptions()
    assert backend_options("onnxruntime-cuda", threads=None).threads is None
    torch_opts = backend_options("torch", TorchOptions(max_graphs=8), device="cpu")
    assert torch_opts == TorchOptions(device="cpu", max_graphs=8)
    assert TensorRTOptions(cuda_graphs=False).constructor_kwargs() == {"cuda_graphs": False}  # precision: default
    assert OnnxRuntimeOptions(precision="int8").constructor_kwargs()["precision"] == "int8"
    with pytest.raises(TypeError, match="the tensorrt backend has no option threads"):
        backend_options("tensorrt", threads=2)
    with pytest.raises(TypeError, match="backend torch takes TorchOptions, got OnnxRuntimeOptions"):
        backend_options("torch", OnnxRuntimeOptions())


def test_load_takes_typed_backend_options_or_the_same_keywords(artifact_copy, test_frames):
    frames, _ = test_frames
    th = [0.9, 2.0, 2.0, 0.8, 2.0, 0.7, 2.0, 0.0]
    typed = Cascade.load(artifact_copy, "onnxruntime", th, backend_options=OnnxRuntimeOptions(io_binding=True))
    by_kw = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th, io_binding=True, fuse=False)
    plain = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th, options=CascadeOptions(fuse=False))
    assert typed.runner.io_binding and by_kw.runner.io_binding and not plain.runner.io_binding
    assert not by_kw.options.fuse and typed.options.fuse
    a, b, c = ([(p.label, p.exit_index) for p in x.predict_batch(frames[:200])] for x in (typed, by_kw, plain))
    assert a == b == c and len({e for _, e in a}) >= 3
    with pytest.raises(TypeError, match="the onnxruntime-cpu backend has no option cuda_graphs"):
        Cascade.load(artifact_copy, backend="onnxruntime", cuda_graphs=False)
    with pytest.raises(TypeError, match="backend onnxruntime-cpu takes OnnxRuntimeOptions"):
        Cascade.load(artifact_copy, backend="onnxruntime", backend_options=TensorRTOptions())


def test_load_refuses_bad_options_before_opening_anything(tmp_path):
    missing = tmp_path / "nothing.edgeexit"  # never read: the options fail first
    with pytest.raises(TypeError, match="unknown option polcy"):
        Cascade.load(missing, polcy="margin")
    with pytest.raises(ValueError, match="budget_ms must be a positive number"):
        Cascade.load(missing, budget_ms=True)


def test_create_backend_takes_the_typed_options(artifact_copy):
    from edgeexit.runtime.artifact import Artifact

    runner = create_backend(Artifact.load(artifact_copy), "onnxruntime", OnnxRuntimeOptions(io_binding=True))
    try:
        assert runner.io_binding and runner.info.name == "onnxruntime-cpu"
    finally:
        runner.close()


# -- calibration services: functions over a runner and a plan -------------------------------------
def test_exit_statistics_and_profile_are_functions_over_a_runner_and_a_plan(tiny_artifact, fashion_test):
    from conftest import normalised

    x = normalised(fashion_test, 40)
    c = Cascade.load(tiny_artifact, backend="onnxruntime", policy="margin")
    direct = profiling.exit_statistics(c.runner, c.plan, x, batch_size=16)
    stats = c.exit_statistics(x, batch_size=16)
    assert stats["confidence"].shape == (40, 8)
    np.testing.assert_array_equal(stats["prediction"], direct["prediction"])
    assert not np.allclose(stats["confidence"], direct["confidence"])  # the method uses the cascade's policy
    with_policy = profiling.exit_statistics(c.runner, c.plan, x, c.confidence, batch_size=16)
    np.testing.assert_allclose(stats["confidence"], with_policy["confidence"], atol=1e-6)
    assert 0.0 <= stats["confidence"].min() and stats["confidence"].max() <= 1.0
    prof = profiling.profile_units(c.runner, c.plan, x[0], repeats=3, min_seconds=0.0)
    assert set(prof["units"]) == {u.name for u in c.artifact.units}
    assert all(v["repeats"] == 3 and v["p50_ms"] > 0 for v in prof["units"].values())
    assert set(c.profile(x[0], repeats=3, min_seconds=0.0)["units"]) == set(prof["units"])
    assert profiling.chunk_size(c.runner, 10_000) == Cascade.CHUNK and profiling.chunk_size(c.runner, 16) == 16


def test_unit_latency_tables_are_checked(tiny_artifact, test_frames):
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[2.0] * 7 + [0.0])
    names = [u.name for u in c.artifact.units]
    table = profiling.unit_latency_table(c.plan, {n: 1.0 + i for i, n in enumerate(names)})
    assert table.segment_ms[:2] == (1.0, 3.0) and table.head_ms[:2] == (2.0, 4.0) and len(table.head_ms) == 8
    with pytest.raises(ValueError, match="lack head_08"):
        c.set_unit_latency({n: 1.0 for n in names[:-1]})
    for bad in (float("nan"), -1.0, "fast", None):
        with pytest.raises(ValueError, match="unit latency of seg_01 must be a finite number"):
            c.set_unit_latency({n: (bad if n == "seg_01" else 1.0) for n in names})
    c.set_unit_latency({n: 0.0 for n in names})
    assert c.predict(test_frames[0][0], deadline_ms=50).exit_index == 8  # nothing is too slow
