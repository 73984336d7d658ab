"""The real TensorRTBackend, run through Cascade on a SIMULATED TensorRT and CUDA (tests/fake_gpu/).

A simulation: it checks edgeexit's logic around TensorRT (device buffers, shapes and addresses,
compaction copies, CUDA graphs and their contexts, the max batch, lifetimes), not TensorRT itself.
Every test using the ``gpu`` fixture runs once per simulated API surface (8.6, 10.x, 11.x), with
the engines built by the real `build_engines` against that surface.
"""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
from fake_gpu import add_engines, install

from edgeexit.runtime import Cascade

pytestmark = pytest.mark.sim  # the simulated TensorRT/CUDA (tests/fake_gpu/)

K = 8
TH = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]


SURFACES = ["8.6.1", "10.3.0", "11.4.0"]


@pytest.fixture(params=SURFACES)
def gpu(request, monkeypatch, artifact_copy):
    trt, cudart = install(monkeypatch, version=request.param)
    add_engines(artifact_copy)
    return artifact_copy, trt, cudart


@pytest.fixture(scope="module")
def reference(tiny_artifact, test_frames):
    frames, _ = test_frames
    ort = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=TH, fuse=False)
    return [(p.label, p.exit_index) for p in ort.predict_batch(frames)], ort.exit_statistics(
        ort.preprocessor.batch(frames)
    )


@pytest.mark.parametrize("graphs", [True, False])
def test_predictions_equal_onnxruntime_at_batch_1_7_and_64(gpu, test_frames, reference, graphs):
    artifact, trt, cudart = gpu
    frames, _ = test_frames
    expected, _ = reference
    c = Cascade.load(artifact, backend="auto", thresholds=TH, cuda_graphs=graphs)
    assert c.runner.info.name == "tensorrt" and c.backend_info["max_batch"] == 64
    single = [(p.label, p.exit_index) for p in (c.predict(f) for f in frames[:200])]
    assert single == expected[:200]
    for batch in (7, 64):
        got = []
        for start in range(0, len(frames), batch):
            got += [(p.label, p.exit_index) for p in c.predict_batch(frames[start : start + batch])]
        assert got == expected, f"batch {batch}"
    assert len({e for _, e in expected}) > 3  # compaction really happened at several exits
    if graphs:
        graphs_kept = c.runner.graph_stats().count
        assert graphs_kept and trt.live_contexts == K * 2 + graphs_kept
    else:
        assert c.runner.graph_stats().count == 0


def test_interleaved_batch_sizes_and_batches_beyond_the_profile(gpu, test_frames, reference):
    artifact, _, _ = gpu
    frames, _ = test_frames
    expected, stats = reference
    c = Cascade.load(artifact, backend="tensorrt", thresholds=TH)
    got, start = [], 0
    for size in (1, 64, 7, 1, 33, 64, 5) * 20:
        if start >= 600:
            break
        got += [(p.label, p.exit_index) for p in c.predict_batch(frames[start : start + size])]
        start += size
    assert got == expected[: len(got)]
    big = c.predict_batch(frames[:300])  # 300 > max batch 64: sliced by the cascade
    assert [(p.label, p.exit_index) for p in big] == expected[:300]
    ours = c.exit_statistics(c.preprocessor.batch(frames), batch_size=256)
    assert np.array_equal(ours["prediction"], stats["prediction"])
    np.testing.assert_allclose(ours["confidence"], stats["confidence"], atol=1e-5)


def test_nothing_is_left_alive_after_close_or_garbage_collection(gpu, test_frames):
    artifact, trt, cudart = gpu
    frames, _ = test_frames
    c = Cascade.load(artifact, backend="tensorrt", thresholds=TH)
    c.predict_batch(frames[:64])
    c.predict(frames[0])
    assert cudart.live()["buffers"] > 0 and cudart.live()["graph_execs"] > 0
    assert cudart.live()["graphs"] == 0  # the cudaGraph_t is destroyed once instantiated
    c.close()
    c.close()  # idempotent
    assert cudart.live() == {"buffers": 0, "streams": 0, "graphs": 0, "graph_execs": 0, "pinned": 0}
    c2 = Cascade.load(artifact, backend="tensorrt", thresholds=TH)
    c2.predict_batch(frames[:10])
    del c2  # never closed
    gc.collect()
    assert cudart.live() == {"buffers": 0, "streams": 0, "graphs": 0, "graph_execs": 0, "pinned": 0}
    assert trt.live_contexts == 0


def test_a_failed_init_frees_what_it_allocated(gpu, monkeypatch):
    import json

    artifact, _, cudart = gpu
    m = json.loads((artifact / "manifest.json").read_text())
    m["units"][5]["engines"][0]["compute_capability"] = "9.0"  # unit 6 built for another GPU
    (artifact / "manifest.json").write_text(json.dumps(m))
    from edgeexit.errors import UserError

    with pytest.raises(UserError, match="rebuild the engines"):
        Cascade.load(artifact, backend="tensorrt")
    gc.collect()
    assert cudart.live() == {"buffers": 0, "streams": 0, "graphs": 0, "graph_execs": 0, "pinned": 0}


