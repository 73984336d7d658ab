"""A GPU's rules in the SIMULATED CUDA / TensorRT of tests/fake_gpu/, and edgeexit's TensorRT
backend held to them (the rules each test names are in the docstrings of tests/fake_gpu/).

A simulation, not a GPU: the first tests show that each rule is enforced (so a breach in edgeexit
would fail a test); the rest run the real `TensorRTBackend` through `Cascade` under those rules,
per simulated API surface (8.6 / 10.x / 11.x) where the TensorRT calls differ.
"""

from __future__ import annotations

import ctypes
import shutil
import threading

import numpy as np
import pytest
from fake_gpu import DEVICE_BASE, CudaError, FakeCudart, add_engines, install

from edgeexit.runtime import Cascade

pytestmark = pytest.mark.sim  # the simulated TensorRT/CUDA (tests/fake_gpu/)

SURFACES = ["8.6.1", "10.3.0", "11.4.0"]
TH = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]
OK = CudaError.cudaSuccess


@pytest.fixture(scope="module")
def built(tiny_artifact, tmp_path_factory):
    """The tiny artifact with engines built by the real `build_engines`, once per surface."""
    out = {}
    for version in SURFACES:
        dst = tmp_path_factory.mktemp("engines") / f"v{version}.edgeexit"
        shutil.copytree(tiny_artifact, dst)
        with pytest.MonkeyPatch.context() as mp:
            install(mp, version=version)
            add_engines(dst)
        out[version] = dst
    return out


@pytest.fixture(scope="module")
def reference(tiny_artifact, test_frames):
    frames, _ = test_frames
    ort = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=TH, fuse=False)
    return [(p.label, p.exit_index) for p in ort.predict_batch(frames[:200])]


def _load(built, monkeypatch, version="10.3.0", integrated=False, **kw):
    trt, cudart = install(monkeypatch, version=version)
    cudart.integrated = integrated
    return Cascade.load(built[version], backend="tensorrt", thresholds=TH, **kw), trt, cudart


@pytest.mark.parametrize("backend", ["tensorrt", "auto"])
def test_a_tensorrt_load_reads_and_checks_the_manifest_once(built, monkeypatch, backend):
    """auto asks whether the engines run here and the backend opens them: both from the one parse."""
    from test_cascade import manifest_reads

    install(monkeypatch, version="10.3.0")
    calls = manifest_reads(monkeypatch)
    with Cascade.load(built["10.3.0"], backend=backend, thresholds=TH) as c:
        assert c.runner.info.name == "tensorrt"
    assert calls == ["read", "build"]


def _pairs(preds):
    return [(p.label, p.exit_index) for p in preds]


def _stream(rt, flags=1):
    return rt.cudaStreamCreateWithFlags(flags)[1]


# -- the rules themselves (the fake alone) ----------------------------------------------------------
def test_s1_work_runs_at_the_sync_and_a_host_read_before_it_is_stale():
    rt = FakeCudart()
    s = _stream(rt)
    dev = rt.cudaMalloc(16)[1]
    src, dst = rt.cudaMallocHost(16)[1], rt.cudaMallocHost(16)[1]
    ctypes.memmove(src, np.arange(4, dtype=np.float32).ctypes.data, 16)
    k = rt.cudaMemcpyKind
    assert rt.cudaMemcpyAsync(dev, src, 16, k.cudaMemcpyHostToDevice, s)[0] == OK
    assert rt.cudaMemcpyAsync(dst, dev, 16, k.cudaMemcpyDeviceToHost, s)[0] == OK
    view = np.frombuffer(ctypes.string_at(dst, 16), np.float32)
    assert rt.pending() == 2 and not view.any()  # queued, not done: the host sees stale memory
    rt.cudaStreamSynchronize(s)
    assert np.array_equal(np.frombuffer(ctypes.string_at(dst, 16), np.float32), np.arange(4))
    # a pinned source rewritten before the copy ran: the new bytes are what arrives (the reuse hazard)
    rt.cudaMemcpyAsync(dev, src, 16, k.cudaMemcpyHostToDevice, s)
    ctypes.memmove(src, np.full(4, 7, np.float32).ctypes.data, 16)
    rt.cudaMemcpyAsync(dst, dev, 16, k.cudaMemcpyDeviceToHost, s)
    rt.cudaStreamSynchronize(s)
    assert np.array_equal(np.frombuffer(ctypes.string_at(dst, 16), np.float32), np.full(4, 7))


