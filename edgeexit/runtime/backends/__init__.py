"""Backends: each implements the `Runner` protocol (runtime/backends/base.py).

Heavy libraries are imported inside each backend module, only when that backend is chosen.
"""

from __future__ import annotations

from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "torch")

__all__ = ["BACKENDS", "HeadOutput", "Runner", "RunnerInfo", "choose_backend", "create_backend"]


def choose_backend(manifest: dict, backend: str = "auto", precision: str | None = None) -> tuple[str, str]:
    """The backend to use and why: 'auto' picks tensorrt > onnxruntime-cuda > onnxruntime-cpu and
    says why it passed over the ones before (e.g. why not TensorRT, or no engines of ``precision``)."""
    from edgeexit.errors import UserError

    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return ("onnxruntime-cpu" if backend == "onnxruntime" else backend), "asked for"
    from edgeexit.runtime.backends.tensorrt import tensorrt_usable

    ok, why = tensorrt_usable(manifest, precision)
    if ok:
        return "tensorrt", why
    from edgeexit.runtime.backends.onnxruntime import cuda_provider_available

    if cuda_provider_available():
        return "onnxruntime-cuda", f"auto, not tensorrt: {why}"
    return "onnxruntime-cpu", f"auto, not tensorrt: {why}; no CUDA execution provider in onnxruntime"


def create_backend(manifest: dict, backend: str = "auto", **options) -> Runner:
    """Instantiate a backend by name (see `choose_backend` for 'auto')."""
    backend, _ = choose_backend(manifest, backend)
    if backend.startswith("onnxruntime"):
        from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, cuda=backend == "onnxruntime-cuda", **options)
    if backend == "torch":
        from edgeexit.runtime.backends.torch import TorchBackend

        return TorchBackend(manifest, **options)
    from edgeexit.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(manifest, **options)
