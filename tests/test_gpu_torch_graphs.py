"""The torch backend's CUDA-graph path on the CPU, with a SIMULATED torch.cuda.

What is simulated: only the torch.cuda pieces `_capture` calls (Stream, stream(), current_stream,
graph_pool_handle, CUDAGraph). The fake CUDAGraph records every aten op run between capture_begin
and capture_end (a TorchDispatchMode) and `replay()` re-runs those ops writing into the very same
tensors, as a CUDA graph replays its kernels on fixed addresses: a graph that read anything but
its static inputs, or whose outputs were not its static outputs, would give wrong predictions here.
Not simulated: the caching allocator and its pools (the test checks that one pool handle is
passed to every capture), streams, capture errors.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgeexit.runtime import Cascade

K = 8


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


class FakeCUDAGraph:
    captures: list = []

    def capture_begin(self, pool=None, capture_error_mode="global") -> None:
        FakeCUDAGraph.captures.append((pool, capture_error_mode))
        self._rec = _Recorder()
        self._rec.__enter__()

    def capture_end(self) -> None:
        self._rec.__exit__(None, None, None)
        self.ops = self._rec.ops

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for dst, src in zip(_tensors(out), _tensors(new), strict=True):
                if dst is not src:
                    dst.copy_(src)


def _tensors(x):
    return [t for t in (x if isinstance(x, (tuple, list)) else (x,)) if isinstance(t, torch.Tensor)]


class _Stream:
    def __init__(self, *a, **k) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


class _NoCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_cuda(monkeypatch):
    pools = []
    FakeCUDAGraph.captures = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _NoCtx())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: pools.append(object()) or pools[-1])
    return types.SimpleNamespace(pools=pools, captures=FakeCUDAGraph.captures)


@pytest.mark.slow
def test_graphs_share_one_pool_use_power_of_two_buckets_and_replay_correctly(tiny_artifact, test_frames, fake_cuda):
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends.torch import TorchBackend

    be = TorchBackend(Artifact.load(tiny_artifact), device="cpu")
    be.use_graphs = True
    th = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]  # compaction at several exits: many batch sizes
    eager = Cascade.load(tiny_artifact, backend="torch", thresholds=th)
    graphed = Cascade(eager.artifact, be, thresholds=th)
    frames, _ = test_frames
    for start, size in ((0, 1), (1, 3), (4, 64), (68, 5), (73, 33), (106, 7)):
        batch = frames[start : start + size]
        a = [(p.label, p.exit_index) for p in eager.predict_batch(batch)]
        b = [(p.label, p.exit_index) for p in graphed.predict_batch(batch)]
        assert a == b, (start, size)
    buckets = {b for _, b in be._graphs}
    assert buckets <= {1, 2, 4, 8, 16, 32, 64} and len(buckets) >= 4
    assert len(fake_cuda.pools) == 1 and len(fake_cuda.captures) == len(be._graphs)
    assert all(pool is fake_cuda.pools[0] and mode == "thread_local" for pool, mode in fake_cuda.captures)
    for graph, _, static_out in be._graphs.values():  # outputs live outside the pool: written by copy_
        copied = {id(args[0]) for func, args, _, _ in graph.ops if func is torch.ops.aten.copy_.default}
        assert all(id(t) in copied for t in static_out)
    assert not hasattr(be, "_lock")


def test_a_padded_graph_returns_only_the_callers_rows(tiny_artifact, fake_cuda):
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends.torch import TorchBackend, bucket

    assert [bucket(n) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    be = TorchBackend(Artifact.load(tiny_artifact), device="cpu")
    be.use_graphs = True
    x = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    state = be.run_segment(0, be.from_host(x))
    assert state[0].shape[0] == 5 and list(be._graphs) == [(("seg", 0), 8)]
    be.use_graphs = False
    ref = be.run_segment(0, be.from_host(x))
    torch.testing.assert_close(state[0], ref[0])
    be.close()
    assert be._pool is None and not be._graphs
