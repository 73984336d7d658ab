"""Backends: each implements the `Runner` protocol (runtime/backends/base.py).

Heavy libraries are imported inside each backend module, only when that backend is chosen.
"""

from __future__ import annotations

from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "torch")

__all__ = ["BACKENDS", "HeadOutput", "Runner", "RunnerInfo", "create_backend"]


def create_backend(manifest: dict, backend: str = "auto", **options) -> Runner:
    """Instantiate a backend by name; 'auto' picks tensorrt > onnxruntime-cuda > onnxruntime-cpu."""
    from edgeexit.errors import UserError

    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        from edgeexit.runtime.backends.tensorrt import tensorrt_usable

        if tensorrt_usable(manifest):
            backend = "tensorrt"
        else:
            from edgeexit.runtime.backends.onnxruntime import cuda_provider_available

            backend = "onnxruntime-cuda" if cuda_provider_available() else "onnxruntime-cpu"
    if backend == "onnxruntime":
        backend = "onnxruntime-cpu"
    if backend.startswith("onnxruntime"):
        from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, cuda=backend == "onnxruntime-cuda", **options)
    if backend == "torch":
        from edgeexit.runtime.backends.torch import TorchBackend

        return TorchBackend(manifest, **options)
    from edgeexit.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(manifest, **options)