def test_a_unit_that_cannot_be_captured_runs_plainly_and_is_retried_a_bounded_number_of_times(
    gpu, test_frames, reference
):
    """The "enqueue returns False under capture" pattern: per (unit, batch bucket), CAPTURE_ATTEMPTS tries."""
    from edgeexit.runtime.backends.tensorrt import CAPTURE_ATTEMPTS

    artifact, _, cudart = gpu
    frames, _ = test_frames
    expected, _ = reference
    cudart.fail_capture_of = {"seg_01"}
    c = Cascade.load(artifact, backend="tensorrt", thresholds=TH)
    got = [(p.label, p.exit_index) for p in c.predict_batch(frames[:64])]
    got += [(p.label, p.exit_index) for p in c.predict_batch(frames[64:71])]
    assert got == expected[:71]
    stats = c.runner.graph_stats()
    assert stats.failed == {("seg_01", 64): 1, ("seg_01", 8): 1}  # keyed by (unit, batch bucket): 7 rows -> 8
    assert not any(unit == "seg_01" for unit, _ in stats.captured)
    assert cudart.last_error_reads == 2
    for start in range(71, 71 + 64 * CAPTURE_ATTEMPTS, 64):  # bucket 64 again and again
        c.predict_batch(frames[start : start + 64])
    assert c.runner.graph_stats().failed[("seg_01", 64)] == CAPTURE_ATTEMPTS
    assert cudart.last_error_reads == 1 + CAPTURE_ATTEMPTS  # bucket 8 once, bucket 64 no more than allowed


def test_graphs_are_instantiated_with_flags_and_the_stream_is_non_blocking(gpu, test_frames, reference):
    artifact, _, cudart = gpu
    frames, _ = test_frames
    c = Cascade.load(artifact, backend="tensorrt", thresholds=TH)
    assert [(p.label, p.exit_index) for p in c.predict_batch(frames[:64])] == reference[0][:64]
    stats = c.runner.graph_stats()
    assert stats.count and not stats.failed
    assert cudart.stream_flags == cudart.cudaStreamNonBlocking  # no legacy-stream sync can break its capture
    assert not hasattr(cudart, "cudaGraphInstantiate")  # WithFlags only: one signature on 11.8-13


def test_the_graph_cache_is_capped(gpu, test_frames, monkeypatch):
    from edgeexit.runtime.backends import tensorrt

    monkeypatch.setattr(tensorrt, "MAX_GRAPHS", 5)
    artifact, _, cudart = gpu
    frames, _ = test_frames
    c = Cascade.load(artifact, backend="tensorrt", thresholds=TH)
    for size in (1, 2, 3, 5, 9, 17, 33):  # 7 buckets: 1, 2, 4, 8, 16, 32, 64
        c.predict_batch(frames[:size])
    assert c.runner.graph_stats().count == 5 and cudart.live()["graph_execs"] == 5


def test_compaction_and_readback_copy_runs_of_rows_not_rows(gpu, test_frames):
    artifact, _, cudart = gpu
    frames, _ = test_frames
    c = Cascade.load(artifact, backend="tensorrt", thresholds=[2.0] * (K - 1) + [0.0], cuda_graphs=False)
    before = cudart.memcpy_calls
    c.predict_batch(frames[:64])  # nothing exits early: one upload, one confidence read, one logits read
    assert cudart.memcpy_calls - before == 3


def test_calibrate_with_engines_present(gpu):
    from edgeexit.calibrate.run import run_calibration

    artifact, _, _ = gpu
    # two ladder rungs (the minimum): the ladder is still planned and run on the engines, without 14 more
    # optimiser runs that this test does not look at
    r = run_calibration(artifact, budget_fraction=1.5, backend="auto", repeats=20, iso_accuracy=False, ladder_steps=2)
    assert r["device"]["backend"] == "tensorrt" and r["device"]["gpu"] == "Simulated GPU"
    assert 0.3 < r["measured"]["accuracy"] <= 1


def test_auto_says_why_not_tensorrt_and_versions_outside_the_range_are_refused(artifact_copy, monkeypatch):
    from edgeexit.errors import UserError
    from edgeexit.runtime.backends.tensorrt import check_trt_version

    c = Cascade.load(artifact_copy, backend="auto")
    assert "not tensorrt" in c.backend_info["why"]
    for bad in ("8.5.3", "12.0.0", "12.1.1"):
        with pytest.raises(UserError, match="TensorRT"):
            check_trt_version(bad)
    for good in ("8.6.1", "10.3.0", "10.16.0", "11.0.0", "11.4.0"):
        check_trt_version(good)
    install(monkeypatch, version="11.4.0")
    add_engines(artifact_copy)
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "12.0.0")
    c = Cascade.load(artifact_copy, backend="auto")
    assert c.runner.info.name == "onnxruntime-cpu" and "12.0.0 is not supported" in c.backend_info["why"]


def test_gpu_check_on_a_machine_without_a_gpu_says_so_and_exits_0():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == (
        "gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing checked"
    )


def test_a_refused_shape_or_address_is_an_error_not_a_silent_run(gpu, test_frames, monkeypatch):
    from fake_gpu import FakeContext

    artifact, _, _ = gpu
    c = Cascade.load(artifact, backend="tensorrt", thresholds=TH, cuda_graphs=False)
    monkeypatch.setattr(FakeContext, "set_input_shape", lambda self, name, shape: False)
    with pytest.raises(RuntimeError, match="TensorRT refused shape"):
        c.predict(test_frames[0][0])


def test_the_profile_is_tuned_for_batch_1_unless_asked():
    from edgeexit.export.tensorrt import profile_shapes

    inputs = [{"name": "image", "shape": [None, 1, 28, 28]}]
    assert profile_shapes(inputs, 64)["image"] == [[1, 1, 28, 28], [1, 1, 28, 28], [64, 1, 28, 28]]
    assert profile_shapes(inputs, 64, 16)["image"][1] == [16, 1, 28, 28]
