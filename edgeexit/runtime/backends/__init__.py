"""Backends behind one runner interface (Polygraphy-style): load and validate once, lean hot path.

A backend runs unit k on backend-native arrays:
- ``from_host(x)``: float32 (N, C, H, W) numpy → native array;
- ``run_segment(k, state) -> state`` and ``run_head(k, tap) -> HeadOutput``;
- ``take(state, rows)``: keep only ``rows`` of every state tensor (batch compaction).
Heavy libraries are imported inside each backend module, only when that backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "torch")


@dataclass
class HeadOutput:
    """What the cascade reads back from a head: confidences for all rows, logits on demand."""

    confidence: np.ndarray  # (N,) float
    _logits: object
    _fetch: object = None  # callable(native logits, rows | None) -> numpy, for device backends

    def logits(self, rows: np.ndarray | None = None) -> np.ndarray:
        if self._fetch is not None:
            return self._fetch(self._logits, rows)
        return self._logits if rows is None else self._logits[rows]


def create_backend(manifest: dict, backend: str = "auto", **options):
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