def test_s1_pageable_copies_are_synchronous_as_cuda_documents():
    rt = FakeCudart()
    s = _stream(rt)
    dev = rt.cudaMalloc(16)[1]
    x, back = np.arange(4, dtype=np.float32), np.zeros(4, np.float32)
    k = rt.cudaMemcpyKind
    rt.cudaMemcpyAsync(dev, x.ctypes.data, 16, k.cudaMemcpyHostToDevice, s)
    x[:] = -1  # staged at the call: the upload keeps the old values
    rt.cudaMemcpyAsync(back.ctypes.data, dev, 16, k.cudaMemcpyDeviceToHost, s)
    assert np.array_equal(back, np.arange(4)) and rt.pending() == 0  # D2H into pageable waited for the stream


def test_s2_s3_copies_are_checked_against_their_kind_the_address_spaces_and_the_bounds():
    rt = FakeCudart()
    s = _stream(rt)
    dev, dev2 = rt.cudaMalloc(64)[1], rt.cudaMalloc(64)[1]
    pinned = rt.cudaMallocHost(64)[1]
    host = np.zeros(16, np.float32)
    assert dev >= DEVICE_BASE > host.ctypes.data and pinned < DEVICE_BASE  # two address spaces
    k = rt.cudaMemcpyKind
    bad = CudaError.cudaErrorInvalidValue
    assert rt.cudaMemcpyAsync(host.ctypes.data, dev, 64, k.cudaMemcpyHostToDevice, s)[0] == bad  # reversed
    assert rt.cudaMemcpyAsync(dev, dev2, 64, k.cudaMemcpyDeviceToHost, s)[0] == bad
    assert rt.cudaMemcpyAsync(dev, host.ctypes.data, 64, k.cudaMemcpyDeviceToDevice, s)[0] == bad
    assert rt.cudaMemcpyAsync(dev2, dev, 65, k.cudaMemcpyDeviceToDevice, s)[0] == bad  # past the end
    assert rt.cudaMemcpyAsync(dev + 32, pinned, 64, k.cudaMemcpyHostToDevice, s)[0] == bad
    assert rt.cudaMemcpyAsync(pinned + 8, dev, 64, k.cudaMemcpyDeviceToHost, s)[0] == bad  # past the pinned block
    assert rt.cudaMemcpyAsync(dev2, dev, 64, k.cudaMemcpyDefault, s)[0] == OK
    assert rt.cudaGetLastError()[0] == bad and rt.cudaGetLastError()[0] == OK  # not sticky


def test_s2_tensorrt_refuses_host_pointers_and_undersized_buffers_and_faults_out_of_bounds(built, monkeypatch):
    trt, rt = install(monkeypatch, version="10.3.0")
    eng = trt.Runtime(None).deserialize_cuda_engine((built["10.3.0"] / "seg_01.fp32.engine").read_bytes())
    ctx = eng.create_execution_context()
    name, out = eng.input_names[0], eng.output_names[0]
    shape = (8, *eng.profiles[name][0][1:])
    need = 4 * int(np.prod(shape))
    host = np.zeros(need // 4, np.float32)
    assert ctx.set_input_shape(name, shape)
    assert not ctx.set_tensor_address(name, host.ctypes.data)  # a host pointer handed to TensorRT
    assert not ctx.set_tensor_address(name, rt.cudaMalloc(need - 4)[1])  # too small for 8 rows
    assert ctx.set_tensor_address(name, rt.cudaMalloc(need)[1])
    small = rt.cudaMalloc(eng.out_row_bytes[out] * 8)[1]
    assert ctx.set_tensor_address(out, small)
    for other in eng.output_names[1:]:
        ctx.set_tensor_address(other, rt.cudaMalloc(eng.out_row_bytes[other] * 64)[1])
    s = _stream(rt)
    assert ctx.execute_async_v3(int(s))
    assert ctx.set_input_shape(name, (16, *shape[1:]))  # more rows than the output buffer holds
    assert ctx.execute_async_v3(int(s))  # enqueued: the kernel faults when it runs
    err = CudaError.cudaErrorIllegalAddress
    assert rt.cudaStreamSynchronize(s)[0] == err and rt.cudaMalloc(4)[0] == err  # sticky, as on a GPU


@pytest.mark.parametrize("call", ["cudaMalloc", "pageable copy", "cudaStreamSynchronize", "legacy stream"])
def test_s9_a_synchronous_call_invalidates_the_capture(call):
    rt = FakeCudart()
    s = _stream(rt, flags=0 if call == "legacy stream" else 1)  # legacy work touches blocking streams only
    dev, dev2 = rt.cudaMalloc(64)[1], rt.cudaMalloc(64)[1]
    k = rt.cudaMemcpyKind
    assert rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0] == OK
    rt.cudaMemcpyAsync(dev2, dev, 64, k.cudaMemcpyDeviceToDevice, s)  # recorded
    if call == "cudaMalloc":
        assert rt.cudaMalloc(64)[0] == CudaError.cudaErrorStreamCaptureUnsupported
    elif call == "pageable copy":
        host = np.zeros(16, np.float32)
        assert rt.cudaMemcpyAsync(dev, host.ctypes.data, 64, k.cudaMemcpyHostToDevice, s)[0] != OK
    elif call == "cudaStreamSynchronize":
        assert rt.cudaStreamSynchronize(s)[0] == CudaError.cudaErrorStreamCaptureUnsupported
    else:  # another thread's work on the legacy default stream (OpenCV, cupy, torch in a camera thread)
        res = []
        t = threading.Thread(
            target=lambda: res.append(rt.cudaMemcpyAsync(dev, dev2, 64, k.cudaMemcpyDeviceToDevice, 0))
        )
        t.start(), t.join()
        assert res[0][0] == CudaError.cudaErrorStreamCaptureImplicit
    assert rt.cudaStreamEndCapture(s) == (CudaError.cudaErrorStreamCaptureInvalidated, None)
    assert not rt.graphs and rt.cudaStreamSynchronize(s)[0] == OK  # the stream is usable again


