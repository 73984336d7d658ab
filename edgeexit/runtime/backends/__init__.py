"""Backends: each implements the `Runner` protocol (runtime/backends/base.py).

Heavy libraries are imported inside each backend module, only when that backend is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeexit.runtime.backends.base import GraphStats, HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.backends.options import (
    BackendOptions,
    OnnxRuntimeOptions,
    TensorRTOptions,
    TorchOptions,
    backend_options,
)

if TYPE_CHECKING:
    from edgeexit.runtime.artifact import Artifact

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "torch")

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "GraphStats",
    "HeadOutput",
    "OnnxRuntimeOptions",
    "Runner",
    "RunnerInfo",
    "TensorRTOptions",
    "TorchOptions",
    "backend_options",
    "choose_backend",
    "create_backend",
]


def choose_backend(artifact: Artifact | None, backend: str = "auto", precision: str | None = None) -> tuple[str, str]:
    """The backend to use and why: 'auto' picks tensorrt > onnxruntime-cuda > onnxruntime-cpu and
    says why it passed over the ones before (e.g. why not TensorRT, or no engines of ``precision``).
    ``artifact`` None: what auto would pick for an artifact with engines (doctor without one)."""
    from edgeexit.errors import UserError

    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return ("onnxruntime-cpu" if backend == "onnxruntime" else backend), "asked for"
    from edgeexit.runtime.backends.tensorrt import tensorrt_usable

    ok, why = tensorrt_usable(artifact, precision)
    if ok:
        return "tensorrt", why
    if precision == "fp16":  # only TensorRT runs fp16: no backend to fall back to, say why
        raise UserError(
            f"fp16 runs on TensorRT only, and auto cannot use it here ({why}): build fp16 engines on this device "
            "with `edgeexit engines ARTIFACT --half`, or run fp32 / int8 on ONNX Runtime"
        )
    from edgeexit.runtime.backends.onnxruntime import cuda_provider_available

    if cuda_provider_available():
        return "onnxruntime-cuda", f"auto, not tensorrt: {why}"
    return "onnxruntime-cpu", f"auto, not tensorrt: {why}; no CUDA execution provider in onnxruntime"


def create_backend(
    artifact: Artifact, backend: str = "auto", options: BackendOptions | None = None, **changes
) -> Runner:
    """Instantiate a backend by name (see `choose_backend` for 'auto') over ``artifact``.
    ``options``: that backend's typed options (`OnnxRuntimeOptions`, `TorchOptions`,
    `TensorRTOptions`); ``changes``: the same options by keyword (``Cascade.load(path, precision="int8")``)."""
    precision = options.precision if options is not None else changes.get("precision")
    backend, _ = choose_backend(artifact, backend, precision)
    kw = backend_options(backend, options, **changes).constructor_kwargs()
    if backend.startswith("onnxruntime"):
        from edgeexit.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifact, cuda=backend == "onnxruntime-cuda", **kw)
    if backend == "torch":
        from edgeexit.runtime.backends.torch import TorchBackend

        return TorchBackend(artifact, **kw)
    from edgeexit.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(artifact, **kw)
