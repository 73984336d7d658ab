"""Cascaded early-exit runtime. Imports and runs with numpy + onnxruntime only (no torch).

from edgeexit.runtime import Cascade
cascade = Cascade.load("model.edgeexit", backend="auto")
pred = cascade.predict(frame)      # uint8 HxWxC (RGB unless input_order="BGR") or float CxHxW
"""

from edgeexit.runtime.backends.options import OnnxRuntimeOptions, TensorRTOptions, TorchOptions
from edgeexit.runtime.cascade import Cascade, CascadeOptions, Prediction
from edgeexit.runtime.streams import StreamResult, Streams

__all__ = [
    "Cascade",
    "CascadeOptions",
    "OnnxRuntimeOptions",
    "Prediction",
    "StreamResult",
    "Streams",
    "TensorRTOptions",
    "TorchOptions",
]