def test_s9_what_does_not_invalidate_a_thread_local_capture_on_a_non_blocking_stream():
    rt = FakeCudart()
    s = _stream(rt)
    dev, dev2 = rt.cudaMalloc(64)[1], rt.cudaMalloc(64)[1]
    k = rt.cudaMemcpyKind
    rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    t = threading.Thread(
        target=lambda: (rt.cudaMalloc(64), rt.cudaMemcpyAsync(dev, dev2, 64, k.cudaMemcpyDeviceToDevice, 0))
    )
    t.start(), t.join()
    err, graph = rt.cudaStreamEndCapture(s)
    assert err == OK and isinstance(graph, rt.cudaGraph_t)
    rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
    t = threading.Thread(target=lambda: rt.cudaMalloc(64))  # Global mode: any thread's unsafe call counts
    t.start(), t.join()
    assert rt.cudaStreamEndCapture(s)[0] == CudaError.cudaErrorStreamCaptureInvalidated


def test_s9_capture_without_a_warm_up_run_is_invalidated(built, monkeypatch):
    """TensorRT: the first enqueue after a shape change does set-up work capture forbids."""
    trt, rt = install(monkeypatch, version="11.4.0")
    eng = trt.Runtime(None).deserialize_cuda_engine((built["11.4.0"] / "head_01.fp32.engine").read_bytes())
    ctx = eng.create_execution_context()
    name = eng.input_names[0]
    shape = (4, *eng.profiles[name][0][1:])
    ctx.set_input_shape(name, shape)
    ctx.set_tensor_address(name, rt.cudaMalloc(4 * int(np.prod(shape)))[1])
    for out in eng.output_names:
        ctx.set_tensor_address(out, rt.cudaMalloc(eng.out_row_bytes[out] * 4)[1])
    s = _stream(rt)
    rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert not ctx.execute_async_v3(s)
    assert rt.cudaStreamEndCapture(s)[0] == CudaError.cudaErrorStreamCaptureInvalidated
    assert ctx.execute_async_v3(s) and rt.cudaStreamSynchronize(s)[0] == OK  # the warm-up run
    rt.cudaStreamBeginCapture(s, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert ctx.execute_async_v3(s) and rt.cudaStreamEndCapture(s)[0] == OK


def test_s12_handles_behave_as_cuda_pythons():
    rt = FakeCudart()
    s = _stream(rt)
    assert not isinstance(s, int) and int(s) == s.__index__() and s == rt.cudaStream_t(int(s))
    assert s != int(s) and hash(s) == hash(int(s))
    real = pytest.importorskip("cuda.bindings.runtime")
    r = real.cudaStream_t(int(s))
    assert (int(r), r.__index__(), r == real.cudaStream_t(int(s)), r != int(s), hash(r)) == (
        int(s),
        int(s),
        True,
        True,
        hash(s),
    )
    with pytest.raises(TypeError):
        rt.cudaStreamSynchronize("a stream")


# -- edgeexit's TensorRT backend under those rules ------------------------------------------------
@pytest.mark.parametrize("version", SURFACES)
def test_s1_the_backend_syncs_before_every_host_read(built, monkeypatch, test_frames, reference, version):
    c, _, rt = _load(built, monkeypatch, version)
    frames, _ = test_frames
    assert _pairs(c.predict_batch(frames[:64])) == reference[:64] and rt.pending() == 0
    assert _pairs(c.predict(f) for f in frames[64:80]) == reference[64:80]
    # the same backend with its syncs removed reads stale host memory: the simulation catches it
    real_sync = rt.cudaStreamSynchronize
    monkeypatch.setattr(rt, "cudaStreamSynchronize", lambda stream: (OK,))
    stale = _pairs(c.predict_batch(frames[80:144]))
    assert stale != reference[80:144]
    monkeypatch.setattr(rt, "cudaStreamSynchronize", real_sync)
    real_sync(c.runner.stream)
    assert _pairs(c.predict_batch(frames[144:200])) == reference[144:200]


def test_d20_every_host_side_of_a_copy_is_pinned(built, monkeypatch, test_frames, reference):
    trt, rt = install(monkeypatch, version="10.3.0")
    hosts = []
    real = rt.cudaMemcpyAsync

    def spy(dst, src, n, kind, stream):
        hosts.extend((p, n) for p in (int(dst), int(src)) if not rt.is_device(p))
        return real(dst, src, n, kind, stream)

    monkeypatch.setattr(rt, "cudaMemcpyAsync", spy)
    c = Cascade.load(built["10.3.0"], backend="tensorrt", thresholds=TH)
    frames, _ = test_frames
    assert _pairs(c.predict_batch(frames[:100])) == reference[:100]
    assert hosts and all(rt.is_pinned(p, n) for p, n in hosts)
    assert c.runner.info.extra["compute_capability"] == "8.7" and not c.runner.zero_copy
    pinned = rt.live()["pinned"]
    c.close()
    assert pinned >= 3 and rt.live()["pinned"] == 0  # cudaFreeHost for every staging buffer


@pytest.mark.parametrize("version", ["8.6.1", "11.4.0"])
def test_d20_an_integrated_gpu_runs_zero_copy_on_mapped_memory(built, monkeypatch, test_frames, reference, version):
    c, _, rt = _load(built, monkeypatch, version, integrated=True)
    frames, _ = test_frames
    assert c.runner.zero_copy
    assert _pairs(c.predict_batch(frames[:64])) == reference[:64]
    assert _pairs(c.predict(f) for f in frames[64:70]) == reference[64:70]
    ptrs = {p for _, (p, _) in c.runner.units[1]["outputs"].items()}
    assert any(p in rt.mapped for p in ptrs) and c.runner._image_ptr in rt.mapped
    full = Cascade.load(built[version], backend="tensorrt", thresholds=[2.0] * 7 + [0.0], cuda_graphs=False)
    before = rt.memcpy_calls
    full.predict_batch(frames[:64])
    assert rt.memcpy_calls - before == 1  # no upload, no confidence copy: only the logits come back


def test_s9_d19_an_invalidated_capture_falls_back_for_that_unit_and_bucket_then_recovers(
    built, monkeypatch, test_frames, reference
):
    """Another thread's legacy-stream work: harmless on edgeexit's non-blocking stream; on a
    blocking one it invalidates the capture, that (unit, bucket) runs plainly, and is captured
    on a later call."""
    c, _, rt = _load(built, monkeypatch)
    k = rt.cudaMemcpyKind
    a, b = rt.cudaMalloc(64)[1], rt.cudaMalloc(64)[1]

    def camera_thread(rt_):
        t = threading.Thread(target=lambda: rt_.cudaMemcpyAsync(a, b, 64, k.cudaMemcpyDeviceToDevice, 0))
        t.start(), t.join()

    rt.on_capture_begin.append(camera_thread)
    frames, _ = test_frames
    assert _pairs(c.predict_batch(frames[:64])) == reference[:64]
    stats = c.runner.graph_stats()
    assert not stats.failed and stats.count  # the non-blocking stream is untouched
    c.close()

    from edgeexit.runtime.backends import cuda

    monkeypatch.setattr(cuda, "create_stream", lambda: cuda.check(rt.cudaStreamCreate()))  # a blocking stream
    c = Cascade.load(built["10.3.0"], backend="tensorrt", thresholds=TH)
    hits = []
    rt.on_capture_begin[:] = [lambda rt_: (hits.append(1), camera_thread(rt_)) if not hits else None]
    assert _pairs(c.predict_batch(frames[:64])) == reference[:64]
    stats = c.runner.graph_stats()
    assert stats.failed == {("seg_01", 64): 1}  # only the capture the camera thread broke
    assert any(unit == "head_01" for unit, _ in stats.captured)  # the next unit captured fine
    assert _pairs(c.predict_batch(frames[64:128])) == reference[64:128]
    assert ("seg_01", 64) in c.runner.graph_stats().captured  # retried and captured: recovered
    assert rt.sticky is None and rt.pending() == 0


@pytest.mark.parametrize("version", SURFACES)
def test_s12_tensorrt_gets_the_stream_as_an_int_and_cuda_python_the_handle(built, monkeypatch, test_frames, version):
    c, _, rt = _load(built, monkeypatch, version)
    c.predict_batch(test_frames[0][:8])
    stream = c.runner.stream
    assert isinstance(stream, rt.cudaStream_t)
    used = [ctx.last_stream for ctx in c.runner._res.contexts if hasattr(ctx, "last_stream")]
    assert used and all(type(s) is int and s == int(stream) for s in used)
    assert all(isinstance(g, rt.cudaGraphExec_t) for g in c.runner._res.graph_execs)


def test_s15_close_with_work_still_queued_faults_nothing(built, monkeypatch, test_frames):
    c, trt, rt = _load(built, monkeypatch, cuda_graphs=False)
    r = c.runner
    x = c.preprocessor.batch(test_frames[0][:8])
    r.run_segment(0, r.from_host(x))  # enqueued, not synchronised
    assert rt.pending() > 0
    c.close()
    assert rt.sticky is None and rt.pending() == 0 and trt.live_contexts == 0
    assert rt.live() == {"buffers": 0, "streams": 0, "graphs": 0, "graph_execs": 0, "pinned": 0}


@pytest.mark.parametrize("integrated", [False, True])
def test_gpu_checks_cudart_smoke_step_passes_under_the_simulations_rules(monkeypatch, integrated):
    """benchmarks/gpu_check.py's cudart step is the first thing a real GPU runs: its own
    logic (syncs, kinds, capture, pinned and mapped staging) must hold under the strict fake."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("gpu_check", None)
    import gpu_check

    _, rt = install(monkeypatch)
    rt.integrated = integrated
    out = gpu_check.cudart_smoke()
    assert out["name"] == "Simulated GPU" and out["integrated"] is integrated
    assert rt.sticky is None and rt.live() == {"buffers": 0, "streams": 0, "graphs": 0, "graph_execs": 0, "pinned": 0}


def test_s14_two_threads_predicting_on_one_cascade_get_the_reference_answers(
    built, monkeypatch, test_frames, reference
):
    """The runner is not thread safe (one stream, shared staging and graphs): the Cascade's lock
    must serialise callers; with queued execution a race would hand one thread the other's rows."""
    c, _, rt = _load(built, monkeypatch)
    frames, _ = test_frames
    got: dict = {}

    def singles():
        got["a"] = [_pairs([c.predict(f)])[0] for f in frames[:100]]

    def batches():
        got["b"] = [p for s in range(100, 200, 7) for p in _pairs(c.predict_batch(frames[s : min(s + 7, 200)]))]

    threads = [threading.Thread(target=singles), threading.Thread(target=batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got["a"] == reference[:100] and got["b"] == reference[100:200]
    assert rt.sticky is None and rt.pending() == 0


def test_d24_d25_the_requested_precision_picks_the_engines_and_no_precision_means_fp32(built, monkeypatch):
    import json

    from edgeexit.runtime.artifact import Artifact, parse_units
    from edgeexit.runtime.backends.tensorrt import select_engine, tensorrt_usable

    install(monkeypatch, version="10.3.0")
    art = Artifact.load(built["10.3.0"])  # fp32 engines only
    assert tensorrt_usable(art, "fp32")[0] and tensorrt_usable(art)[0]
    ok, why = tensorrt_usable(art, "int8")  # no int8 engines: auto passes TensorRT over
    assert not ok and "no int8 TensorRT engines" in why
    units = json.loads((built["10.3.0"] / "manifest.json").read_text())["units"]
    for u in units:
        u["engines"].insert(0, {**u["engines"][0], "precision": "fp16"})  # fp16 listed first
    parsed = parse_units(built["10.3.0"], units)
    assert {select_engine(u, None).precision for u in parsed} == {"fp32"}  # no precision asked: the fp32 engines
    assert {select_engine(u, "fp16").precision for u in parsed} == {"fp16"}
