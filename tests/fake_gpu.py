"""A SIMULATED TensorRT and CUDA runtime, for testing edgeexit's TensorRT backend without a GPU.

This checks *our* logic — buffers, addresses, shapes, compaction, graphs, contexts, lifetimes —
not TensorRT: an "engine" here is the unit's ONNX file run by ONNX Runtime, and "device memory" is
host memory behind addresses of its own, so a GPU's rules can be enforced:

- Address spaces: device pointers (cudaMalloc, and the device alias of mapped pinned host
  memory) live above ``DEVICE_BASE``, a range no host pointer reaches; every copy is checked
  against its ``kind`` and the bounds of the allocations it touches; TensorRT refuses host
  pointers; a kernel that reads or writes past a buffer faults with the sticky
  ``cudaErrorIllegalAddress``, as on a GPU.
- Asynchronous execution: copies, TensorRT enqueues and graph launches are queued on their
  stream and run only at ``cudaStreamSynchronize`` / ``cudaEventSynchronize`` (or a call that is
  synchronous by CUDA's rules: a pageable copy, cudaFree, destroying the stream). Host memory
  read before the sync holds stale data. Pageable host memory behaves as CUDA documents it: an
  H2D copy from it is staged at the call, a D2H copy into it waits for the stream; pinned memory
  (``cudaMallocHost`` / ``cudaHostAlloc``) is read and written when the copy runs.
- Capture rules: while a stream captures, a synchronous call (cudaMalloc/cudaFree/host
  allocation, a pageable copy, syncing the capturing stream) invalidates the capture (ThreadLocal:
  from the capturing thread; Global: from any thread), and so does work on the legacy default
  stream when the capturing stream is a blocking one; ``cudaStreamEndCapture`` then returns
  ``cudaErrorStreamCaptureInvalidated`` and no graph. An engine's first enqueue after a shape
  change does set-up work that capture forbids (hence the warm-up run before capture).
- Handles: streams, events, graphs and graph execs are objects as in cuda-python
  (``int()`` / ``operator.index`` give the value, equal by value within their type), not ints;
  TensorRT takes the stream as a size_t (``operator.index``), as pybind11 does.
- Integrated GPUs: ``FakeCudart.integrated`` makes ``cudaDeviceProp.integrated`` 1
  (a Jetson): mapped pinned memory is then device-visible through ``cudaHostGetDevicePointer``.

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

What the simulation cannot catch (a test passing here says nothing about these; they need a GPU):
- Real kernels and numerics: an "engine" is the ONNX file run by ONNX Runtime in FP32 (with the
  rounding above), so real FP16/INT8 accuracy, TensorRT's layer fusions, tactic choice, timing
  caches and build failures of real TensorRT (unsupported ops, workspace too small) are not exercised.
- Timing: nothing here measures speed; latency tables, CUDA graph gains and copy/compute overlap
  are not real. Queued work runs at the sync, in order, on one host thread: races between two
  real streams, or between a stream and the host beyond the stale-read rule, are not modelled.
- An enqueue that is really synchronous (a driver or TensorRT version that blocks in
  `execute_async_v3`) looks the same as an asynchronous one to our code, and so do drivers whose
  errors arrive later than the call that caused them (only the sticky illegal-address is modelled).
- Memory limits (out-of-memory at cudaMalloc or at context creation), multi-GPU, MIG, MPS,
  driver/runtime version mismatches beyond the checks the backend itself makes, and the Python
  packaging of TensorRT (which wheel, which libs) — tests/test_trt_surface.py checks the names only.
The tests that run on this simulation are marked ``sim`` (``pytest -m sim`` runs them alone).

Every name here is anchored to the real bindings by tests/test_trt_surface.py (cuda-python's
names and enum values; TensorRT's per-version string tables). Modelled on the documented APIs:
TensorRT's name-based tensor API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`,
returning False on failure) and cuda-python's runtime (calls return `(err, *values)`).
"""

