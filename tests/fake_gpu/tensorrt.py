"""A SIMULATED tensorrt module per API surface (8.6 / 10.x / 11.x), over the simulated CUDA runtime.

An "engine" is the unit's ONNX file run by ONNX Runtime; its tensors are read and written through
the simulated device memory of `fake_gpu.cudart`, so the CUDA rules hold for TensorRT's work too.
TensorRT's own rules:

- Address spaces: TensorRT refuses host pointers (``set_tensor_address`` takes device memory
  only), and a buffer too small for the shapes set now.
- Capture: an engine's first enqueue after a shape change does set-up work that capture forbids
  (hence the warm-up run before capture).
- Handles: TensorRT takes the stream as a size_t (``operator.index``), as pybind11 does.
- Builder flags change numerics: an engine built with the FP16 flag (weak typing, 8.6) rounds
  its inputs and outputs to FP16, as the layers the flag covers would; with ``trt.tf32 = True``
  (``install(..., tf32=True)``) every engine rounds its inputs to TF32 (10-bit mantissa), which
  TensorRT enables by default on Ampere and later. Cannot catch: the rounding of intermediate
  layers (only a unit's inputs and outputs are rounded), FP16 accumulation, per-tactic choice. TF32
  is off by default so the data-path tests can compare engines bit-exactly with ONNX Runtime.
- Driver and flavour: ``trt.cuda_major`` is the CUDA major the "wheel" is built for;
  ``trt.Builder(...)`` and ``trt.Runtime(...)`` raise the bare pybind11 TypeError real TensorRT
  raises when the driver is older than that. Cannot catch: what the real wheel names (the
  distribution's name is read from package metadata, which the tests stand in for).
- 256-byte alignment: ``set_tensor_address`` refuses an address that is not a multiple of 256,
  as TensorRT does. Cannot catch: stricter alignment some tactics want.
- 8.6's ``set_optimization_profile_async`` raises RuntimeError on failure, as the real binding does;
  from 9 on it returns False.
- 10.0: no ``device_memory_size_v2`` and no ``set_device_memory`` (those arrive in 10.1), so
  the backend's older spelling (``create_execution_context_without_device_memory`` + the
  ``device_memory`` property) is what runs there.

`FakeEngine` and `FakeContext` are shared by every simulated module: `make_tensorrt` gives them the
methods of its version, so the module made last decides their surface (one version at a time).
Every name a surface defines is checked against that version's real bindings by
tests/test_trt_surface.py. Modelled on TensorRT's name-based tensor API (`set_input_shape`,
`set_tensor_address`, `execute_async_v3`, returning False on failure).
"""

from __future__ import annotations

import ctypes
import operator
import types
import weakref
from enum import IntEnum
from pathlib import Path

import numpy as np

from .cudart import ALIGN, CudaError, FakeCudart, _Fault

try:  # held here: a test that makes onnx unimportable for edgeexit still lets the simulation parse
    import onnx as _onnx
    import onnx.numpy_helper as _numpy_helper
