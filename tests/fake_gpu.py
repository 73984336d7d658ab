"""A SIMULATED TensorRT and CUDA runtime, for testing edgeexit's TensorRT backend without a GPU.

This checks *our* logic — buffers, addresses, shapes, compaction, graphs, contexts, lifetimes —
not TensorRT: an "engine" here is the unit's ONNX file run by ONNX Runtime, "device memory" is host
memory at real addresses (so every cudaMemcpy is a memmove), and a "CUDA graph" is the list of
operations recorded while a stream was capturing, replayed with the addresses they had then.

Modelled on the documented APIs the backend uses: TensorRT's name-based tensor API
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`, returning False on failure) and
cuda-python's runtime (calls return `(err, *values)`).
"""

from __future__ import annotations

import ctypes
import sys
import types
from enum import IntEnum

import numpy as np


class CudaError(IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime over host memory, counting every live object."""

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t = CudaError
        self.cudaMemcpyKind = types.SimpleNamespace(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
        )
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
        self.allocations: dict[int, np.ndarray] = {}
        self.streams: set[int] = set()
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.capturing: dict[int, list] = {}
        self.memcpy_calls = 0
        self.last_error_reads = 0
        self.fail_capture_of: set[str] = set()  # unit names whose capture fails (to test the fallback)
        self.instantiate_signature = 2  # 2: cuda-python 12/13 (graph, flags); 3: cuda-python 11
        self._next = 1000

    def _handle(self) -> int:
        self._next += 1
        return self._next

    # memory
    def cudaMalloc(self, nbytes):
        buf = np.zeros(int(nbytes), np.uint8)
        self.allocations[buf.ctypes.data] = buf
        return (CudaError.cudaSuccess, buf.ctypes.data)

    def cudaFree(self, ptr):
        if self.allocations.pop(int(ptr), None) is None:
            return (CudaError.cudaErrorInvalidValue,)
        return (CudaError.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.memcpy_calls += 1

        def op(dst=int(dst), src=int(src), n=int(nbytes)):
            ctypes.memmove(dst, src, n)

        return self._enqueue(stream, op)

    def _enqueue(self, stream, op):
        if stream not in self.streams:
            return (CudaError.cudaErrorInvalidValue,)
        if stream in self.capturing:
            self.capturing[stream].append(op)
        else:
            op()
        return (CudaError.cudaSuccess,)

    # streams and graphs
    def cudaStreamCreate(self):
        h = self._handle()
        self.streams.add(h)
        return (CudaError.cudaSuccess, h)

    def cudaStreamDestroy(self, stream):
        self.streams.discard(stream)
        return (CudaError.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        return (CudaError.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[stream] = []
        return (CudaError.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        ops = self.capturing.pop(stream)
        h = self._handle()
        self.graphs[h] = ops
        return (CudaError.cudaSuccess, h)

    def cudaGraphInstantiate(self, graph, *args):
        if len(args) + 1 != self.instantiate_signature:
            raise TypeError(f"cudaGraphInstantiate takes {self.instantiate_signature} arguments")
        h = self._handle()
        self.execs[h] = list(self.graphs[graph])
        return (CudaError.cudaSuccess, h) if len(args) == 1 else (CudaError.cudaSuccess, h, None)

    def cudaGraphLaunch(self, exec_graph, stream):
        for op in self.execs[exec_graph]:
            self._enqueue(stream, op)
        return (CudaError.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(graph)
        return (CudaError.cudaSuccess,)

    def cudaGraphExecDestroy(self, exec_graph):
        self.execs.pop(exec_graph)
        return (CudaError.cudaSuccess,)

    # errors and devices
    def cudaGetLastError(self):
        self.last_error_reads += 1
        return (CudaError.cudaSuccess,)

    def cudaGetErrorName(self, err):
        return (CudaError.cudaSuccess, CudaError(int(err)).name.encode())

    def cudaGetDeviceCount(self):
        return (CudaError.cudaSuccess, 1)

    def cudaGetDeviceProperties(self, index):
        return (CudaError.cudaSuccess, types.SimpleNamespace(name=b"Simulated GPU\x00", major=8, minor=7))

    def live(self) -> dict:
        return {
            "buffers": len(self.allocations),
            "streams": len(self.streams),
            "graphs": len(self.graphs),
            "graph_execs": len(self.execs),
        }


def _read(ptr: int, shape: tuple) -> np.ndarray:
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape).copy()


class FakeContext:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        engine.trt.live_contexts += 1

    def __del__(self) -> None:
        self.engine.trt.live_contexts -= 1

    def set_input_shape(self, name, shape) -> bool:
        if name not in self.engine.input_names or not 1 <= shape[0] <= self.engine.max_batch:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if name not in self.engine.input_names + self.engine.output_names:
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream) -> bool:
        rt = self.engine.trt.cudart
        if any(n not in self.shapes or n not in self.addresses for n in self.engine.input_names):
            return False
        if stream in rt.capturing and self.engine.name in rt.fail_capture_of:
            return False
        feeds = {n: (self.addresses[n], self.shapes[n]) for n in self.engine.input_names}
        outs = {n: self.addresses[n] for n in self.engine.output_names}

        def op(feeds=feeds, outs=outs, sess=self.engine.session):
            values = sess.run(list(outs), {n: _read(p, s) for n, (p, s) in feeds.items()})
            for ptr, v in zip(outs.values(), values, strict=True):
                v = np.ascontiguousarray(v, np.float32)
                ctypes.memmove(ptr, v.ctypes.data, v.nbytes)

        return rt._enqueue(stream, op)[0] == CudaError.cudaSuccess


class FakeEngine:
    def __init__(self, trt, plan: bytes) -> None:
        import onnxruntime as ort

        self.trt = trt
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(plan, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = self.session.get_modelmeta().graph_name
        self.max_batch = trt.max_batch

    def create_execution_context(self):
        return FakeContext(self)


def make_tensorrt(cudart: FakeCudart, version: str = "10.3.0", max_batch: int = 64) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.cudart = cudart
    trt.max_batch = max_batch
    trt.live_contexts = 0

    class Logger:
        WARNING = 2

        def __init__(self, severity) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            return FakeEngine(trt, plan)

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


def install(monkeypatch, version: str = "10.3.0", max_batch: int = 64):
    """Put the simulated tensorrt and cuda.bindings.runtime in sys.modules; returns (trt, cudart)."""
    from edgeexit.runtime.backends import cuda

    cudart = FakeCudart()
    trt = make_tensorrt(cudart, version, max_batch)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    pkg = types.ModuleType("cuda")
    pkg.bindings = bindings
    for name, mod in (("tensorrt", trt), ("cuda", pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda, "_runtime", None)
    return trt, cudart


def add_engines(artifact, version: str = "10.3.0", max_batch: int = 64) -> None:
    """Give every unit of ``artifact`` a simulated 'plan' (its ONNX bytes, graph named after the unit)
    and the manifest entry `edgeexit export --format engine` would write."""
    import json

    import onnx

    from edgeexit.export.tensorrt import engine_entry, engine_filename, profile_shapes

    path = artifact / "manifest.json"
    m = json.loads(path.read_text())
    device = {"name": "Simulated GPU", "compute_capability": "8.7"}
    for u in m["units"]:
        model = onnx.load(str(artifact / u["onnx"]))
        model.graph.name = u["name"]
        name = engine_filename(u["name"], "fp32")
        (artifact / name).write_bytes(model.SerializeToString())
        shapes = profile_shapes(u["inputs"], max_batch, 1)
        u["engines"] = [engine_entry(name, "fp32", version, device, shapes)]
    path.write_text(json.dumps(m))
