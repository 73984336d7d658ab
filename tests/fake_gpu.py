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
from pathlib import Path

import numpy as np


class CudaError(IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
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
        self.cudaStreamNonBlocking = 1
        self.driver_version = 12080  # what cudaDriverGetVersion reports
        self.runtime_version = 12090  # the CUDA runtime this "cuda-python" links
        self.device_capacity = 8 << 30  # bytes of simulated device memory (OOM beyond)
        self.device_in_use = 0
        self._next = 1000

    def _handle(self) -> int:
        self._next += 1
        return self._next

    # memory
    def cudaMalloc(self, nbytes):
        if self.device_in_use + int(nbytes) > self.device_capacity:
            return (CudaError.cudaErrorMemoryAllocation, 0)
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

    def cudaStreamCreateWithFlags(self, flags):
        self.stream_flags = int(flags)
        return self.cudaStreamCreate()

    def cudaDriverGetVersion(self):
        return (CudaError.cudaSuccess, self.driver_version)

    def cudaRuntimeGetVersion(self):
        return (CudaError.cudaSuccess, self.runtime_version)

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

    def cudaGraphInstantiateWithFlags(self, graph, flags):
        h = self._handle()
        self.execs[h] = list(self.graphs[graph])
        return (CudaError.cudaSuccess, h)

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


ACTIVATION_BYTES_PER_ROW = 4096  # simulated activation memory an engine needs per batch row


class FakeContext:
    """An execution context. ``memory``: "static" (its own activation memory, allocated from the
    simulated device and freed with the context), or "user" (none until the caller sets some)."""

    def __init__(self, engine, memory: str, profile: int) -> None:
        self.engine, self.memory, self.profile = engine, memory, profile
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.device_ptr = None
        self._own = 0
        rt = engine.trt.cudart
        if memory == "static":
            self._own = engine.activation_bytes
            rt.device_in_use += self._own
        engine.trt.live_contexts += 1

    def __del__(self) -> None:
        self.engine.trt.cudart.device_in_use -= self._own
        self.engine.trt.live_contexts -= 1

    def _set_memory(self, ptr, size=None) -> None:
        rt = self.engine.trt.cudart
        base = next((b for b, a in rt.allocations.items() if b <= int(ptr) < b + a.nbytes), None)
        if base is None:
            raise RuntimeError("[fake TensorRT] device memory is not a device allocation")
        room = rt.allocations[base].nbytes - (int(ptr) - base)
        if room < self.engine.activation_bytes or (size is not None and int(size) < self.engine.activation_bytes):
            raise RuntimeError("[fake TensorRT] device memory smaller than the engine needs")
        self.device_ptr = int(ptr)

    def set_optimization_profile_async(self, index, stream) -> bool:
        if index != 0 or stream not in self.engine.trt.cudart.streams:
            return False
        self.profile = 0
        return True

    def set_input_shape(self, name, shape) -> bool:
        if self.profile != 0 or name not in self.engine.input_names:
            return False
        mn, _, mx = self.engine.profiles[name]
        if len(shape) != len(mx) or any(not lo <= d <= hi for d, lo, hi in zip(shape, mn, mx, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if name not in self.engine.input_names + self.engine.output_names:
            return False
        rt = self.engine.trt.cudart
        if not any(b <= int(ptr) < b + a.nbytes for b, a in rt.allocations.items()):
            return False  # a host pointer or garbage handed to TensorRT
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream) -> bool:
        rt = self.engine.trt.cudart
        if self.profile != 0 or (self.memory == "user" and self.device_ptr is None):
            return False
        if any(n not in self.shapes or n not in self.addresses for n in self.engine.input_names):
            return False
        if any(n not in self.addresses for n in self.engine.output_names):
            return False
        if stream in rt.capturing and self.engine.name in rt.fail_capture_of:
            return False
        feeds = {n: (self.addresses[n], self.shapes[n]) for n in self.engine.input_names}
        outs = {n: self.addresses[n] for n in self.engine.output_names}
        n = next(iter(self.shapes.values()))[0]
        for ptr in outs.values():  # bounds: the output buffer must hold n rows
            base = next(b for b, a in rt.allocations.items() if b <= ptr < b + a.nbytes)
            if ptr - base + n * self.engine.out_row_bytes[[k for k, v in outs.items() if v == ptr][0]] > (
                rt.allocations[base].nbytes
            ):
                return False

        def op(feeds=feeds, outs=outs, sess=self.engine.session):
            values = sess.run(list(outs), {n: _read(p, s) for n, (p, s) in feeds.items()})
            for ptr, v in zip(outs.values(), values, strict=True):
                v = np.ascontiguousarray(v, np.float32)
                ctypes.memmove(ptr, v.ctypes.data, v.nbytes)

        return rt._enqueue(stream, op)[0] == CudaError.cudaSuccess


class FakeEngine:
    def __init__(self, trt, plan: bytes) -> None:
        import onnx
        import onnxruntime as ort

        self.trt = trt
        model = onnx.load_from_string(plan)
        meta = {p.key: p.value for p in model.metadata_props}
        self.version, self.max_batch = meta["fake_trt_version"], int(meta["fake_trt_max_batch"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(plan, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = self.session.get_modelmeta().graph_name
        self.profiles = {}
        for i in self.session.get_inputs():
            rest = [int(d) for d in i.shape[1:]]
            self.profiles[i.name] = ([1, *rest], [1, *rest], [self.max_batch, *rest])
        outs = self.session.get_outputs()
        self.out_row_bytes = {o.name: 4 * int(np.prod([int(d) for d in o.shape[1:]])) for o in outs}
        self.activation_bytes = ACTIVATION_BYTES_PER_ROW * self.max_batch
        self.dtypes = {n: trt.DataType.FLOAT for n in self.input_names + self.output_names}
        self.contexts_made = 0
        if trt.major < 11:
            self.device_memory_size = self.activation_bytes
        if trt.major >= 10:
            self.device_memory_size_v2 = self.activation_bytes

    # introspection
    @property
    def num_io_tensors(self) -> int:
        return len(self.input_names) + len(self.output_names)

    def get_tensor_name(self, i: int) -> str:
        return (self.input_names + self.output_names)[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.input_names else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile):
        return self.profiles[name]

    def _profile_for_new_context(self) -> int:
        # TensorRT 8.6 (NvInferRuntime.h v8.6.1:2790-2797): only the first context gets profile 0
        self.contexts_made += 1
        return 0 if (self.trt.major >= 9 or self.contexts_made == 1) else -1

    def create_execution_context(self, strategy=None):
        if strategy is not None and self.trt.major < 10:
            raise TypeError("create_execution_context() takes no strategy before TensorRT 10")
        user = strategy is not None and strategy == self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        rt = self.trt.cudart
        if not user and rt.device_in_use + self.activation_bytes > rt.device_capacity:
            return None  # TensorRT returns None when it cannot allocate the context's memory
        return FakeContext(self, "user" if user else "static", self._profile_for_new_context())


def _no_memory_context(engine):
    return FakeContext(engine, "user", engine._profile_for_new_context())


def _check_qdq(model) -> str | None:
    """onnx-tensorrt's rule (onnxOpImporters.cpp): Q/DQ zero points INT8 and all zero; no INT32 DQ."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            return f"{node.name}: no zero point (uint8 by default): TensorRT only supports INT8"
        zp = init.get(node.input[2])
        if zp is None or zp.dtype != np.int8:
            return f"{node.name}: zero point {None if zp is None else zp.dtype}: TensorRT takes INT8 Q/DQ only"
        if (zp != 0).any():
            return f"{node.name}: TensorRT only supports symmetric quantization. The zero point must be all zeros."
    return None


def make_tensorrt(cudart: FakeCudart, version: str = "10.3.0", max_batch: int = 64) -> types.ModuleType:
    """A SIMULATED tensorrt module with the surface of ``version`` (8.6 / 10.x / 11.x): only the
    names that version's real bindings have (checked against the wheels' string tables by
    tests/test_trt_surface.py)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.major = major = int(version.split(".")[0])
    trt.cudart = cudart
    trt.max_batch = max_batch
    trt.live_contexts = 0
    trt.built = []  # (unit file, network flags, builder flags) per build, for the tests

    class Logger:
        WARNING = 2

        def __init__(self, severity) -> None:
            self.severity = severity

    class DataType(IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2

    class TensorIOMode(IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class MemoryPoolType(IntEnum):
        WORKSPACE = 0

    if major >= 11:
        NDF = IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        BF = IntEnum("BuilderFlag", {"DEBUG": 2, "REFIT": 3})
    elif major >= 10:
        NDF = IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        BF = IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "REFIT": 3})
    else:
        NDF = IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
        BF = IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "REFIT": 4})
    if major >= 10:
        trt.ExecutionContextAllocationStrategy = IntEnum(
            "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
        )
    device = cudart.cudaGetDeviceProperties(0)[1]
    cache_tag = f"{version}|{device.major}.{device.minor}".encode()

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self):
            return cache_tag

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags, self.model, self.source = flags, None, None

    class OnnxParser:
        def __init__(self, network, logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path) -> bool:
            import onnx

            model = onnx.load(str(path))
            err = _check_qdq(model)
            if err:
                self.errors.append(err)
                return False
            self.network.model, self.network.source = model, str(path)
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx) -> None:
            self.shapes[name] = (list(mn), list(opt), list(mx))

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles, self.cache = set(), [], None

        def set_memory_pool_limit(self, pool, size) -> None:
            assert pool == MemoryPoolType.WORKSPACE and size > 0

        def set_flag(self, flag) -> None:
            self.flags.add(BF(flag))

        def create_timing_cache(self, data: bytes):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            if cache.data and cache.data != cache_tag and not ignore_mismatch:
                return False  # "A failure will be reported if the CUDA device property ... is different"
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags=0):
            return Network(int(flags))

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):

            typed = "STRONGLY_TYPED" in NDF.__members__ and network.flags & (1 << int(NDF.STRONGLY_TYPED))
            if typed and {f.name for f in config.flags} & {"FP16", "INT8"}:
                return None  # strongly typed networks refuse precision flags
            if major < 10 and not network.flags & (1 << int(NDF.EXPLICIT_BATCH)):
                return None  # 8.6: ONNX needs an explicit-batch network
            if len(config.profiles) != 1 or network.model is None:
                return None
            model = network.model
            model.graph.name = Path(network.source).name.split(".")[0]
            mx = {n: s[2][0] for n, s in config.profiles[0].shapes.items()}
            del model.metadata_props[:]
            for k, v in (("fake_trt_version", version), ("fake_trt_max_batch", str(min(mx.values())))):
                model.metadata_props.add(key=k, value=v)
            trt.built.append((Path(network.source).name, network.flags, sorted(f.name for f in config.flags)))
            return model.SerializeToString()

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes):
            try:
                engine = FakeEngine(trt, plan)
            except Exception:
                return None
            return engine if engine.version == version else None

    if major < 11:
        FakeEngine.create_execution_context_without_device_memory = _no_memory_context
        FakeContext.device_memory = property(lambda self: self.device_ptr, FakeContext._set_memory)
    else:
        for name in ("create_execution_context_without_device_memory",):
            if hasattr(FakeEngine, name):
                delattr(FakeEngine, name)
        if isinstance(getattr(FakeContext, "device_memory", None), property):
            del FakeContext.device_memory
    if major >= 10:
        FakeContext.set_device_memory = FakeContext._set_memory
    elif hasattr(FakeContext, "set_device_memory"):
        del FakeContext.set_device_memory
    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, OnnxParser
    trt.DataType, trt.TensorIOMode, trt.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
    trt.NetworkDefinitionCreationFlag, trt.BuilderFlag = NDF, BF
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


def add_engines(artifact, version: str = "10.3.0", max_batch: int = 64, precision: str = "fp32") -> None:
    """Build every unit's engine with the REAL `edgeexit.export.tensorrt.build_engines` against the
    simulated TensorRT installed by `install` (the "plan" is the unit's ONNX with the profile max
    and TensorRT version in its metadata), and write the manifest entries it records."""
    import json

    from edgeexit.export.tensorrt import build_engines

    path = artifact / "manifest.json"
    m = json.loads(path.read_text())
    for u in m["units"]:
        u["engines"] = []
    build_engines(artifact, m["units"], half=precision == "fp16", int8=precision == "int8",
                  max_batch=max_batch, workspace_gib=1.0)
    path.write_text(json.dumps(m))
