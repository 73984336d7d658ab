"""Cascaded early-exit inference (ARCHITECTURE §7): run segment 1, evaluate head 1, stop if confident...

Thresholds: one per exit, compared with that exit's confidence (``>=`` exits). A threshold above 1
skips the exit: its head never runs. The last exit always accepts.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from edgeexit.runtime.backends import create_backend
from edgeexit.runtime.fusion import fused_name, segment_groups
from edgeexit.runtime.manifest import load_manifest, num_exits
from edgeexit.runtime.policies import get_policy
from edgeexit.runtime.preprocessing import Preprocessor


@dataclass
class Prediction:
    label: int
    class_name: str
    confidence: float
    exit_index: int  # 1-based
    latency_ms: float
    unit_latency_ms: dict[str, float] = field(default_factory=dict)
    deadline_hit: bool = False  # True when a deadline stopped the cascade before a confident exit


class Cascade:
    """An early-exit cascade over a NAME.edgeexit artifact. Safe to call from several threads."""

    def __init__(
        self,
        manifest: dict,
        backend,
        thresholds=None,
        policy: str | None = None,
        input_order: str = "RGB",
        fuse: bool = True,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.fuse = fuse
        self.num_exits = num_exits(manifest)
        self.class_names = list(manifest["class_names"])
        self._unit_names = [u["name"] for u in manifest["units"]]
        calib = manifest.get("calibration") or {}
        self.policy_name = policy or calib.get("policy", "max_softmax")
        self._policy = None if self.policy_name == "max_softmax" else get_policy(self.policy_name)
        self.preprocess = Preprocessor(manifest["preprocessing"], input_order)
        if thresholds is None:
            thresholds = calib.get("thresholds")
        self.set_thresholds(thresholds if thresholds is not None else [2.0] * (self.num_exits - 1) + [0.0])
        self._lock = nullcontext() if getattr(backend, "thread_safe", False) else threading.Lock()
        self._unit_p95_ms: list[float] | None = None
        table = calib.get("latency", {}).get("units") if calib.get("backend") == backend.name else None
        if table:
            self._unit_p95_ms = [float(table[n]["p95_ms"]) for n in self._unit_names]

    @classmethod
    def load(
        cls,
        artifact: str | os.PathLike,
        backend: str = "auto",
        thresholds=None,
        policy: str | None = None,
        input_order: str = "RGB",
        fuse: bool = True,
        **backend_options,
    ) -> Cascade:
        """Open NAME.edgeexit. ``backend``: auto (tensorrt > onnxruntime-cuda > onnxruntime-cpu),
        tensorrt, onnxruntime, onnxruntime-cuda, torch. ``input_order``: channel order of uint8 frames.
        ``fuse``: run the segments between two evaluated exits as one graph where the backend can
        (ONNX Runtime; see runtime/fusion.py)."""
        manifest = load_manifest(artifact)
        backend_impl = create_backend(manifest, backend, **backend_options)
        return cls(manifest, backend_impl, thresholds, policy, input_order, fuse)

    # -- configuration ---------------------------------------------------------------------------
    def set_thresholds(self, thresholds) -> None:
        th = np.asarray(list(thresholds), dtype=np.float64)
        if th.shape != (self.num_exits,):
            raise ValueError(f"thresholds needs one value per exit ({self.num_exits}), got {len(th)}")
        if np.isnan(th).any():
            raise ValueError("thresholds must be numbers, not NaN")
        self.thresholds = th
        # A head runs only if its exit can be taken; the last exit always runs and accepts.
        self.evaluated = [bool(t <= 1.0) for t in th[:-1]] + [True]
        self._groups = segment_groups(self.evaluated)
        # names for Prediction.unit_latency_ms, built once rather than per call
        self._group_names = [self._unit_names[2 * k1] if k0 == k1 else fused_name(k0, k1) for k0, k1 in self._groups]
        if hasattr(self.backend, "prepare"):
            self.backend.prepare(self.evaluated, fuse=self.fuse)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def set_unit_latency(self, p95_ms: dict[str, float]) -> None:
        """Per-unit p95 latency used by ``deadline_ms`` (from calibration, or `calibrate.profiler`)."""
        self._unit_p95_ms = [float(p95_ms[n]) for n in self._unit_names]

    def _confidence(self, head) -> np.ndarray:
        return head.confidence if self._policy is None else self._policy(head.logits())

    # -- single frame ----------------------------------------------------------------------------
    def predict(self, frame, deadline_ms: float | None = None) -> Prediction:
        """Classify one frame. With ``deadline_ms``, never start a unit whose measured p95 latency
        would overrun the deadline; return the deepest exit evaluated so far."""
        t0 = time.perf_counter()
        x = self.preprocess(frame)[None]
        if deadline_ms is not None and self._unit_p95_ms is None:
            raise ValueError(
                "deadline_ms needs per-unit latencies: calibrate the artifact on this backend first "
                "(`edgeexit calibrate`) or call set_unit_latency()"
            )
        with self._lock:
            if deadline_ms is None:
                return self._run_groups(x, t0)
            return self._run_one(x, t0, deadline_ms)

    def _segments(self, k0: int, k1: int, state: tuple) -> tuple:
        be = self.backend
        if self.fuse and k0 < k1 and hasattr(be, "run_segments"):
            return be.run_segments(k0, k1, state)
        for k in range(k0, k1 + 1):
            state = be.run_segment(k, state)
        return state

    def _run_groups(self, x: np.ndarray, t0: float) -> Prediction:
        """The hot path: run each group of segments up to the next evaluated exit, then its head."""
        be, names, units_ms = self.backend, self._unit_names, {}
        state = be.from_host(x)
        last = self.num_exits - 1
        for (k0, k), group_name in zip(self._groups, self._group_names, strict=True):
            t = time.perf_counter()
            state = self._segments(k0, k, state)
            t2 = time.perf_counter()
            units_ms[group_name] = (t2 - t) * 1e3
            head = be.run_head(k, state[-1])
            conf = float(self._confidence(head)[0])
            units_ms[names[2 * k + 1]] = (time.perf_counter() - t2) * 1e3
            if k == last or conf >= self.thresholds[k]:
                return self._prediction(k, conf, head, t0, units_ms)
        raise AssertionError("unreachable: the last exit always accepts")

    def _run_one(self, x: np.ndarray, t0: float, deadline_ms: float | None) -> Prediction:
        be, names, units_ms = self.backend, self._unit_names, {}
        p95 = self._unit_p95_ms
        state = be.from_host(x)
        best = None
        last = self.num_exits - 1
        for k in range(self.num_exits):
            if deadline_ms is not None and best is not None:
                need = p95[2 * k] + p95[2 * k + 1]
                if (time.perf_counter() - t0) * 1e3 + need > deadline_ms:
                    return self._prediction(*best, t0, units_ms, deadline_hit=True)
            t = time.perf_counter()
            state = be.run_segment(k, state)
            t2 = time.perf_counter()
            units_ms[names[2 * k]] = (t2 - t) * 1e3
            must_answer = (
                deadline_ms is not None and k < last and best is None and self._would_overrun(k, t0, deadline_ms)
            )
            if not self.evaluated[k] and not must_answer:
                continue
            head = be.run_head(k, state[-1])
            conf = float(self._confidence(head)[0])
            units_ms[names[2 * k + 1]] = (time.perf_counter() - t2) * 1e3
            if k == last or conf >= self.thresholds[k]:
                return self._prediction(k, conf, head, t0, units_ms)
            if deadline_ms is not None:
                best = (k, conf, head)
        raise AssertionError("unreachable: the last exit always accepts")

    def _would_overrun(self, k: int, t0: float, deadline_ms: float) -> bool:
        """Would the next segment and head (k+1) miss the deadline? Then answer at exit k even if skipped."""
        p95 = self._unit_p95_ms
        return (time.perf_counter() - t0) * 1e3 + p95[2 * k + 2] + p95[2 * k + 3] > deadline_ms

    def _prediction(self, k, conf, head, t0, units_ms, deadline_hit=False) -> Prediction:
        label = int(np.argmax(head.logits()[0]))
        return Prediction(
            label, self.class_names[label], conf, k + 1, (time.perf_counter() - t0) * 1e3, units_ms, deadline_hit
        )

    # -- batch -----------------------------------------------------------------------------------
    def predict_batch(self, frames) -> list[Prediction]:
        """Classify a batch; samples that exit are dropped before the next unit (compaction)."""
        t0 = time.perf_counter()
        x = self.preprocess.batch(frames)
        with self._lock:
            labels, conf, exits, lat = self._run_batch(x, t0)
        return [
            Prediction(
                int(labels[i]), self.class_names[int(labels[i])], float(conf[i]), int(exits[i]) + 1, float(lat[i])
            )
            for i in range(len(x))
        ]

    def predict_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed float32 (N, C, H, W) → arrays: label, confidence, exit (1-based), latency_ms."""
        t0 = time.perf_counter()
        with self._lock:
            labels, conf, exits, lat = self._run_batch(np.ascontiguousarray(x, dtype=np.float32), t0)
        return {"label": labels, "confidence": conf, "exit": exits + 1, "latency_ms": lat}

    def _run_batch(self, x: np.ndarray, t0: float):
        be, n = self.backend, len(x)
        labels = np.zeros(n, dtype=np.int64)
        conf_out = np.zeros(n, dtype=np.float64)
        exits = np.zeros(n, dtype=np.int64)
        lat = np.zeros(n, dtype=np.float64)
        active = np.arange(n)
        state = be.from_host(x)
        last = self.num_exits - 1
        for k0, k in self._groups:
            state = self._segments(k0, k, state)
            head = be.run_head(k, state[-1])
            conf = self._confidence(head)
            done = np.ones(len(active), dtype=bool) if k == last else conf >= self.thresholds[k]
            rows = np.flatnonzero(done)
            if len(rows):
                idx = active[rows]
                labels[idx] = head.logits(rows).argmax(axis=1)
                conf_out[idx] = conf[rows]
                exits[idx] = k
                lat[idx] = (time.perf_counter() - t0) * 1e3
            if k == last or len(rows) == len(active):
                break
            if len(rows):
                keep = np.flatnonzero(~done)
                state = be.take(state, keep)
                active = active[keep]
        return labels, conf_out, exits, lat

    # -- statistics for calibration ---------------------------------------------------------------
    def exit_statistics(self, x: np.ndarray, batch_size: int = 256, progress=None) -> dict[str, np.ndarray]:
        """Run every unit on preprocessed images: (N, K) confidences (this cascade's policy) and labels."""
        n, k_exits = len(x), self.num_exits
        conf = np.zeros((n, k_exits))
        pred = np.zeros((n, k_exits), dtype=np.int64)
        be = self.backend
        with self._lock:
            for start in range(0, n, batch_size):
                xb = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
                state = be.from_host(xb)
                for k in range(k_exits):
                    state = be.run_segment(k, state)
                    head = be.run_head(k, state[-1])
                    conf[start : start + len(xb), k] = self._confidence(head)
                    pred[start : start + len(xb), k] = head.logits().argmax(axis=1)
                if progress is not None:
                    progress(min(start + batch_size, n))
        return {"confidence": conf, "prediction": pred}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
