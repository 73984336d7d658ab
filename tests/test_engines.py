"""`edgeexit engines`, the engine gate's comparator, and what `auto` does with TensorRT that cannot run
the artifact, on the SIMULATED TensorRT / CUDA of tests/fake_gpu/ (checks edgeexit's logic, not
TensorRT) plus the comparator's statistics on plain numbers."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from fake_gpu import add_engines, install
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.errors import UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.compare import TOLERANCES, Tolerance, clopper_pearson, compare_exits

TH = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]


def _units(artifact):
    return json.loads((artifact / "manifest.json").read_text())["units"]


def _save_units(artifact, units):
    m = json.loads((artifact / "manifest.json").read_text())
    m["units"] = units
    (artifact / "manifest.json").write_text(json.dumps(m))


def _with_fp16(artifact):
    from edgeexit.export.onnx_units import write_fp16_units

    units = write_fp16_units(artifact, _units(artifact))
    _save_units(artifact, [u.to_json(artifact) for u in units])
    return artifact


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


# -- the comparator's statistics --------------------------------------------------------------------
def _binom_tail(k, n, p):
    """P(X >= k), X ~ Binomial(n, p), summed independently of compare.py (over i < k: small terms)."""
    return 1 - sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k))


@pytest.mark.parametrize(("k", "n"), [(0, 600), (3, 256), (10, 600), (37, 5000)])
def test_clopper_pearson_bounds_meet_their_definition(k, n):
    lo, hi = clopper_pearson(k, n)
    assert lo <= k / n <= hi
    if k:  # P(X >= k | lower) = 5 %: a larger true rate would make k this rare
        assert _binom_tail(k, n, lo) == pytest.approx(0.05, abs=1e-6)
    assert 1 - _binom_tail(k + 1, n, hi) == pytest.approx(0.05, abs=1e-6)  # P(X <= k | upper) = 5 %
    if k == 0:
        assert hi == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-6)  # 600 frames vouch for 0.50 % at most


class _TableRunner(Runner):
    """A runner whose exits answer from fixed tables (confidence, logits) per image index."""

    def __init__(self, conf, logits, name):
        self.conf, self.logits = conf, logits
        self.info = RunnerInfo(name=name, version="0", device="cpu", max_batch=None)

    def from_host(self, x):
        return (x[:, 0, 0, 0].astype(int),)

    def run_segment(self, pos, state):
        return state

    def run_head(self, pos, tap):
        return HeadOutput(self.conf[tap, pos], self.logits[pos][tap])

    def take(self, state, rows):
        return tuple(s[rows] for s in state)

    def synchronize(self):
        pass

    def close(self):
        pass


def _tables(n, k, seed=0):
    rng = np.random.default_rng(seed)
    logits = [rng.normal(size=(n, 10)).astype(np.float32) for _ in range(k)]
    conf = np.stack([np.exp(z).max(1) / np.exp(z).sum(1) for z in logits], 1)
    return conf, logits


def test_the_comparator_judges_confidence_and_agreement_exit_by_exit():
    n, k = 600, 3
    images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    conf, logits = _tables(n, k)
    ref = _TableRunner(conf, logits, "ref")
    same = compare_exits(ref, _TableRunner(conf.copy(), logits, "same"), images, num_exits=k)
    assert same.passed and same.frames == n and all(e.disagreements == 0 for e in same.exits)
    assert same.exits[0].disagreement_upper == pytest.approx(0.004980, abs=1e-5)
    shifted = conf.copy()
    shifted[7, 1] += 0.01  # one frame's confidence at exit 2 moves by 0.01 > the fp32 bound 0.005
    c = compare_exits(ref, _TableRunner(shifted, logits, "c"), images, num_exits=k)
    assert not c.passed and c.failures == ("exit 2: max |Δconfidence| 0.01 > 0.005",)
    flipped = [z.copy() for z in logits]
    rows = np.arange(2)  # 2 flips in 600 (0.33 %): no evidence of more than 0.5 %: passes
    flipped[2][rows] = -logits[2][rows]
    assert compare_exits(ref, _TableRunner(conf, flipped, "f"), images, num_exits=k).passed
    rows = np.arange(12)  # 12 flips in 600: at least 1.1 % at 95 %: fails
    flipped[2][rows] = -logits[2][rows]
    c = compare_exits(ref, _TableRunner(conf, flipped, "f"), images, num_exits=k)
    assert [f.split(":")[0] for f in c.failures] == ["exit 3"] and c.exits[2].disagreements == 12
    assert c.exits[2].disagreement_lower > TOLERANCES["fp32"].max_disagreement
    with pytest.raises(ValueError, match="at least 100 frames"):
        compare_exits(ref, ref, images[:50], num_exits=k)


# -- edgeexit engines on the simulation -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.sim
@pytest.mark.parametrize("version", ["8.6.1", "10.0.1", "10.3.0", "11.4.0"])
def test_engines_builds_gates_and_publishes_with_tf32_visible(monkeypatch, artifact_copy, test_frames, version):
    trt, _ = install(monkeypatch, version=version, tf32=True)
    before = {p.name for p in artifact_copy.iterdir()}
    r = _cli("engines", artifact_copy)
    assert r.exit_code == 0, r.output
    m = json.loads((artifact_copy / "manifest.json").read_text())
    gate = m["engine_parity"]
    assert gate["passed"] and gate["frames"] == 600 and set(gate["runs"]) == {"plain", "graphs"}
    # TF32 rounding makes FP32 engines differ from ONNX Runtime FP32, inside the fp32 tolerance
    assert 0 < gate["max_abs_confidence_diff"] <= TOLERANCES["fp32"].max_abs_confidence
    new = {p.name for p in artifact_copy.iterdir()} - before
    assert new == {f"{u['name']}.fp32.engine" for u in m["units"]} | {"timing.cache", "timing.cache.json"}
    frames, _ = test_frames
    c = Cascade.load(artifact_copy, backend="auto", thresholds=TH)
    assert c.runner.info.name == "tensorrt" and len(c.predict_batch(frames[:40])) == 40


@pytest.mark.sim
def test_engines_refuses_what_it_cannot_build_with_one_line(monkeypatch, artifact_copy):
    install(monkeypatch, version="10.3.0")
    manifest = (artifact_copy / "manifest.json").read_bytes()
    r = _cli("engines", artifact_copy, "--half")
    assert r.exit_code == 2 and "no onnx_fp16 files" in r.output and "edgeexit export MODEL.pt --half" in r.output
    r = _cli("engines", artifact_copy, "--half", "--int8")
    assert r.exit_code == 2 and "one precision each" in r.output
    r = _cli("engines", artifact_copy, "--max-batch", "0")
    assert r.exit_code == 2 and "--max-batch" in r.output
    r = _cli("engines", artifact_copy.parent / "nothing.edgeexit")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert (artifact_copy / "manifest.json").read_bytes() == manifest


@pytest.mark.sim
def test_engines_that_fail_the_gate_are_not_published(monkeypatch, artifact_copy):
    import edgeexit.runtime.compare as compare

    install(monkeypatch, version="10.3.0", tf32=True)
    monkeypatch.setitem(compare.TOLERANCES, "fp32", Tolerance(max_abs_confidence=1e-9, max_disagreement=0.005))
    before = {p.name: p.stat().st_mtime_ns for p in artifact_copy.iterdir()}
    r = _cli("engines", artifact_copy)
    assert r.exit_code == 1 and "beyond tolerance" in r.output and "not published" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in artifact_copy.iterdir()} == before  # nothing left behind


@pytest.mark.slow
@pytest.mark.sim
def test_86_half_keeps_heads_fp32_and_the_simulation_shows_why(monkeypatch, artifact_copy, test_frames):
    """Heads built with the FP16 flag put every confidence on FP16's grid (spacing 2^-11 near 1.0);
    `edgeexit engines --half` on 8.6 sets the flags on segments only."""
    from dataclasses import replace

    import edgeexit.export.tensorrt as build
    from edgeexit.runtime.artifact import parse_units
    from edgeexit.runtime.backends.tensorrt import TensorRTBackend
    from edgeexit.runtime.chain import chain_outputs

    _with_fp16(artifact_copy)
    trt, _ = install(monkeypatch, version="8.6.1")
    assert _cli("engines", artifact_copy, "--half").exit_code == 0
    flags = {src.split(".")[0]: f for src, _, f in trt.built}
    assert all(f == ([] if name.startswith("head_") else ["FP16"]) for name, f in flags.items())
    frames, _ = test_frames
    images = Cascade.load(artifact_copy, backend="onnxruntime").preprocessor.batch(frames[:200])

    def on_fp16_grid(units) -> float:
        with TensorRTBackend.for_units(artifact_copy, parse_units(artifact_copy, units), "fp16") as b:
            conf = chain_outputs(b, images, 8)["confidence"]
        return float(np.mean(conf.astype(np.float16).astype(np.float64) == conf))

    units = _units(artifact_copy)
    assert on_fp16_grid(units) < 0.2  # FP32 heads: confidences are FP32 values
    as_segments = [replace(u, kind="segment", engines=()) for u in parse_units(artifact_copy, units)]
    flagged = build.build_engines(artifact_copy, as_segments, half=True, max_batch=64, workspace_gib=1.0)
    flagged = [replace(u, kind="head" if u.name.startswith("head_") else "segment") for u in flagged]
    assert on_fp16_grid(flagged) == 1.0  # every unit built with the FP16 flag


# -- auto meets TensorRT that cannot run the artifact -----------------------------------------------
@pytest.mark.slow
@pytest.mark.sim
def test_auto_falls_back_to_onnx_units_on_stale_engines_and_tensorrt_stays_strict(
    monkeypatch, artifact_copy, test_frames
):
    install(monkeypatch, version="10.3.0")
    add_engines(artifact_copy)
    install(monkeypatch, version="11.4.0")  # a JetPack upgrade: the plans are 10.3's
    frames, _ = test_frames
    c = Cascade.load(artifact_copy, backend="auto", thresholds=TH)
    why = c.backend_info["why"]
    assert c.runner.info.name == "onnxruntime-cpu" and "TensorRT 10.3.0 but this is TensorRT 11.4.0" in why
    assert "edgeexit engines" in why and "\n" not in why
    assert len(c.predict_batch(frames[:20])) == 20
    with pytest.raises(UserError, match=r"TensorRT 10\.3\.0 but this is TensorRT 11\.4\.0.*`edgeexit engines "):
        Cascade.load(artifact_copy, backend="tensorrt", thresholds=TH)
    r = _cli("engines", artifact_copy)  # stale plans are rebuilt without --force
    assert r.exit_code == 0, r.output
    assert Cascade.load(artifact_copy, backend="auto", thresholds=TH).runner.info.name == "tensorrt"


@pytest.mark.sim
@pytest.mark.parametrize("metadata", [True, False])
def test_a_cuda13_tensorrt_on_an_older_driver_is_unusable_with_the_reason(monkeypatch, artifact_copy, metadata):
    """tensorrt 11.x from PyPI is the CUDA 13 build; on a driver < 580 its Runtime cannot be made.
    Known from the wheel's distribution name (metadata), or from the Runtime construction itself
    (JetPack's apt package has no distribution name)."""
    import importlib.metadata as md

    from edgeexit.doctor import tensorrt_info
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends import tensorrt as backend

    install(monkeypatch, version="11.4.0")
    add_engines(artifact_copy)
    trt, cudart = install(monkeypatch, version="11.4.0")
    trt.cuda_major, cudart.driver_version = 13, 12080
    dists = {"tensorrt": ["tensorrt"], "tensorrt_bindings": ["tensorrt_cu13_bindings"]} if metadata else {}
    monkeypatch.setattr(md, "packages_distributions", lambda: dists)
    ok, why = backend.tensorrt_usable(Artifact.load(artifact_copy))
    expect = "CUDA 13 build (tensorrt-cu13)" if metadata else "cannot start here"
    assert not ok and expect in why
    c = Cascade.load(artifact_copy, backend="auto", thresholds=TH)
    assert c.runner.info.name == "onnxruntime-cpu" and expect in c.backend_info["why"]
    with pytest.raises(UserError, match=re.escape(expect)):  # not a bare pybind11 TypeError
        Cascade.load(artifact_copy, backend="tensorrt", thresholds=TH)
    info = tensorrt_info({"venv": False}, {"jetson": False})
    assert info["usable"] is False and expect in info["why"]


def test_the_cuda_major_is_read_from_whole_distribution_names():
    from edgeexit.runtime.backends.tensorrt import cuda_major_of

    assert cuda_major_of(["tensorrt-cu13-bindings"]) == 13
    assert cuda_major_of(["tensorrt_cu12_libs"]) == 12
    assert cuda_major_of(["tensorrt-cu12"]) == 12
    assert cuda_major_of(["tensorrt", "not-tensorrt-cu13"]) is None


# -- stricter simulation rules -----------------------------------------------------------------------
@pytest.mark.sim
def test_the_simulation_refuses_unaligned_addresses_and_86_profile_failures_raise(monkeypatch, artifact_copy):
    from edgeexit.runtime.backends.cuda import DeviceBuffer

    trt, cudart = install(monkeypatch, version="8.6.1")
    add_engines(artifact_copy)
    plan = (artifact_copy / "head_01.fp32.engine").read_bytes()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    buf = DeviceBuffer(1 << 16)
    name = engine.get_tensor_name(0)
    assert ctx.set_input_shape(name, (1, *engine.get_tensor_profile_shape(name, 0)[0][1:]))
    assert ctx.set_tensor_address(name, buf.ptr) and not ctx.set_tensor_address(name, buf.ptr + 4)
    with pytest.raises(RuntimeError):
        engine.create_execution_context().set_optimization_profile_async(1, 0)
    buf.close()


@pytest.mark.sim
@pytest.mark.slow
def test_batch_work_keeps_every_unit_and_bucket_on_the_graph_path(monkeypatch, artifact_copy, test_frames):
    """16 units x 7 buckets x 2 input addresses can be captured: past the former fixed cap of 64
    graphs, batch work no longer falls back to plain runs with a shape change per call."""
    install(monkeypatch, version="10.3.0")
    add_engines(artifact_copy)
    frames, _ = test_frames
    c = Cascade.load(artifact_copy, backend="tensorrt", thresholds=TH)
    start = 0
    for size in (64, 33, 17, 9, 5, 3, 2, 1, 64, 40, 20, 7):
        c.predict_batch(frames[start : start + size])
        start += size
    stats = c.runner.graph_stats()
    assert stats.capacity == 16 * 7 * 2
    assert 64 < stats.count <= stats.capacity and not stats.failed


def test_onnx_runtime_refusals_name_where_fp16_and_int8_run(artifact_copy, monkeypatch):
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends import onnxruntime as ortb

    with pytest.raises(UserError, match=r"fp16 runs on TensorRT only, and auto cannot use it here \(the artifact"):
        Cascade.load(artifact_copy, backend="auto", precision="fp16")
    monkeypatch.setattr(ortb, "cuda_provider_available", lambda: True)
    with pytest.raises(UserError, match="onnxruntime-cuda does not accelerate INT8"):
        ortb.OnnxRuntimeBackend(Artifact.load(artifact_copy), precision="int8", cuda=True)
