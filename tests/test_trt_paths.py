"""Defects of the GPU path shown on the SIMULATED TensorRT / CUDA of
tests/fake_gpu/, per API surface (8.6 / 10.x / 11.x), with engines built by the real
`build_engines`. A simulation: it checks edgeexit's logic and its use of the API, not TensorRT."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from fake_gpu import FakeEngine, add_engines, install

from edgeexit.errors import UserError
from edgeexit.runtime import Cascade

pytestmark = pytest.mark.sim  # the simulated TensorRT/CUDA (tests/fake_gpu/)

SURFACES = ["8.6.1", "10.3.0", "11.4.0"]
TH = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]


def _units(artifact):
    return json.loads((artifact / "manifest.json").read_text())["units"]


def _qdq_zero_points(path):
    """(node, zero-point dtype, all zero) for every QuantizeLinear/DequantizeLinear of ``path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            out.append((node.name, "absent (uint8 by the ONNX default)", False))
            continue
        zp = init[node.input[2]]
        out.append((node.name, str(zp.dtype), bool((zp == 0).all())))
    return out


def _save_units(artifact, units):
    m = json.loads((artifact / "manifest.json").read_text())
    m["units"] = units
    (artifact / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def int8_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact with both INT8 flavours (calibrated on 64 random images: the zero-point
    layout does not depend on the data)."""
    import shutil

    from edgeexit.export.quantize import quantize_units

    dst = tmp_path_factory.mktemp("int8") / "a.edgeexit"
    shutil.copytree(tiny_artifact, dst)
    images = np.random.default_rng(0).normal(size=(64, 1, 28, 28)).astype(np.float32)
    units, _ = quantize_units(dst, _units(dst), images)
    _save_units(dst, [u.to_json(dst) for u in units])
    return dst


def test_trt_int8_flavour_has_only_int8_zero_points_equal_to_0(int8_artifact):
    """TensorRT's ONNX parser takes only unquantized biases: read every Q/DQ of every onnx_int8_trt file."""
    checked = 0
    for u in _units(int8_artifact):
        if u["kind"] != "segment":
            continue
        zps = _qdq_zero_points(int8_artifact / u["onnx_int8_trt"])
        assert zps and all(dtype == "int8" and zero for _, dtype, zero in zps), (u["name"], zps[:3])
        checked += len(zps)
        ort = _qdq_zero_points(int8_artifact / u["onnx_int8"])  # the U8S8 flavour ONNX Runtime keeps
        assert any(dtype == "uint8" for _, dtype, _ in ort)
    print(f"onnx_int8_trt: {checked} Q/DQ nodes, zero points all int8 and 0")
    assert checked > 20


@pytest.mark.parametrize("version", SURFACES)
def test_the_parser_refuses_ort_u8s8_qdq_as_tensorrts_does(monkeypatch, int8_artifact, version):
    trt, _ = install(monkeypatch, version=version)
    seg = next(u for u in _units(int8_artifact) if u["kind"] == "segment")
    parser = trt.OnnxParser(trt.Builder(None).create_network(0), None)
    assert not parser.parse_from_file(str(int8_artifact / seg["onnx_int8"]))
    assert "INT8" in parser.get_error(0) or "zero point" in parser.get_error(0)
    assert parser.parse_from_file(str(int8_artifact / seg["onnx_int8_trt"]))


@pytest.mark.parametrize("version", SURFACES)
def test_int8_engines_are_built_from_the_trt_flavour_and_run(
    monkeypatch, int8_artifact, tmp_path, test_frames, version
):
    import shutil

    art = tmp_path / "a.edgeexit"
    shutil.copytree(int8_artifact, art)
    trt, _ = install(monkeypatch, version=version)
    add_engines(art, precision="int8")
    sources = {src for src, _, _ in trt.built}
    assert all(".int8trt." in s for s in sources if s.startswith("seg_"))
    typed = int(version.split(".")[0]) >= 10
    for src, _, flags in trt.built:  # 8.6: flags on segments only, heads stay FP32
        assert flags == ([] if typed or src.startswith("head_") else ["FP16", "INT8"])
    frames, _ = test_frames
    c = Cascade.load(art, backend="tensorrt", precision="int8", thresholds=TH)
    ref = Cascade.load(art, backend="onnxruntime", thresholds=TH, fuse=False)
    ours = [p.label for p in c.predict_batch(frames[:64])]
    assert c.backend_info["precision"] == "int8"
    assert np.mean([a == b.label for a, b in zip(ours, ref.predict_batch(frames[:64]), strict=True)]) > 0.8


@pytest.mark.parametrize("version", SURFACES)
def test_network_flags_come_from_the_enum(monkeypatch, artifact_copy, version):
    """STRONGLY_TYPED is 1 on 10.x and 0 on 11 (read, never hard-coded); EXPLICIT_BATCH only on 8.6."""
    trt, _ = install(monkeypatch, version=version)
    add_engines(artifact_copy)
    flags = {f for _, f, _ in trt.built}
    ndf = trt.NetworkDefinitionCreationFlag
    expected = 1 << int(ndf.STRONGLY_TYPED) if version[0] != "8" else 1 << int(ndf.EXPLICIT_BATCH)
    assert flags == {expected} and expected == {"8.6.1": 1, "10.3.0": 2, "11.4.0": 1}[version]


@pytest.mark.parametrize("version", SURFACES)
def test_half_builds_fp16_units_when_strongly_typed_and_fp16_flag_on_86(
    monkeypatch, artifact_copy, test_frames, version
):
    from edgeexit.export.onnx_units import fp16_parity, write_fp16_units

    units = write_fp16_units(artifact_copy, _units(artifact_copy))
    _save_units(artifact_copy, [u.to_json(artifact_copy) for u in units])
    frames, _ = test_frames
    c0 = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=TH, fuse=False)
    images = c0.preprocessor.batch(frames[:128])
    par = fp16_parity(artifact_copy, units, images)
    assert par["max_abs_logit_diff"] < 0.05 and par["min_prediction_agreement"] >= 0.97
    trt, _ = install(monkeypatch, version=version)
    add_engines(artifact_copy, precision="fp16")
    typed = version[0] != "8"
    for src, _, flags in trt.built:
        if src.startswith("seg_"):
            assert (".fp16." in src) == typed and flags == ([] if typed else ["FP16"])
    c = Cascade.load(artifact_copy, backend="tensorrt", precision="fp16", thresholds=TH)
    got = [p.label for p in c.predict_batch(frames[:128])]
    ref = [p.label for p in c0.predict_batch(frames[:128])]
    assert np.mean(np.array(got) == np.array(ref)) >= 0.97