except ImportError:  # pragma: no cover - onnx is a test dependency
    _onnx = _numpy_helper = None


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
        self._needs_setup = True  # the first enqueue after a shape change does set-up work
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
        room = rt.device_room(int(ptr))
        if not room:
            raise RuntimeError("[fake TensorRT] device memory is not a device allocation")
        if room < self.engine.activation_bytes or (size is not None and int(size) < self.engine.activation_bytes):
            raise RuntimeError("[fake TensorRT] device memory smaller than the engine needs")
        self.device_ptr = int(ptr)

    @staticmethod
    def _stream_value(stream) -> int:
        try:
            return operator.index(stream)  # pybind11's size_t: an int or an object with __index__
        except TypeError:
            raise TypeError(f"incompatible function arguments: a stream handle, not {type(stream).__name__}") from None

    def set_optimization_profile_async(self, index, stream) -> bool:
        if index != 0 or self.engine.trt.cudart._stream(self._stream_value(stream)) is None:
            if self.engine.trt.major < 9:  # pyCore.cpp release/8.6: the binding raises on failure
                raise RuntimeError("Error in set optimization profile.")
            return False
        self.profile = 0
        return True

    def _nbytes(self, name: str) -> int | None:
        """Bytes tensor ``name`` spans at the shapes set now (None before an input shape is set)."""
        if name in self.engine.input_names:
            shape = self.shapes.get(name)
            return None if shape is None else 4 * int(np.prod(shape))
        if not self.shapes:
            return None
        return next(iter(self.shapes.values()))[0] * self.engine.out_row_bytes[name]

    def set_input_shape(self, name, shape) -> bool:
        if self.profile != 0 or name not in self.engine.input_names:
            return False
        mn, _, mx = self.engine.profiles[name]
        if len(shape) != len(mx) or any(not lo <= d <= hi for d, lo, hi in zip(shape, mn, mx, strict=True)):
            return False
        if self.shapes.get(name) != tuple(shape):
            self._needs_setup = True
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        """Refuses what a GPU would fault on: a host pointer or garbage (not device memory), and a
        buffer too small for the shape set now."""
        if name not in self.engine.input_names + self.engine.output_names:
            return False
        room = self.engine.trt.cudart.device_room(int(ptr))
        need = self._nbytes(name)
        if not room or (need is not None and room < need) or int(ptr) % ALIGN:
            return False  # TensorRT wants 256-byte aligned tensor addresses
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream) -> bool:
        """Enqueues the run on ``stream``; it happens when the stream runs (a sync). Inputs are read
        and outputs written through their device addresses then: out of bounds is a fault."""
        rt, eng = self.engine.trt.cudart, self.engine
        s = rt._stream(self._stream_value(stream))
        if s is None or self.profile != 0 or (self.memory == "user" and self.device_ptr is None):
            return False
        if any(n not in self.shapes or n not in self.addresses for n in eng.input_names):
            return False
        if any(n not in self.addresses for n in eng.output_names):
            return False
        if self._needs_setup:
            if s.capture is not None:  # set-up work (allocation, sync) is illegal under capture
                s.capture[3] = True
                return False
            self._needs_setup = False
        if s.capture is not None and eng.name in rt.fail_capture_of:
            return False
        self.last_stream = stream  # what TensorRT was handed (the tests check it is an int)
        feeds = {n: (self.addresses[n], self.shapes[n]) for n in eng.input_names}
        outs = {n: (self.addresses[n], self._nbytes(n)) for n in eng.output_names}
        memory = (self.device_ptr, eng.activation_bytes) if self.memory == "user" else None

        me = weakref.ref(self)
        fp16, tf32 = "FP16" in eng.flags, eng.trt.tf32

        def op(feeds=feeds, outs=outs, memory=memory, sess=eng.session):
            if me() is None:  # the context was destroyed with its work still queued
                raise _Fault("execution context destroyed before its enqueued work ran")
            if memory is not None:
                rt.device_memory(*memory)  # the activation memory must still be there
            inputs = {n: _read(rt.device_memory(p, 4 * int(np.prod(s))), s) for n, (p, s) in feeds.items()}
            values = _run_rounded(sess, list(outs), inputs, fp16, tf32)
            for (ptr, nbytes), v in zip(outs.values(), values, strict=True):
                v = np.ascontiguousarray(v, np.float32)
                ctypes.memmove(rt.device_memory(ptr, max(nbytes, v.nbytes)), v.ctypes.data, v.nbytes)

        return rt._enqueue(stream, op)[0] == CudaError.cudaSuccess


def _run_rounded(sess, outs: list, inputs: dict, fp16: bool, tf32: bool) -> list:
    """The unit in ONNX Runtime with the builder's precision applied at its boundary: FP16 (the
    layers the FP16 flag covers compute in FP16) rounds inputs and outputs, TF32 rounds inputs."""
    if fp16:
        inputs = {n: _round_fp16(v) for n, v in inputs.items()}
    elif tf32:
        inputs = {n: _round_tf32(v) for n, v in inputs.items()}
    values = sess.run(outs, inputs)
    return [_round_fp16(v) for v in values] if fp16 else values


