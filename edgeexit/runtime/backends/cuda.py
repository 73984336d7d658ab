"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no pycuda).

Kept apart so the TensorRT layer stays thin and the error handling lives in one place. The
runtime module is imported once and cached (re-importing it cost 29 µs a call on cuda-python < 12.6).
"""

from __future__ import annotations

import ctypes

import numpy as np

from edgeexit.errors import UserError

_runtime = None  # the cuda-python runtime module, once imported


def cudart():
    global _runtime
    if _runtime is None:
        try:
            from cuda.bindings import runtime  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart as runtime  # older cuda-python
            except ImportError:
                raise UserError(
                    "cuda-python is not installed: `pip install cuda-python` (needed by the TensorRT backend)"
                ) from None
        _runtime = runtime
    return _runtime


def check(result):
    """cuda-python calls return (err, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    rt = cudart()
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        _, name = rt.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def clear_error() -> None:
    """Reset the runtime's sticky 'last error' after a failure we recovered from (as trtexec does)."""
    cudart().cudaGetLastError()


def check_driver() -> None:
    """cuda-python N links the CUDA N runtime, which needs a driver of CUDA N or newer; say so
    instead of failing later with cudaErrorInsufficientDriver."""
    rt = cudart()
    err, driver = rt.cudaDriverGetVersion()
    err2, runtime = rt.cudaRuntimeGetVersion()
    if int(err) != int(rt.cudaError_t.cudaSuccess) or int(err2) != int(rt.cudaError_t.cudaSuccess):
        return  # reported by the next call with its own error name
    driver, runtime = int(driver), int(runtime)
    if driver == 0:
        raise UserError("no NVIDIA driver found (cudaDriverGetVersion is 0): the TensorRT backend needs one")
    if driver // 1000 < runtime // 1000:
        raise UserError(
            f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but this cuda-python is "
            f"built for CUDA {runtime // 1000}.{runtime % 1000 // 10}: "
            f"`pip install 'cuda-python<{driver // 1000 + 1}'` "
            f"(with the matching tensorrt-cu{driver // 1000}), or update the driver"
        )


def cuda_device_info(index: int = 0) -> dict:
    rt = cudart()
    check_driver()
    count = check(rt.cudaGetDeviceCount())
    if not count:
        raise UserError("no CUDA device found: the TensorRT backend needs an NVIDIA GPU")
    props = check(rt.cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {
        "name": name.rstrip("\x00"),
        "compute_capability": f"{props.major}.{props.minor}",
        # an integrated GPU (Jetson) shares DRAM with the CPU: mapped pinned memory needs no copy
        "integrated": bool(props.integrated) and bool(props.canMapHostMemory),
    }


def create_stream():
    """A non-blocking stream (as TensorRT's samples/common/common.h): work on the legacy default
    stream from another thread neither serialises with it nor invalidates its captures."""
    rt = cudart()
    return check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))


def graph_instantiate(graph):
    """``cudaGraphInstantiateWithFlags(graph, 0)``: the same signature on cuda-python 11.8, 12.x and
    13.x (11's ``cudaGraphInstantiate`` takes a char* log buffer that None cannot fill)."""
    value = check(cudart().cudaGraphInstantiateWithFlags(graph, 0))
    return value[0] if isinstance(value, tuple) else value


def copy_rows(dst: int, src: int, rows, row_bytes: int, kind, stream) -> None:
    """Copy ``rows`` (ascending) of ``row_bytes`` each from ``src`` to consecutive rows at ``dst``:
    one cudaMemcpyAsync per run of consecutive rows, not one per row."""
    rt = cudart()
    j, n = 0, len(rows)
    while j < n:
        start = j
        while j + 1 < n and rows[j + 1] == rows[j] + 1:
            j += 1
        count = j - start + 1
        check(
            rt.cudaMemcpyAsync(
                dst + start * row_bytes, src + int(rows[start]) * row_bytes, count * row_bytes, kind, stream
            )
        )
        j += 1


class DeviceBuffer:
    """A cudaMalloc'd block; freed on close (idempotent)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMalloc(max(1, self.nbytes))))

    def close(self, strict: bool = True) -> None:
        """Free once; ``strict=False`` (teardown) ignores errors so one failure frees the rest."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            try:
                check(cudart().cudaFree(ptr))
            except Exception:
                if strict:
                    raise


class HostBuffer:
    """Page-locked host memory: ``cudaMallocHost``, freed with ``cudaFreeHost``. Copies from
    and to it are truly asynchronous (a pageable copy is staged and synchronous), so whatever reads
    it must wait for the stream first. ``mapped=True`` (an integrated GPU): ``cudaHostAlloc`` with
    ``cudaHostAllocMapped``, and ``device_ptr`` is the address kernels use for the same bytes (zero
    copy). ``array()`` is a numpy view of the bytes; it must not outlive ``close()``."""

    def __init__(self, nbytes: int, mapped: bool = False) -> None:
        rt = cudart()
        self.nbytes = max(1, int(nbytes))
        self.device_ptr: int | None = None
        if mapped:
            self.ptr = int(check(rt.cudaHostAlloc(self.nbytes, rt.cudaHostAllocMapped)))
            try:
                self.device_ptr = int(check(rt.cudaHostGetDevicePointer(self.ptr, 0)))
            except BaseException:
                self.close(strict=False)
                raise
        else:
            self.ptr = int(check(rt.cudaMallocHost(self.nbytes)))

    def mapped_ptr(self) -> int:
        """``device_ptr`` of a ``mapped=True`` buffer."""
        if self.device_ptr is None:
            raise ValueError("this HostBuffer was not allocated with mapped=True: it has no device address")
        return self.device_ptr

    def array(self, dtype=np.float32) -> np.ndarray:
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        return np.ctypeslib.as_array(raw).view(dtype)

    def close(self, strict: bool = True) -> None:
        """Free once; ``strict=False`` (teardown) ignores errors."""
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            try:
                check(cudart().cudaFreeHost(ptr))
            except Exception:
                if strict:
                    raise