def test_an_old_timing_cache_from_another_tensorrt_is_not_fed_to_the_builder(monkeypatch, artifact_copy):
    """Another TensorRT's timing cache: re-export after a TensorRT change (the recovery path the error
    message prescribes)."""
    from edgeexit.export.tensorrt import build_engines

    install(monkeypatch, version="10.3.0")
    add_engines(artifact_copy)
    assert (artifact_copy / "timing.cache.json").is_file()
    install(monkeypatch, version="11.4.0")
    units = [{**u, "engines": []} for u in _units(artifact_copy)]
    units = build_engines(
        artifact_copy, units, half=False, max_batch=64, workspace_gib=1, timing_cache=artifact_copy / "timing.cache"
    )
    assert units[0].engines[0].info["trt_version"] == "11.4.0"


def test_a_refused_timing_cache_is_replaced_by_an_empty_one(monkeypatch, artifact_copy, caplog):
    from edgeexit.export.tensorrt import build_engines

    install(monkeypatch, version="10.3.0")
    add_engines(artifact_copy)
    (artifact_copy / "timing.cache").write_bytes(b"from another GPU")  # meta still says this TRT+GPU
    units = [{**u, "engines": []} for u in _units(artifact_copy)]
    units = build_engines(
        artifact_copy, units, half=False, max_batch=64, workspace_gib=1, timing_cache=artifact_copy / "timing.cache"
    )
    assert "refused the previous timing cache" in caplog.text and units[-1].engines