from __future__ import annotations

import ctypes
import operator
import sys
import threading
import types
import weakref
from enum import IntEnum
from pathlib import Path

import numpy as np

try:  # held here: a test that makes onnx unimportable for edgeexit still lets the simulation parse
    import onnx as _onnx
    import onnx.numpy_helper as _numpy_helper
except ImportError:  # pragma: no cover - onnx is a test dependency
    _onnx = _numpy_helper = None

DEVICE_BASE = 1 << 56  # simulated device addresses start here (x86-64/arm64 user space ends below 2**48)
ALIGN = 256  # cudaMalloc's alignment


class CudaError(IntEnum):
    """The cudaError_t members the simulation returns, with cuda-python's values (checked)."""

    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureImplicit = 906


class _Handle:
    """As cuda-python's handle types: an object; ``int()`` and ``operator.index`` give its value;
    equal (and hashed) by value within its own type, never equal to an int."""

    __slots__ = ("_value",)

    def __init__(self, value: int = 0) -> None:
        self._value = int(value)

    def __int__(self) -> int:
        return self._value

    __index__ = __int__

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value:#x}>"


class cudaStream_t(_Handle):  # noqa: N801 - cuda-python's names
    pass


class cudaEvent_t(_Handle):  # noqa: N801
    pass


class cudaGraph_t(_Handle):  # noqa: N801
    pass


class cudaGraphExec_t(_Handle):  # noqa: N801
    pass


class _Fault(Exception):
    """A simulated kernel or DMA fault: the context gets the sticky cudaErrorIllegalAddress."""


class _Stream:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.queue: list = []  # ops not yet executed, in order
        self.capture = None  # (ops recorded, mode, thread id, invalidated) while capturing


LEGACY = 0  # the legacy default stream (cudaStreamLegacy is 1 in cuda-python; both mean it here)


