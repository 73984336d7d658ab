"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (no torch, no pycuda).

Kept apart so the TensorRT layer stays thin and the error handling lives in one place.
"""

from __future__ import annotations

from edgeexit.errors import UserError


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise UserError(
                "cuda-python is not installed: `pip install cuda-python` (needed by the TensorRT backend)"
            ) from None
    return runtime


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


def cuda_device_info(index: int = 0) -> dict:
    rt = cudart()
    count = check(rt.cudaGetDeviceCount())
    if not count:
        raise UserError("no CUDA device found: the TensorRT backend needs an NVIDIA GPU")
    props = check(rt.cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


class DeviceBuffer:
    """A cudaMalloc'd block; freed on close."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = int(check(cudart().cudaMalloc(max(1, self.nbytes))))

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0