@pytest.mark.parametrize("version", SURFACES)
def test_a_context_tensorrt_cannot_create_is_an_error_at_load_and_no_graph_in_capture(
    monkeypatch, artifact_copy, test_frames, version
):
    """create_execution_context* returning None is an error that says so."""
    trt, cudart = install(monkeypatch, version=version)
    add_engines(artifact_copy)
    name = "create_execution_context" if version[0] != "8" else "create_execution_context_without_device_memory"
    real = getattr(FakeEngine, name)
    monkeypatch.setattr(FakeEngine, name, lambda self, *a: None)
    with pytest.raises(RuntimeError, match="could not create an execution context"):
        Cascade.load(artifact_copy, backend="tensorrt")
    monkeypatch.setattr(FakeEngine, name, real)
    c = Cascade.load(artifact_copy, backend="tensorrt", thresholds=TH)
    monkeypatch.setattr(FakeEngine, name, lambda self, *a: None)
    frames, _ = test_frames
    ref = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=TH, fuse=False)
    assert [p.label for p in c.predict_batch(frames[:33])] == [p.label for p in ref.predict_batch(frames[:33])]
    stats = c.runner.graph_stats()
    assert not stats.count and ("seg_01", 64) in stats.failed


@pytest.mark.parametrize("version", SURFACES)
def test_every_context_shares_one_activation_buffer(monkeypatch, artifact_copy, test_frames, version):
    """Many graphs, one activation allocation (units run serially on one stream); no context holds memory of its own."""
    trt, cudart = install(monkeypatch, version=version)
    add_engines(artifact_copy)
    frames, _ = test_frames
    c = Cascade.load(artifact_copy, backend="tensorrt", thresholds=TH)
    for n in (1, 2, 3, 5, 9, 17, 33, 64):
        c.predict_batch(frames[:n])
    r = c.runner
    stats = r.graph_stats()
    assert stats.count > 16 and cudart.device_in_use == 0  # no static per-context memory
    assert all(ctx.memory == "user" and ctx.device_ptr == r._activations.ptr for ctx in r._res.contexts)
    assert len({b for _, b in stats.captured}) <= 7  # batch buckets: 1, 2, 4, ..., 64


def test_static_contexts_would_run_the_device_out_of_memory(monkeypatch, artifact_copy):
    """The simulation's per-context memory and OOM (why contexts share one buffer): TensorRT then returns None."""
    trt, cudart = install(monkeypatch, version="10.3.0")
    add_engines(artifact_copy)
    eng = trt.Runtime(None).deserialize_cuda_engine((artifact_copy / "seg_01.fp32.engine").read_bytes())
    cudart.device_capacity = eng.activation_bytes * 3
    ctxs = [eng.create_execution_context() for _ in range(3)]
    assert all(ctxs) and eng.create_execution_context() is None


@pytest.mark.parametrize("what", ["dtype", "profile", "names"])
def test_an_engine_whose_io_is_not_the_manifests_is_refused(monkeypatch, artifact_copy, what):
    """An engine's names, FP32 and the profile max are checked at load."""
    trt, _ = install(monkeypatch, version="11.4.0")
    add_engines(artifact_copy, max_batch=32 if what == "profile" else 64)
    m = json.loads((artifact_copy / "manifest.json").read_text())
    if what == "profile":
        for u in m["units"]:
            u["engines"][0]["batch_profile"]["max"] = 64
    if what == "names":
        m["units"][0]["outputs"][0]["name"] = "feat_99"
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    if what == "dtype":
        real = FakeEngine.__init__

        def half_io(self, trt_, plan):
            real(self, trt_, plan)
            self.dtypes[self.input_names[0]] = trt_.DataType.HALF

        monkeypatch.setattr(FakeEngine, "__init__", half_io)
    # a manifest whose own wiring is broken is refused at load (re-export); engines that do not
    # match a sound manifest are rebuilt on the device
    with pytest.raises(UserError, match="re-export the model" if what == "names" else "edgeexit engines ARTIFACT"):
        Cascade.load(artifact_copy, backend="tensorrt")


