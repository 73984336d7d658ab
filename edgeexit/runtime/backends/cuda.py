"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no pycuda).

Kept apart so the TensorRT layer stays thin and the error handling lives in one place. The
runtime module is imported once and cached (re-importing it cost 29 µs a call on cuda-python < 12.6).
"""

from __future__ import annotations

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


def cuda_device_info(index: int = 0) -> dict:
    rt = cudart()
    count = check(rt.cudaGetDeviceCount())
    if not count:
        raise UserError("no CUDA device found: the TensorRT backend needs an NVIDIA GPU")
    props = check(rt.cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def graph_instantiate(graph):
    """cudaGraphInstantiate across cuda-python versions: (graph, flags) on 12/13, (graph, log buffer,
    buffer size) on 11."""
    rt = cudart()
    try:
        result = rt.cudaGraphInstantiate(graph, 0)
    except TypeError:
        result = rt.cudaGraphInstantiate(graph, None, 0)
    value = check(result)
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

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr))
