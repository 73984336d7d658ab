"""A SIMULATED CUDA runtime: cuda-python's ``cuda.bindings.runtime`` over host memory.

"Device memory" is host memory behind addresses of its own, so a GPU's rules can be enforced:

- Address spaces: device pointers (cudaMalloc, and the device alias of mapped pinned host
  memory) live above ``DEVICE_BASE``, a range no host pointer reaches; every copy is checked
  against its ``kind`` and the bounds of the allocations it touches; a kernel that reads or writes
  past a buffer faults with the sticky ``cudaErrorIllegalAddress``, as on a GPU.
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
  ``cudaErrorStreamCaptureInvalidated`` and no graph.
- Handles: streams, events, graphs and graph execs are objects as in cuda-python
  (``int()`` / ``operator.index`` give the value, equal by value within their type), not ints.
- Integrated GPUs: ``FakeCudart.integrated`` makes ``cudaDeviceProp.integrated`` 1
  (a Jetson): mapped pinned memory is then device-visible through ``cudaHostGetDevicePointer``.

Every ``cuda...`` name and enum value here is checked against the real cuda-python by
tests/test_trt_surface.py; calls return ``(err, *values)`` as cuda-python's do.
"""

from __future__ import annotations

import ctypes
import threading
import types
from enum import IntEnum

import numpy as np

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