def test_86_contexts_after_the_first_have_no_profile_until_set(monkeypatch, artifact_copy):
    """TensorRT 8.6 contexts after the first have no profile, the rule the simulation models
    (NvInferRuntime.h v8.6.1:2790-2797)."""
    trt, cudart = install(monkeypatch, version="8.6.1")
    add_engines(artifact_copy)
    eng = trt.Runtime(None).deserialize_cuda_engine((artifact_copy / "head_01.fp32.engine").read_bytes())
    first, second = eng.create_execution_context(), eng.create_execution_context()
    assert first.profile == 0 and second.profile == -1
    assert not second.set_input_shape(eng.input_names[0], (1, *eng.profiles[eng.input_names[0]][0][1:]))
    stream = cudart.cudaStreamCreate()[1]
    assert second.set_optimization_profile_async(0, stream) and second.profile == 0


def test_a_driver_older_than_cuda_python_is_named_with_the_fix(monkeypatch, artifact_copy):
    """cuda-python 13 on a CUDA 12 driver: a named fix, not cudaErrorInsufficientDriver later."""
    trt, cudart = install(monkeypatch, version="10.3.0")
    add_engines(artifact_copy)
    cudart.driver_version, cudart.runtime_version = 12020, 13000
    with pytest.raises(UserError, match=r"driver supports CUDA 12\.2.*cuda-python<13"):
        Cascade.load(artifact_copy, backend="tensorrt")
    c = Cascade.load(artifact_copy, backend="auto")
    assert c.runner.info.name == "onnxruntime-cpu" and "cuda-python<13" in c.backend_info["why"]


def test_tensorrt_11_refuses_nothing_edgeexit_needs(monkeypatch, artifact_copy, test_frames):
    trt, _ = install(monkeypatch, version="11.4.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    add_engines(artifact_copy)
    c = Cascade.load(artifact_copy, backend="auto", thresholds=TH)
    assert c.runner.info.name == "tensorrt" and c.backend_info["version"] == "11.4.0"
    assert len(c.predict_batch(test_frames[0][:5])) == 5


def test_onnxruntime_cuda_that_fell_back_to_the_cpu_is_refused(monkeypatch, artifact_copy):
    """An onnxruntime whose CUDA EP cannot load runs on the CPU; edgeexit says so."""
    from edgeexit.runtime.backends import onnxruntime as ortb

    monkeypatch.setattr(ortb, "cuda_provider_available", lambda: True)
    with pytest.raises(UserError, match="fell back to the CPU"):
        Cascade.load(artifact_copy, backend="onnxruntime-cuda")


def test_the_simulation_is_labelled_as_one():
    import fake_gpu

    assert "SIMULATED" in fake_gpu.__doc__ and "SIMULATED" in fake_gpu.make_tensorrt.__doc__
    assert "tensorrt" not in sys.modules or getattr(sys.modules["tensorrt"], "cudart", None) is None


@pytest.mark.parametrize("version", SURFACES)
def test_export_format_engine_half_runs_the_engines_before_publishing(monkeypatch, tiny_run, tmp_path, version):
    """Engines run on parity images before the artifact is published (TensorRT 11 too): the real
    `edgeexit export --format engine --half`, against each surface."""
    from edgeexit.export.exporter import export_checkpoint

    trt, _ = install(monkeypatch, version=version)
    dest = tmp_path / "trt.edgeexit"
    m, _ = export_checkpoint(
        tiny_run[0] / "model.pt", out=dest, format="engine", half=True, batch=16, parity_images=256, calib_images=0
    )
    assert all(u["engines"][0]["precision"] == "fp16" for u in m["units"])
    assert m["fp16"]["max_abs_logit_diff"] < 0.05
    ep = m["engine_parity"]  # every exit, CUDA graphs off and on, against FP32 on 256 held-out images
    assert ep["passed"] and ep["frames"] == 256 and set(ep["runs"]) == {"plain", "graphs"}
    assert all(len(r["exits"]) == 8 and r["frames"] == 256 for r in ep["runs"].values())
    assert ep["min_prediction_agreement"] >= 0.95
    assert ep["max_abs_confidence_diff"] <= ep["tolerance"]["max_abs_confidence"]
    typed = version[0] != "8"
    assert all((".fp16." in src) == typed for src, _, _ in trt.built if src.startswith("seg_"))