def _round_fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _round_tf32(x: np.ndarray) -> np.ndarray:
    """FP32 rounded to TF32's 10-bit mantissa (round to nearest even), kept in FP32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + np.uint32(0x0FFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return u.view(np.float32)


class FakeEngine:
    def __init__(self, trt, plan: bytes) -> None:
        import onnxruntime as ort

        self.trt = trt
        model = _onnx.load_from_string(plan)
        meta = {p.key: p.value for p in model.metadata_props}
        self.version, self.max_batch = meta["fake_trt_version"], int(meta["fake_trt_max_batch"])
        self.flags = set(filter(None, meta.get("fake_trt_flags", "").split(",")))
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
        if trt.has_v2:  # 10.1 and later
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
    init = {t.name: _numpy_helper.to_array(t) for t in model.graph.initializer}
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


# -- the module-level surface: the same in every version ------------------------------------------
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


ExecutionContextAllocationStrategy = IntEnum(  # 10 and later
    "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
)


def _flag_enums(major: int) -> tuple[type[IntEnum], type[IntEnum]]:
    """NetworkDefinitionCreationFlag and BuilderFlag with the members and values of ``major``."""
    if major >= 11:
        ndf = IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        bf = IntEnum("BuilderFlag", {"DEBUG": 2, "REFIT": 3})
    elif major >= 10:
        ndf = IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        bf = IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "REFIT": 3})
    else:
        ndf = IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
        bf = IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "REFIT": 4})
    return ndf, bf


def _needs_driver(trt: types.ModuleType) -> None:
    if trt.cudart.driver_version // 1000 < trt.cuda_major:  # NVIDIA/TensorRT#2913: CUDA init fails
        raise TypeError("pybind11::init(): factory function returned nullptr")


class TimingCache:
    def __init__(self, data: bytes, tag: bytes) -> None:
        self.data, self._tag = data, tag

    def serialize(self):
        return self._tag


class Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.model, self.source = flags, None, None


class OnnxParser:
    def __init__(self, network, logger) -> None:
        self.network, self.errors = network, []

    def parse_from_file(self, path) -> bool:
        model = _onnx.load(str(path))
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
    """A builder config of the simulated module ``trt`` (its BuilderFlag, its timing-cache tag)."""

    def __init__(self, trt: types.ModuleType) -> None:
        self.flags, self.profiles, self.cache = set(), [], None
        self._trt = trt

    def set_memory_pool_limit(self, pool, size) -> None:
        assert pool == MemoryPoolType.WORKSPACE and size > 0

    def set_flag(self, flag) -> None:
        self.flags.add(self._trt.BuilderFlag(flag))

    def create_timing_cache(self, data: bytes):
        return TimingCache(bytes(data), self._trt._cache_tag)

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        if cache.data and cache.data != self._trt._cache_tag and not ignore_mismatch:
            return False  # "A failure will be reported if the CUDA device property ... is different"
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


# -- per module: the user constructs these, so the module they belong to is a class attribute --------
class Builder:
    _trt: types.ModuleType  # set by make_tensorrt (see _bound)

    def __init__(self, logger) -> None:
        _needs_driver(self._trt)
        self.logger = logger

    def create_network(self, flags=0):
        return Network(int(flags))

    def create_builder_config(self):
        return Config(self._trt)

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        trt = self._trt
        ndf = trt.NetworkDefinitionCreationFlag
        typed = "STRONGLY_TYPED" in ndf.__members__ and network.flags & (1 << int(ndf.STRONGLY_TYPED))
        if typed and {f.name for f in config.flags} & {"FP16", "INT8"}:
            return None  # strongly typed networks refuse precision flags
        if trt.major < 10 and not network.flags & (1 << int(ndf.EXPLICIT_BATCH)):
            return None  # 8.6: ONNX needs an explicit-batch network
        if len(config.profiles) != 1 or network.model is None:
            return None
        model = network.model
        model.graph.name = Path(network.source).name.split(".")[0]
        mx = {n: s[2][0] for n, s in config.profiles[0].shapes.items()}
        del model.metadata_props[:]
        flags = ",".join(sorted(f.name for f in config.flags))
        meta = (
            ("fake_trt_version", trt.__version__),
            ("fake_trt_max_batch", str(min(mx.values()))),
            ("fake_trt_flags", flags),
        )
        for k, v in meta:
            model.metadata_props.add(key=k, value=v)
        trt.built.append((Path(network.source).name, network.flags, sorted(f.name for f in config.flags)))
        return model.SerializeToString()


class Runtime:
    _trt: types.ModuleType  # set by make_tensorrt (see _bound)

    def __init__(self, logger) -> None:
        _needs_driver(self._trt)
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes):
        try:
            engine = FakeEngine(self._trt, plan)
        except Exception:
            return None
        return engine if engine.version == self._trt.__version__ else None


def _bound(cls: type, trt: types.ModuleType) -> type:
    """A copy of ``cls`` whose ``_trt`` is ``trt``: a copy rather than a subclass, so the class's own
    namespace holds its methods (tests/test_trt_surface.py reads the names there)."""
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, (), {**namespace, "_trt": trt})


def _set_engine_surface(major: int, has_v2: bool) -> None:
    """Give FakeEngine and FakeContext the device-memory methods of this version (and only those)."""
    if major < 11:
        FakeEngine.create_execution_context_without_device_memory = _no_memory_context
        FakeContext.device_memory = property(lambda self: self.device_ptr, FakeContext._set_memory)
    else:
        for name in ("create_execution_context_without_device_memory",):
            if hasattr(FakeEngine, name):
                delattr(FakeEngine, name)
        if isinstance(getattr(FakeContext, "device_memory", None), property):
            del FakeContext.device_memory
    if has_v2:
        FakeContext.set_device_memory = FakeContext._set_memory
    elif hasattr(FakeContext, "set_device_memory"):
        del FakeContext.set_device_memory


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
    trt.tf32 = False  # engines round their inputs to TF32 (TensorRT's default on Ampere+); see the docstring
    trt.cuda_major = 12  # the CUDA major this "wheel" is built for (tensorrt-cu12 / -cu13)
    minor = int(version.split(".")[1])
    trt.has_v2 = (major, minor) >= (10, 1)  # device_memory_size_v2 / set_device_memory arrived in 10.1
    device = cudart.cudaGetDeviceProperties(0)[1]
    trt._cache_tag = f"{version}|{device.major}.{device.minor}".encode()  # a timing cache is valid for these
    trt.NetworkDefinitionCreationFlag, trt.BuilderFlag = _flag_enums(major)
    if major >= 10:
        trt.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    _set_engine_surface(major, trt.has_v2)
    trt.Logger, trt.OnnxParser = Logger, OnnxParser
    trt.Builder, trt.Runtime = _bound(Builder, trt), _bound(Runtime, trt)
    trt.DataType, trt.TensorIOMode, trt.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
    return trt
