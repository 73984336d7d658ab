"""Typed options of each backend: what `Cascade.load(..., backend_options=...)` and `create_backend` take.

One frozen dataclass per backend family, whose fields are that backend constructor's options, so a
misspelt or misplaced option (``threads`` on TensorRT) is refused by name before anything loads.
``precision=None`` means the backend's own default (fp32 where it was built; see `choose_backend`).
No heavy import here: options exist before a backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """The options every backend takes."""

    BACKENDS: ClassVar[tuple[str, ...]] = ()
    precision: str | None = None  # fp32, int8 (ONNX Runtime, TensorRT), fp16 (TensorRT); None: default

    def constructor_kwargs(self) -> dict:
        """The keyword arguments of the backend's constructor (precision left out when None)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        if kw["precision"] is None:
            del kw["precision"]
        return kw


@dataclass(frozen=True, slots=True)
class OnnxRuntimeOptions(BackendOptions):
    """onnxruntime-cpu / onnxruntime-cuda. ``threads``: intra-op threads (1 by default, None: ONNX
    Runtime's own); ``io_binding``: keep state on the device (None: on for CUDA)."""

    BACKENDS: ClassVar[tuple[str, ...]] = ("onnxruntime-cpu", "onnxruntime-cuda")
    threads: int | None = 1
    io_binding: bool | None = None


@dataclass(frozen=True, slots=True)
class TorchOptions(BackendOptions):
    """torch (the checkpoint beside the units). ``device``: cuda/cpu (None: cuda when available)."""

    BACKENDS: ClassVar[tuple[str, ...]] = ("torch",)
    device: str | None = None
    cuda_graphs: bool = True
    max_graphs: int = 64


@dataclass(frozen=True, slots=True)
class TensorRTOptions(BackendOptions):
    """tensorrt (the artifact's engines). ``cuda_graphs``: replay each unit as a captured graph."""

    BACKENDS: ClassVar[tuple[str, ...]] = ("tensorrt",)
    cuda_graphs: bool = True


OPTION_TYPES: tuple[type[BackendOptions], ...] = (OnnxRuntimeOptions, TorchOptions, TensorRTOptions)


def options_type(backend: str) -> type[BackendOptions]:
    """The options class of a concrete backend name (not 'auto': choose first)."""
    for cls in OPTION_TYPES:
        if backend in cls.BACKENDS:
            return cls
    names = ", ".join(b for c in OPTION_TYPES for b in c.BACKENDS)
    raise ValueError(f"no options for backend '{backend}': use one of {names}")


def option_names() -> frozenset[str]:
    """Every option name of any backend (what `Cascade.load` accepts as a plain keyword)."""
    return frozenset(f.name for cls in OPTION_TYPES for f in fields(cls))


def backend_options(backend: str, options: BackendOptions | None = None, **changes) -> BackendOptions:
    """The typed options for ``backend``: ``options`` (which must be of that backend's class), or its
    defaults, with ``changes`` (keyword options, the earlier spelling) applied. An option the backend
    does not have is a TypeError that names it and the backend's options."""
    cls = options_type(backend)
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"backend {backend} takes {cls.__name__}, got {type(options).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(
            f"the {backend} backend has no option {', '.join(unknown)} (its options: {', '.join(sorted(known))})"
        )
    base = options if options is not None else cls()
    return replace(base, **changes) if changes else base


__all__ = [
    "BackendOptions",
    "OnnxRuntimeOptions",
    "TensorRTOptions",
    "TorchOptions",
    "backend_options",
    "option_names",
    "options_type",
]
