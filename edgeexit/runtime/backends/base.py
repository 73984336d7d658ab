"""The `Runner` protocol: what every backend implements, in full (modelled on Polygraphy's BaseRunner).

A runner executes the artifact's units on backend-native arrays. The cascade, calibrate and bench
call only these methods; none of them probes a backend with ``hasattr``.

- ``info``: a `RunnerInfo` (name, version, device, precision, max batch, whether it fuses);
- ``thread_safe``: may several threads call it at once? (if not, `Cascade` serialises calls);
- ``from_host(x)``: float32 (N, C, H, W) numpy → state, a tuple of native arrays;
- ``run_segment(pos, state) -> state`` and ``run_head(pos, tap) -> HeadOutput`` (0-based positions);
- ``run_segments(first_pos, last_pos, state, fuse=True)``: segments first..last back to back (the
  default runs them one by one; `Cascade` calls it only for timed groups);
- ``run_exit(first_pos, pos, state, fuse=True) -> (state, HeadOutput)``: segments first..pos, then
  head pos: the one exit step every walker of the cascade calls. The default calls the two above; a
  runner that fuses (``info.fuses``: ONNX Runtime) runs them as one graph call once ``prepare``
  built it. ``fuse=False``: one call per unit, whatever the runner could fuse (a view with fusion
  off shares the runner with views that fuse);
- ``prepare(plan, fuse)``: called before a new `CascadePlan` is used (build fused graphs, ...);
- ``forget(plans)``: free what ``prepare`` built for groups none of ``plans`` uses (profiling
  builds every group once);
- ``take(state, rows)``: keep only ``rows`` of every state tensor (batch compaction);
- ``synchronize()``: wait for queued device work (timing); ``close()``: free everything;
- ``graph_stats()``: a read-only `GraphStats` of the CUDA graphs it captured (none by default).
Heavy libraries are imported inside each backend module, only when that backend is chosen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np


@dataclass(frozen=True)
class RunnerInfo:
    name: str  # onnxruntime-cpu, onnxruntime-cuda, torch-cpu, torch-cuda, tensorrt
    version: str
    device: str  # CPU model or GPU name
    precision: str = "fp32"
    max_batch: int | None = None  # None: no limit but memory
    fuses: bool = False  # run_segments / run_exit fuse the units they are given into one call
    extra: dict = field(default_factory=dict)  # e.g. compute_capability for GPUs


@dataclass(frozen=True)
class GraphStats:
    """A read-only summary of a runner's CUDA graphs. ``captured``: (unit name, batch bucket) ->
    graphs kept for it (one per set of input addresses, so a bucket can hold several); ``failed``:
    (unit name, batch bucket) -> captures that failed (that unit then runs without a graph at that
    bucket); ``capacity``: the most graphs the runner keeps."""

    captured: Mapping[tuple[str, int], int]
    failed: Mapping[tuple[str, int], int]
    capacity: int

    @classmethod
    def of(cls, captured: Mapping, failed: Mapping, capacity: int) -> GraphStats:
        """From plain dicts, copied and wrapped read-only: later captures do not change it."""
        return cls(MappingProxyType(dict(captured)), MappingProxyType(dict(failed)), int(capacity))

    @property
    def count(self) -> int:
        """Graphs kept in all."""
        return sum(self.captured.values())


class HeadOutput:
    """What the cascade reads back from a head: confidences for all rows, logits on demand."""

    __slots__ = ("confidence", "_logits", "_fetch")

    def __init__(self, confidence: np.ndarray, logits, fetch=None) -> None:
        self.confidence = confidence  # (N,) float
        self._logits = logits
        self._fetch = fetch  # callable(native logits, rows | None) -> numpy, for device backends

    def logits(self, rows: np.ndarray | None = None) -> np.ndarray:
        if self._fetch is not None:
            return self._fetch(self._logits, rows)
        return self._logits if rows is None else self._logits[rows]


class Runner(ABC):
    """Base class of every backend. Subclasses set ``info`` and ``thread_safe`` in ``__init__``."""

    info: RunnerInfo
    thread_safe: bool = False

    @abstractmethod
    def from_host(self, x: np.ndarray) -> tuple: ...

    @abstractmethod
    def run_segment(self, pos: int, state: tuple) -> tuple: ...

    @abstractmethod
    def run_head(self, pos: int, tap) -> HeadOutput: ...

    @abstractmethod
    def take(self, state: tuple, rows: np.ndarray) -> tuple: ...

    @abstractmethod
    def synchronize(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def run_segments(self, first_pos: int, last_pos: int, state: tuple, fuse: bool = True) -> tuple:
        """Segments first..last (inclusive, 0-based), one by one. A runner that fuses may override
        it with one call when ``fuse`` is true; with ``fuse`` false it must run them one by one."""
        for pos in range(first_pos, last_pos + 1):
            state = self.run_segment(pos, state)
        return state

    def run_exit(self, first_pos: int, pos: int, state: tuple, fuse: bool = True) -> tuple[tuple, HeadOutput]:
        """Segments first..pos, then head pos: the work of one evaluated exit, the step both the
        per-frame and the batch walker take. Runners that fuse may override it with one call when
        ``fuse`` is true."""
        state = self.run_segment(pos, state) if first_pos == pos else self.run_segments(first_pos, pos, state, fuse)
        return state, self.run_head(pos, state[-1])

    def prepare(self, plan, fuse: bool, cache: bool = True) -> None:  # noqa: B027 - optional hook
        """Called with a new `CascadePlan` before it is used (default: nothing to do). ``cache``:
        may what is built be kept on disk for the next load (profiling builds every group once: no)."""

    def forget(self, plans) -> None:  # noqa: B027 - optional hook, default: nothing was built
        """Free what `prepare` built for groups that none of ``plans`` uses."""

    def graph_stats(self) -> GraphStats:
        """The CUDA graphs this runner captured and the captures that failed (none by default)."""
        return GraphStats.of({}, {}, 0)

    def check_batch(self, n: int) -> None:
        """Raise ValueError when a batch of ``n`` exceeds what this runner can take at once."""
        limit = self.info.max_batch
        if limit is not None and n > limit:
            raise ValueError(f"batch {n} exceeds {self.info.name}'s max batch {limit}")

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