class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime over host memory: separate address spaces, queued execution, capture
    rules, sticky errors; counting every live object."""

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t = CudaError
        self.cudaMemcpyKind = IntEnum(
            "cudaMemcpyKind",
            {
                "cudaMemcpyHostToHost": 0,
                "cudaMemcpyHostToDevice": 1,
                "cudaMemcpyDeviceToHost": 2,
                "cudaMemcpyDeviceToDevice": 3,
                "cudaMemcpyDefault": 4,
            },
        )
        self.cudaStreamCaptureMode = IntEnum(
            "cudaStreamCaptureMode",
            {
                "cudaStreamCaptureModeGlobal": 0,
                "cudaStreamCaptureModeThreadLocal": 1,
                "cudaStreamCaptureModeRelaxed": 2,
            },
        )
        self.cudaStream_t, self.cudaEvent_t, self.cudaGraph_t, self.cudaGraphExec_t = (
            cudaStream_t,
            cudaEvent_t,
            cudaGraph_t,
            cudaGraphExec_t,
        )
        self.cudaStreamDefault, self.cudaStreamNonBlocking, self.cudaStreamLegacy = 0, 1, 1
        self.cudaHostAllocDefault, self.cudaHostAllocMapped = 0, 2
        self.allocations: dict[int, np.ndarray] = {}  # device address -> backing memory (cudaMalloc)
        self.pinned: dict[int, np.ndarray] = {}  # host address -> pinned block (cudaMallocHost/HostAlloc)
        self.mapped: dict[int, int] = {}  # device alias -> host address of a mapped pinned block
        self._graveyard: list = []  # freed pinned blocks stay allocated (a stale view must not segfault pytest)
        self.streams: dict[int, _Stream] = {LEGACY: _Stream(0)}
        self.events: dict[int, dict] = {}
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.memcpy_calls = 0
        self.last_error_reads = 0
        self.fail_capture_of: set[str] = set()  # engines whose enqueue returns False under capture
        self.on_capture_begin: list = []  # callables run right after a capture starts (other threads' work)
        self.sticky: CudaError | None = None  # a fault poisons the context, as on a GPU
        self._last = CudaError.cudaSuccess
        self.driver_version = 12080  # what cudaDriverGetVersion reports
        self.runtime_version = 12090  # the CUDA runtime this "cuda-python" links
        self.device_capacity = 8 << 30  # bytes of simulated device memory (OOM beyond)
        self.device_in_use = 0
        self.integrated = False  # cudaDeviceProp.integrated (a Jetson: host and device share DRAM)
        self.can_map_host_memory = True
        self._next = 1000
        self._next_device = DEVICE_BASE

    # -- plumbing ----------------------------------------------------------------------------------
    def _handle(self, cls):
        self._next += 1
        return cls(self._next)

    def _ret(self, err, *values):
        if err != CudaError.cudaSuccess:
            self._last = err
            return (err, *([None] * len(values))) if values else (err,)
        return (err, *values)

    def _gate(self, n_values: int = 0):
        """The sticky error, if any, in the shape of the call's result; else None."""
        if self.sticky is None:
            return None
        return (self.sticky, *([None] * n_values))

    @staticmethod
    def _value(handle, cls) -> int:
        """cuda-python takes its handle type or an int (None: 0)."""
        if handle is None:
            return 0
        if isinstance(handle, cls) or (isinstance(handle, int) and not isinstance(handle, bool)):
            return int(handle)
        raise TypeError(f"Argument must be of type {cls.__name__} or int, not {type(handle).__name__}")

    def _stream(self, handle):
        key = self._value(handle, cudaStream_t)
        return self.streams.get(LEGACY if key in (0, 1) else key)

    def is_device(self, ptr: int) -> bool:
        return int(ptr) >= DEVICE_BASE

    def _device_span(self, ptr: int, nbytes: int):
        """The host address backing device bytes [ptr, ptr+nbytes), or None if they are not all
        inside one live allocation (or mapped block)."""
        ptr, nbytes = int(ptr), int(nbytes)
        for base, buf in self.allocations.items():
            if base <= ptr < base + buf.nbytes:
                return buf.ctypes.data + (ptr - base) if ptr + nbytes <= base + buf.nbytes else None
        for base, host in self.mapped.items():
            buf = self.pinned[host]
            if base <= ptr < base + buf.nbytes:
                return host + (ptr - base) if ptr + nbytes <= base + buf.nbytes else None
        return None

    def device_room(self, ptr: int) -> int:
        """Bytes from ``ptr`` to the end of its device allocation (0 when it is in none)."""
        ptr = int(ptr)
        for base, buf in self.allocations.items():
            if base <= ptr < base + buf.nbytes:
                return base + buf.nbytes - ptr
        for base, host in self.mapped.items():
            if base <= ptr < base + self.pinned[host].nbytes:
                return base + self.pinned[host].nbytes - ptr
        return 0

    def _pinned_block(self, ptr: int):
        ptr = int(ptr)
        return next(((b, a) for b, a in self.pinned.items() if b <= ptr < b + a.nbytes), None)

    def is_pinned(self, ptr: int, nbytes: int = 1) -> bool:
        block = self._pinned_block(ptr)
        return block is not None and int(ptr) + int(nbytes) <= block[0] + block[1].nbytes

    def _capturing_here(self):
        """Captures a synchronous call from this thread invalidates (ThreadLocal: this thread's;
        Global: every one; Relaxed: none)."""
        me = threading.get_ident()
        hit = []
        for s in self.streams.values():
            if s.capture is None:
                continue
            mode, thread = s.capture[1], s.capture[2]
            if mode == 0 or (mode == 1 and thread == me):
                hit.append(s)
        return hit

    def _refused(self, n_values: int = 0):
        """A call CUDA forbids during capture: the sticky error, or the capture error (captures
        invalidated), in the shape of the call's result; None when the call may go on."""
        gate = self._gate(n_values)
        if gate:
            return gate
        err = self._unsafe_call()
        return self._ret(err, *([0] * n_values)) if err else None

    def _unsafe_call(self):
        """A call CUDA forbids during capture: invalidate the captures it touches; the error, or None."""
        hit = self._capturing_here()
        for s in hit:
            s.capture[3] = True
        return CudaError.cudaErrorStreamCaptureUnsupported if hit else None

    def _run(self, stream: _Stream, until=None) -> None:
        """Execute queued ops in order (until ``until()`` holds); a fault makes the error sticky."""
        while stream.queue and not (until is not None and until()):
            op = stream.queue.pop(0)
            if self.sticky is not None:
                continue  # a dead context runs nothing
            try:
                op()
            except _Fault:
                self.sticky = CudaError.cudaErrorIllegalAddress

    def _enqueue(self, handle, op):
        gate = self._gate()
        if gate:
            return gate
        stream = self._stream(handle)
        if stream is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        if stream.capture is not None:
            stream.capture[0].append(op)
            return (CudaError.cudaSuccess,)
        legacy = self.streams[LEGACY]
        if stream is legacy:  # the legacy stream waits for every blocking stream, and they for it
            for s in self.streams.values():
                if s is legacy or s.flags & self.cudaStreamNonBlocking:
                    continue
                if s.capture is not None:
                    s.capture[3] = True  # an implicit dependency on a capturing stream
                    return self._ret(CudaError.cudaErrorStreamCaptureImplicit)
                self._run(s)
        elif not stream.flags & self.cudaStreamNonBlocking:
            self._run(legacy)
        stream.queue.append(op)
        return (CudaError.cudaSuccess,)

    def device_memory(self, ptr: int, nbytes: int):
        """For the fake TensorRT's kernels: the host address behind a device range, or a fault."""
        real = self._device_span(ptr, nbytes)
        if real is None:
            raise _Fault(f"illegal address {int(ptr):#x}+{int(nbytes)}")
        return real

    # -- memory ------------------------------------------------------------------------------------
    def cudaMalloc(self, nbytes):
        refused = self._refused(1)
        if refused:
            return refused
        if self.device_in_use + int(nbytes) > self.device_capacity:
            return self._ret(CudaError.cudaErrorMemoryAllocation, 0)
        buf = np.zeros(int(nbytes), np.uint8)
        ptr = self._next_device
        self._next_device += (int(nbytes) + 2 * ALIGN - 1) // ALIGN * ALIGN  # a gap after every block
        self.allocations[ptr] = buf
        return (CudaError.cudaSuccess, ptr)

    def _sync_device(self) -> None:
        for s in self.streams.values():
            if s.capture is None:
                self._run(s)

    def cudaFree(self, ptr):
        refused = self._refused()
        if refused:
            return refused
        self._sync_device()  # cudaFree synchronises the device
        if self.allocations.pop(int(ptr), None) is None:
            return self._ret(CudaError.cudaErrorInvalidValue)
        return (CudaError.cudaSuccess,)

    def cudaMallocHost(self, nbytes):
        return self.cudaHostAlloc(nbytes, self.cudaHostAllocDefault)

    def cudaHostAlloc(self, nbytes, flags):
        refused = self._refused(1)
        if refused:
            return refused
        buf = np.zeros(max(1, int(nbytes)), np.uint8)
        self.pinned[buf.ctypes.data] = buf
        if int(flags) & self.cudaHostAllocMapped and self.can_map_host_memory:
            alias = self._next_device
            self._next_device += (buf.nbytes + 2 * ALIGN - 1) // ALIGN * ALIGN
            self.mapped[alias] = buf.ctypes.data
        return (CudaError.cudaSuccess, buf.ctypes.data)

    def cudaHostGetDevicePointer(self, host, flags):
        gate = self._gate(1)
        if gate:
            return gate
        alias = next((d for d, h in self.mapped.items() if h == int(host)), None)
        if alias is None or int(flags) != 0:
            return self._ret(CudaError.cudaErrorInvalidValue, 0)
        return (CudaError.cudaSuccess, alias)

    def cudaFreeHost(self, ptr):
        refused = self._refused()
        if refused:
            return refused
        self._sync_device()
        buf = self.pinned.pop(int(ptr), None)
        if buf is None:
            return self._ret(CudaError.cudaErrorInvalidValue)
        self.mapped = {d: h for d, h in self.mapped.items() if h != int(ptr)}
        self._graveyard.append(buf)
        return (CudaError.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):  # noqa: C901
        """Checked as a GPU does: the kind against the address spaces, the device side (and a
        pinned host side) against its allocation; pageable host memory synchronises (see module)."""
        gate = self._gate()
        if gate:
            return gate
        self.memcpy_calls += 1
        dst, src, n, kind = int(dst), int(src), int(nbytes), int(kind)
        want = {1: (False, True), 2: (True, False), 3: (True, True), 0: (False, False)}
        if kind == 4:  # cudaMemcpyDefault: inferred from the pointers (unified addressing)
            kind = {(False, True): 1, (True, False): 2, (True, True): 3, (False, False): 0}[
                (self.is_device(src), self.is_device(dst))
            ]
        if kind not in want or want[kind] != (self.is_device(src), self.is_device(dst)):
            return self._ret(CudaError.cudaErrorInvalidValue)
        s = self._stream(stream)
        if s is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)

        def side(ptr):
            if self.is_device(ptr):
                return "device" if self._device_span(ptr, n) is not None else None
            block = self._pinned_block(ptr)
            if block is None:
                return "pageable"
            return "pinned" if ptr + n <= block[0] + block[1].nbytes else None

        sides = (side(src), side(dst))
        if None in sides:
            return self._ret(CudaError.cudaErrorInvalidValue)  # out of bounds of an allocation
        pageable = "pageable" in sides
        if pageable and s.capture is not None:
            s.capture[3] = True
            return self._ret(CudaError.cudaErrorStreamCaptureUnsupported)

        def resolve(ptr, kind_):
            if kind_ == "device":
                return self.device_memory(ptr, n)
            if kind_ == "pinned" and not self.is_pinned(ptr, n):
                raise _Fault("pinned host memory freed before the copy ran")
            return ptr

        if sides[0] == "pageable" and kind == 1:
            staged = ctypes.create_string_buffer(ctypes.string_at(src, n), n)  # staged at the call
            self._run(s)  # "a stream sync is performed before the copy is initiated"

            def op(staged=staged):
                ctypes.memmove(resolve(dst, sides[1]), staged, n)

            return self._enqueue(stream, op)

        def op():
            ctypes.memmove(resolve(dst, sides[1]), resolve(src, sides[0]), n)

        if sides[1] == "pageable":  # D2H into pageable memory returns once the copy is done
            self._run(s)
            if self.sticky is not None:
                return self._ret(self.sticky)
            try:
                op()
            except _Fault:
                self.sticky = CudaError.cudaErrorIllegalAddress
                return self._ret(self.sticky)
            return (CudaError.cudaSuccess,)
        return self._enqueue(stream, op)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        gate = self._gate()
        if gate:
            return gate
        ptr, n = int(ptr), int(nbytes)
        if not self.is_device(ptr) or self._device_span(ptr, n) is None:
            return self._ret(CudaError.cudaErrorInvalidValue)

        def op():
            ctypes.memset(self.device_memory(ptr, n), int(value), n)

        return self._enqueue(stream, op)

    # -- streams, events and graphs ----------------------------------------------------------------
    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(self.cudaStreamDefault)

    def cudaStreamCreateWithFlags(self, flags):
        gate = self._gate(1)
        if gate:
            return gate
        self.stream_flags = int(flags)
        h = self._handle(cudaStream_t)
        self.streams[int(h)] = _Stream(int(flags))
        return (CudaError.cudaSuccess, h)

    def cudaStreamDestroy(self, stream):
        key = self._value(stream, cudaStream_t)
        s = self.streams.get(key)
        if s is None or key == LEGACY:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        self._run(s)  # pending work completes before the stream's resources go
        del self.streams[key]
        return (CudaError.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        gate = self._gate()
        if gate:
            return gate
        s = self._stream(stream)
        if s is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        if s.capture is not None:  # illegal on a capturing stream: the capture is lost
            s.capture[3] = True
            return self._ret(CudaError.cudaErrorStreamCaptureUnsupported)
        self._run(s)
        return self._ret(self.sticky) if self.sticky is not None else (CudaError.cudaSuccess,)

    def cudaDeviceSynchronize(self):
        refused = self._refused()
        if refused:
            return refused
        self._sync_device()
        return self._ret(self.sticky) if self.sticky is not None else (CudaError.cudaSuccess,)

    def cudaEventCreate(self):
        h = self._handle(cudaEvent_t)
        self.events[int(h)] = {"stream": None, "done": True}
        return (CudaError.cudaSuccess, h)

    def cudaEventRecord(self, event, stream):
        ev = self.events.get(self._value(event, cudaEvent_t))
        s = self._stream(stream)
        if ev is None or s is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        token = object()
        ev.update(stream=s, done=False, token=token)

        def mark(ev=ev, token=token):
            if ev.get("token") is token:
                ev["done"] = True

        return self._enqueue(stream, mark)

    def cudaEventSynchronize(self, event):
        gate = self._gate()
        if gate:
            return gate
        ev = self.events.get(self._value(event, cudaEvent_t))
        if ev is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        if ev["stream"] is not None:
            self._run(ev["stream"], until=lambda: ev["done"])
        return self._ret(self.sticky) if self.sticky is not None else (CudaError.cudaSuccess,)

    def cudaEventQuery(self, event):
        ev = self.events.get(self._value(event, cudaEvent_t))
        if ev is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        return (CudaError.cudaSuccess,) if ev["done"] else (CudaError.cudaErrorNotReady,)

    def cudaEventDestroy(self, event):
        if self.events.pop(self._value(event, cudaEvent_t), None) is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        return (CudaError.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        gate = self._gate()
        if gate:
            return gate
        s = self._stream(stream)
        if s is None or s is self.streams[LEGACY] or s.capture is not None:
            return self._ret(
                CudaError.cudaErrorInvalidValue if s is not None else CudaError.cudaErrorInvalidResourceHandle
            )
        s.capture = [[], int(mode), threading.get_ident(), False]
        for hook in list(self.on_capture_begin):
            hook(self)
        return (CudaError.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        s = self._stream(stream)
        if s is None or s.capture is None:
            return self._ret(CudaError.cudaErrorInvalidValue, None)
        ops, _, _, invalidated = s.capture
        s.capture = None
        if invalidated:
            return self._ret(CudaError.cudaErrorStreamCaptureInvalidated, None)
        h = self._handle(cudaGraph_t)
        self.graphs[int(h)] = ops
        return (CudaError.cudaSuccess, h)

    def cudaGraphInstantiateWithFlags(self, graph, flags):
        gate = self._gate(1)
        if gate:
            return gate
        ops = self.graphs.get(self._value(graph, cudaGraph_t))
        if ops is None:
            return self._ret(CudaError.cudaErrorInvalidValue, None)
        h = self._handle(cudaGraphExec_t)
        self.execs[int(h)] = list(ops)
        return (CudaError.cudaSuccess, h)

    def cudaGraphLaunch(self, exec_graph, stream):
        ops = self.execs.get(self._value(exec_graph, cudaGraphExec_t))
        if ops is None:
            return self._ret(CudaError.cudaErrorInvalidResourceHandle)
        for op in ops:
            res = self._enqueue(stream, op)
            if res[0] != CudaError.cudaSuccess:
                return res
        return (CudaError.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        if self.graphs.pop(self._value(graph, cudaGraph_t), None) is None:
            return self._ret(CudaError.cudaErrorInvalidValue)
        return (CudaError.cudaSuccess,)

    def cudaGraphExecDestroy(self, exec_graph):
        if self.execs.pop(self._value(exec_graph, cudaGraphExec_t), None) is None:
            return self._ret(CudaError.cudaErrorInvalidValue)
        return (CudaError.cudaSuccess,)

    # -- errors and devices ------------------------------------------------------------------------
    def cudaGetLastError(self):
        """The last error, reset unless it is sticky."""
        self.last_error_reads += 1
        err = self.sticky if self.sticky is not None else self._last
        self._last = CudaError.cudaSuccess
        return (err,)

    def cudaGetErrorName(self, err):
        return (CudaError.cudaSuccess, CudaError(int(err)).name.encode())

    def cudaDriverGetVersion(self):
        return (CudaError.cudaSuccess, self.driver_version)

    def cudaRuntimeGetVersion(self):
        return (CudaError.cudaSuccess, self.runtime_version)

    def cudaGetDeviceCount(self):
        return (CudaError.cudaSuccess, 1)

    def cudaGetDeviceProperties(self, index):
        return (
            CudaError.cudaSuccess,
            types.SimpleNamespace(
                name=b"Simulated GPU\x00",
                major=8,
                minor=7,
                integrated=int(self.integrated),
                canMapHostMemory=int(self.can_map_host_memory),
            ),
        )

    def pending(self) -> int:
        """Ops queued on every stream and not yet run (for the tests)."""
        return sum(len(s.queue) for s in self.streams.values())

    def live(self) -> dict:
        return {
            "buffers": len(self.allocations),
            "streams": len(self.streams) - 1,  # the legacy stream is always there
            "graphs": len(self.graphs),
            "graph_execs": len(self.execs),
            "pinned": len(self.pinned),
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


def make_tensorrt(cudart: FakeCudart, version: str = "10.3.0", max_batch: int = 64) -> types.ModuleType:  # noqa: C901
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

    def _needs_driver() -> None:
        if cudart.driver_version // 1000 < trt.cuda_major:  # NVIDIA/TensorRT#2913: CUDA init fails
            raise TypeError("pybind11::init(): factory function returned nullptr")

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
            _needs_driver()
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
            flags = ",".join(sorted(f.name for f in config.flags))
            meta = (
                ("fake_trt_version", version),
                ("fake_trt_max_batch", str(min(mx.values()))),
                ("fake_trt_flags", flags),
            )
            for k, v in meta:
                model.metadata_props.add(key=k, value=v)
            trt.built.append((Path(network.source).name, network.flags, sorted(f.name for f in config.flags)))
            return model.SerializeToString()

    class Runtime:
        def __init__(self, logger) -> None:
            _needs_driver()
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
    if trt.has_v2:
        FakeContext.set_device_memory = FakeContext._set_memory
    elif hasattr(FakeContext, "set_device_memory"):
        del FakeContext.set_device_memory
    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, OnnxParser
    trt.DataType, trt.TensorIOMode, trt.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
    trt.NetworkDefinitionCreationFlag, trt.BuilderFlag = NDF, BF
    return trt


def install(monkeypatch, version: str = "10.3.0", max_batch: int = 64, tf32: bool = False):
    """Put the simulated tensorrt and cuda.bindings.runtime in sys.modules; returns (trt, cudart)."""
    from edgeexit.runtime.backends import cuda

    cudart = FakeCudart()
    trt = make_tensorrt(cudart, version, max_batch)
    trt.tf32 = tf32
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
    build_engines(
        artifact, m["units"], half=precision == "fp16", int8=precision == "int8", max_batch=max_batch, workspace_gib=1.0
    )
    path.write_text(json.dumps(m))
