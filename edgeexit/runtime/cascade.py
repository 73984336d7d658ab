"""Cascaded early-exit inference (docs/contract.md §7): run segment 1, evaluate head 1, stop if confident...

Which exits run and when a sample leaves is the business of `CascadePlan` (runtime/plan.py); how a
unit runs is the business of a `Runner` (runtime/backends/base.py). `Cascade` joins the two:

- ``cascade.plan`` is the current plan. `set_thresholds` builds a new plan and swaps it in with one
  assignment; every call reads ``self.plan`` once and uses only that object, so a thread changing
  thresholds never makes another thread's call mix two plans.
- The hot path (`predict` at default settings) does the frame checks and runs the plan: no dict,
  no per-unit timing. ``Cascade.load(..., unit_timing=True)`` fills ``Prediction.unit_latency_ms``.
- `derive` gives a second view (other thresholds, fusion off) of the same loaded runner, for
  verification and profiling, without touching the cascade a camera thread is using.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from edgeexit.errors import ArtifactError
from edgeexit.runtime.artifact import Artifact, as_artifact, runtime_fields
from edgeexit.runtime.backends import Runner, choose_backend, create_backend
from edgeexit.runtime.plan import CascadePlan, head_name, segment_name
from edgeexit.runtime.policies import get_policy
from edgeexit.runtime.preprocessing import Preprocessor


@dataclass(slots=True)
class Prediction:
    label: int
    class_name: str
    confidence: float
    exit_index: int  # 1-based
    latency_ms: float
    unit_latency_ms: dict[str, float] | None = None  # only with unit_timing=True
    deadline_hit: bool = False  # True when a deadline stopped the cascade before a confident exit


class CascadeClosedError(RuntimeError):
    """The cascade was closed (by another thread) while or before this call ran."""


class _Lifetime:
    """Whether the runner is still open: one object shared by a cascade and every `derive`d view of
    it, so a view sees its parent's close (and raises CascadeClosedError, never what a closed runner
    happens to raise)."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class LatencyTableMissingError(ArtifactError, ValueError):
    """``deadline_ms`` on a cascade without per-unit latencies for its backend (a user error: exit 2)."""


class Cascade:
    """An early-exit cascade over a NAME.edgeexit artifact. Safe to call from several threads."""

    def __init__(
        self,
        manifest: Artifact | Mapping,
        runner: Runner,
        thresholds=None,
        policy: str | None = None,
        input_order: str = "RGB",
        fuse: bool = True,
        unit_timing: bool = False,
        budget_ms: float | None = None,
    ) -> None:
        """``manifest``: the `Artifact` (`Artifact.load`), or a manifest dict: one from
        `load_manifest`, or an in-memory one (units, class_names, preprocessing, calibration) for a
        runner of your own."""
        if not isinstance(runner, Runner):
            raise TypeError(f"runner must implement edgeexit.runtime.backends.Runner, got {type(runner).__name__}")
        self.artifact, num_exits, class_names, pre, cal = _contract(manifest)
        self.manifest = self.artifact.manifest_dict() if self.artifact is not None else manifest
        self.runner = runner
        self.num_exits = num_exits
        self.class_names = list(class_names)
        self._fuse = bool(fuse)
        self._unit_timing = bool(unit_timing)
        self._owns_runner = True
        self._closed = False  # this view closed
        self._life = _Lifetime()  # the runner closed (shared with derived views)
        self.backend_choice = "a runner given to Cascade()"
        # Runners that are not thread safe (TensorRT, torch with CUDA graphs) get one caller at a time.
        self._lock = nullcontext() if runner.thread_safe else threading.RLock()
        self.policy_name = policy or (cal.policy if cal is not None else "max_softmax")
        policy_fn = get_policy(self.policy_name)
        self._policy = None if self.policy_name == "max_softmax" else policy_fn
        self._preprocessing = pre
        self.preprocess = Preprocessor(pre, input_order)
        if thresholds is None and cal is not None:
            thresholds = cal.thresholds
        self.plan: CascadePlan = CascadePlan.full_model(self.num_exits)
        self.set_thresholds(thresholds if thresholds is not None else self.plan)
        self._seg_p95_ms: tuple[float, ...] | None = None
        self._head_p95_ms: tuple[float, ...] | None = None
        if cal is not None and cal.latency_p95_ms and cal.backend == runner.info.name:
            self.set_unit_latency(cal.latency_p95_ms)
        self.controller = self._controller(cal.to_dict() if cal else {}, budget_ms) if budget_ms is not None else None
        # predict on a thread-safe runner without timing or controller needs no lock and no bookkeeping
        self._lean = runner.thread_safe and not self._unit_timing and self.controller is None
        self.fingerprint_changes = _fingerprint_changes(cal.device, runner.info) if cal is not None else []
        if self.fingerprint_changes:
            warnings.warn(
                "this device differs from the one the artifact was calibrated on ("
                + "; ".join(self.fingerprint_changes)
                + "): its latency table and thresholds may not fit; run `edgeexit calibrate` here",
                RuntimeWarning,
                stacklevel=3,
            )

    def _controller(self, calib: dict, budget_ms: float):
        from edgeexit.runtime.controller import build_ladder, controller_for

        number = isinstance(budget_ms, int | float | np.integer | np.floating)
        ok = number and not isinstance(budget_ms, bool | np.bool_)  # True is not 1 ms
        if not (ok and math.isfinite(budget_ms) and budget_ms > 0):
            raise ValueError(f"budget_ms must be a positive number of milliseconds, got {budget_ms!r}")
        budget_ms = float(budget_ms)
        rows = calib.get("ladder")
        if not rows:
            from edgeexit.errors import ArtifactError

            raise ArtifactError(
                "budget_ms needs the calibration's ladder of plans: run `edgeexit calibrate` with this edgeexit"
            )
        pred = calib.get("predicted") or {}
        chosen = None  # the calibrated plan: a rung of its own, its measured latency the quiet anchor
        if calib.get("thresholds") is not None and isinstance(pred.get("mean_ms"), int | float):
            meas = calib.get("measured") or {}
            chosen = {"thresholds": calib["thresholds"], "predicted_ms": pred["mean_ms"],
                      "predicted_accuracy": pred.get("accuracy", 0.0), "measured": meas,
                      "exit_ms": meas.get("exit_ms")}  # fmt: skip
        ladder = build_ladder(rows, lambda th: CascadePlan.from_thresholds(th, self.num_exits), chosen)
        with self._lock:
            for rung in ladder:  # fused graphs for every plan the controller may switch to, now
                self.runner.prepare(rung.plan, self._fuse)
        # the controller swaps the plan itself, under its lock (two threads never undo a switch)
        controller = controller_for(calib, ladder, budget_ms, apply=lambda plan: setattr(self, "plan", plan))
        self.plan = controller.plan
        return controller

    @classmethod
    def load(
        cls,
        artifact: str | os.PathLike,
        backend: str = "auto",
        thresholds=None,
        policy: str | None = None,
        input_order: str = "RGB",
        fuse: bool = True,
        unit_timing: bool = False,
        budget_ms: float | None = None,
        **backend_options,
    ) -> Cascade:
        """Open NAME.edgeexit. ``backend``: auto (tensorrt > onnxruntime-cuda > onnxruntime-cpu),
        tensorrt, onnxruntime, onnxruntime-cuda, torch. ``input_order``: channel order of uint8 frames.
        ``fuse``: run the segments between two evaluated exits as one graph where the backend can
        (ONNX Runtime; see runtime/fusion.py). ``unit_timing``: fill ``Prediction.unit_latency_ms``
        (costs a few µs per frame). ``budget_ms``: hold the mean latency at this budget as the device
        drifts, moving along the calibration's ladder of plans (`cascade.controller`)."""
        art = Artifact.load(artifact)
        name, why = choose_backend(art, backend, backend_options.get("precision"))
        runner = create_backend(art, name, **backend_options)
        try:
            cascade = cls(art, runner, thresholds, policy, input_order, fuse, unit_timing, budget_ms)
            cascade.backend_choice = why
            return cascade
        except BaseException:
            runner.close()
            raise

    # -- configuration ---------------------------------------------------------------------------
    def set_thresholds(self, thresholds) -> None:
        """One value per exit (``>=`` leaves; > 1 skips the exit; the last always accepts), or a plan."""
        self._check_open()
        if isinstance(thresholds, CascadePlan):
            plan = thresholds
            if plan.num_exits != self.num_exits:
                raise ValueError(f"the plan has {plan.num_exits} exits, the model {self.num_exits}")
        else:
            plan = CascadePlan.from_thresholds(thresholds, self.num_exits)
        with self._lock:
            self.runner.prepare(plan, self._fuse)
        self.plan = plan  # the one assignment every running call relies on

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.plan.thresholds)

    @property
    def preprocessing(self):
        """The artifact's `Preprocessing` (input size, channels, mean, std): what `Preprocessor` takes."""
        return self._preprocessing

    @property
    def fuse(self) -> bool:
        return self._fuse

    @property
    def backend_name(self) -> str:
        return self.runner.info.name

    @property
    def backend_info(self) -> dict:
        """What runs this cascade, and why `auto` chose it (e.g. why not TensorRT)."""
        info = self.runner.info
        return {
            "name": info.name,
            "version": info.version,
            "device": info.device,
            "precision": info.precision,
            "max_batch": info.max_batch,
            "why": self.backend_choice,
        }

    def set_unit_latency(self, p95_ms: dict[str, float]) -> None:
        """Per-unit p95 latency used by ``deadline_ms`` (from calibration, or `Cascade.profile`)."""
        seg = tuple(float(p95_ms[segment_name(pos)]) for pos in range(self.num_exits))
        head = tuple(float(p95_ms[head_name(pos)]) for pos in range(self.num_exits))
        self._seg_p95_ms, self._head_p95_ms = seg, head

    def derive(self, thresholds=None, fuse: bool | None = None, input_order: str | None = None) -> Cascade:
        """Another cascade over the same loaded runner (and lock) with other thresholds, fusion or
        frame channel order. Closing it leaves the runner open; closing the cascade it came from closes
        the view too (its calls raise CascadeClosedError)."""
        self._check_open()
        other = copy.copy(self)  # shares the runner, its lock and its lifetime
        other._owns_runner = False
        other._closed = False
        if thresholds is not None:  # a view with its own plan: no budget controller moves it
            other.controller = None
            other._lean = self.runner.thread_safe and not self._unit_timing
        if fuse is not None:
            other._fuse = bool(fuse)
        if input_order is not None:
            other.preprocess = Preprocessor(self._preprocessing, input_order)
        other.set_thresholds(self.plan if thresholds is None else thresholds)
        return other

    def confidence(self, head) -> np.ndarray:
        """This cascade's confidence (its policy) for every row of a head's output."""
        return head.confidence if self._policy is None else self._policy(head.logits())

    # -- single frame ----------------------------------------------------------------------------
    def predict(self, frame, deadline_ms: float | None = None) -> Prediction:
        """Classify one frame. With ``deadline_ms``, never start a unit whose measured p95 latency
        would overrun the deadline; return the deepest exit evaluated so far."""
        t0 = time.perf_counter()
        x = self.preprocess(frame)[None]
        if deadline_ms is None and self._lean:
            try:
                pred = self._run(x, self.plan, t0)
            except Exception:
                self._raise_if_closed()
                raise
            if self.controller is not None:  # a switch assigns self.plan (one assignment, as set_thresholds)
                self.controller.observe(pred.latency_ms, pred.exit_index)
            return pred
        return self._predict_locked(x, t0, deadline_ms)

    def _predict_locked(self, x: np.ndarray, t0: float, deadline_ms: float | None) -> Prediction:
        plan = self.plan
        try:
            with self._lock:
                self._check_open()
                if deadline_ms is not None:
                    pred = self._run_deadline(x, plan, t0, deadline_ms)
                elif self._unit_timing:
                    pred = self._run_timed(x, plan, t0)
                else:
                    pred = self._run(x, plan, t0)
        except Exception:
            self._raise_if_closed()
            raise
        if self.controller is not None:  # a switch assigns self.plan (one assignment, as set_thresholds)
            self.controller.observe(pred.latency_ms, pred.exit_index)
        return pred

    @property
    def closed(self) -> bool:
        return self._closed or self._life.closed

    def _raise_if_closed(self) -> None:
        if self._closed or self._life.closed:
            raise CascadeClosedError("the cascade was closed while this call ran") from None

    def _check_open(self) -> None:
        if self._closed or self._life.closed:
            raise CascadeClosedError("the cascade is closed")

    def _run(self, x: np.ndarray, plan: CascadePlan, t0: float) -> Prediction:
        """The hot path: each group of segments up to the next evaluated exit, then its head. It
        inlines `CascadePlan.accepts` (``pos == last or conf >= th[pos]``): a method call per exit is
        measurable at batch 1 (benchmarks/runtime_overhead.py); the rule's owner is still the plan."""
        runner = self.runner
        fused = self._fuse
        policy = self._policy
        th = plan.thresholds
        last = self.num_exits - 1
        state = runner.from_host(x)
        for first, pos in plan.groups:
            if fused:
                state, head = runner.run_exit(first, pos, state)
            else:
                state = one_by_one(runner, first, pos, state)
                head = runner.run_head(pos, state[-1])
            conf = float(head.confidence[0] if policy is None else policy(head.logits())[0])
            if pos == last or conf >= th[pos]:
                label = int(head.logits().argmax())  # batch 1: the flat argmax is the class
                return Prediction(label, self.class_names[label], conf, pos + 1, (time.perf_counter() - t0) * 1e3)
        raise AssertionError("unreachable: the last exit always accepts")

    def _run_timed(self, x: np.ndarray, plan: CascadePlan, t0: float) -> Prediction:
        """`_run` with each group's and head's latency recorded (``unit_timing=True``)."""
        runner, clock, units_ms = self.runner, time.perf_counter, {}
        state = runner.from_host(x)
        for (first, pos), name in zip(plan.groups, plan.group_names, strict=True):
            t = clock()
            state = runner.run_segments(first, pos, state) if self._fuse else one_by_one(runner, first, pos, state)
            t2 = clock()
            units_ms[name] = (t2 - t) * 1e3
            head = runner.run_head(pos, state[-1])
            conf = float(self.confidence(head)[0])
            units_ms[head_name(pos)] = (clock() - t2) * 1e3
            if plan.accepts(pos, conf):
                return self._prediction(pos, conf, head, t0, units_ms)
        raise AssertionError("unreachable: the last exit always accepts")

    def _run_deadline(self, x: np.ndarray, plan: CascadePlan, t0: float, deadline_ms: float) -> Prediction:
        """Segment by segment; a pair (segment, head) starts only if its p95 fits what is left.
        A skipped head still runs when nothing else could answer before the deadline."""
        if not deadline_ms >= 0:  # NaN fails this too
            raise ValueError(f"deadline_ms must be a number >= 0 (0: answer from the first exit), got {deadline_ms}")
        seg_p95, head_p95 = self._seg_p95_ms, self._head_p95_ms
        if seg_p95 is None or head_p95 is None:
            raise LatencyTableMissingError(
                f"deadline_ms (--deadline-ms) needs per-unit latencies measured on {self.backend_name}: "
                f"calibrate the artifact on this backend first (`edgeexit calibrate --backend {self.backend_name}`) "
                "or call set_unit_latency()"
            )
        runner, units_ms, best, last = self.runner, {}, None, self.num_exits - 1
        state = runner.from_host(x)

        def elapsed_ms() -> float:
            return (time.perf_counter() - t0) * 1e3

        for pos in range(self.num_exits):
            if best is not None and elapsed_ms() + seg_p95[pos] + head_p95[pos] > deadline_ms:
                return self._prediction(*best, t0, units_ms, deadline_hit=True)
            state = runner.run_segment(pos, state)
            must_answer = (
                pos < last and best is None and elapsed_ms() + seg_p95[pos + 1] + head_p95[pos + 1] > deadline_ms
            )
            if not plan.evaluated[pos] and not must_answer:
                continue
            head = runner.run_head(pos, state[-1])
            conf = float(self.confidence(head)[0])
            if plan.accepts(pos, conf):
                return self._prediction(pos, conf, head, t0, units_ms)
            best = (pos, conf, head)
        raise AssertionError("unreachable: the last exit always accepts")

    def _prediction(self, pos, conf, head, t0, units_ms, deadline_hit=False) -> Prediction:
        label = int(np.argmax(head.logits()[0]))
        return Prediction(
            label,
            self.class_names[label],
            conf,
            pos + 1,
            (time.perf_counter() - t0) * 1e3,
            units_ms if self._unit_timing else None,
            deadline_hit,
        )

    # -- batch -----------------------------------------------------------------------------------
    def predict_batch(self, frames) -> list[Prediction]:
        """Classify a batch; samples that exit are dropped before the next unit (compaction)."""
        t0 = time.perf_counter()
        out = self._run_batches(self.preprocess.batch(frames), self.plan, t0)
        names = self.class_names
        return [
            Prediction(int(y), names[int(y)], float(c), int(e), float(t))
            for y, c, e, t in zip(out["label"], out["confidence"], out["exit"], out["latency_ms"], strict=True)
        ]

    def predict_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed float (N, C, H, W) → arrays: label, confidence, exit (1-based), latency_ms.
        Any N: the work runs in chunks (`CHUNK` frames, or the runner's max batch), so memory is
        bounded by the chunk, not by N."""
        t0 = time.perf_counter()
        x = x if isinstance(x, np.ndarray) else np.asarray(x)  # converted and checked chunk by chunk
        return self._run_batches(x, self.plan, t0, checked=False)

    CHUNK = 256  # frames per call into the runner when a caller gives more

    def _batch_size(self, requested: int | None = None) -> int:
        limit = self.runner.info.max_batch
        size = min(requested or self.CHUNK, self.CHUNK)
        return min(size, limit) if limit else size

    def _run_batches(self, x: np.ndarray, plan: CascadePlan, t0: float, checked: bool = True) -> dict[str, np.ndarray]:
        """Batches larger than a chunk (or than the runner takes at once) run in slices; unchecked
        input is checked and converted slice by slice."""
        if not checked and (not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype == np.uint8 or len(x) == 0):
            x, checked = self.preprocess.batch(x), True  # the error for what is not a float batch
        n, size = len(x), self._batch_size(len(x))
        out = {
            "label": np.zeros(n, dtype=np.int64),
            "confidence": np.zeros(n, dtype=np.float64),
            "exit": np.zeros(n, dtype=np.int64),
            "latency_ms": np.zeros(n, dtype=np.float64),
        }
        try:
            with self._lock:
                self._check_open()
                for start in range(0, n, size):
                    xb = x[start : start + size]
                    self._run_batch(xb if checked else self.preprocess.batch(xb), plan, t0, out, start)
        except Exception:
            self._raise_if_closed()
            raise
        return out

    def _run_batch(self, x: np.ndarray, plan: CascadePlan, t0: float, out: dict, offset: int) -> None:
        runner, last = self.runner, self.num_exits - 1
        active = np.arange(len(x)) + offset
        state = runner.from_host(x)
        for first, pos in plan.groups:
            if self._fuse:
                state, head = runner.run_exit(first, pos, state)
            else:
                state = one_by_one(runner, first, pos, state)
                head = runner.run_head(pos, state[-1])
            conf = self.confidence(head)
            done = np.ones(len(active), dtype=bool) if pos == last else conf >= plan.thresholds[pos]
            rows = np.flatnonzero(done)
            if len(rows):
                idx = active[rows]
                out["label"][idx] = head.logits(rows).argmax(axis=1)
                out["confidence"][idx] = conf[rows]
                out["exit"][idx] = pos + 1
                out["latency_ms"][idx] = (time.perf_counter() - t0) * 1e3
            if pos == last or len(rows) == len(active):
                return
            if len(rows):
                keep = np.flatnonzero(~done)
                state = runner.take(state, keep)
                active = active[keep]

    # -- statistics and timing for calibration ---------------------------------------------------
    def exit_statistics(self, x: np.ndarray, batch_size: int = 256, progress=None) -> dict[str, np.ndarray]:
        """Run every unit on preprocessed images: (N, K) confidences (this cascade's policy) and
        predictions. Batches respect the runner's max batch."""
        from edgeexit.runtime.chain import chain_outputs

        with self._lock:
            self._check_open()
            out = chain_outputs(
                self.runner, x, self.num_exits, self._batch_size(batch_size), self.confidence, progress=progress
            )
        return {"confidence": out["confidence"], "prediction": out["prediction"]}

    def profile(self, image: np.ndarray, batch: int = 1, repeats: int = 200, min_seconds: float = 1.0, progress=None):
        """Per-unit latency on this device (see runtime/profiling.py)."""
        from edgeexit.runtime.profiling import profile_units

        with self._lock:
            self._check_open()
            return profile_units(self, image, batch, repeats, min_seconds, progress)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the runner. A call running in another thread finishes or raises CascadeClosedError."""
        with self._lock:
            self._closed = True
            if self._owns_runner and not self._life.closed:
                self._life.closed = True  # first, so that a call failing on the closing runner says why
                self.runner.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def one_by_one(runner: Runner, first_pos: int, last_pos: int, state: tuple) -> tuple:
    """Segments first..last as separate calls (fusion off), whatever the runner's `run_segments` does."""
    for pos in range(first_pos, last_pos + 1):
        state = runner.run_segment(pos, state)
    return state


def _contract(manifest):
    """(artifact or None, number of exits, class names, `Preprocessing`, `Calibration` or None)."""
    if isinstance(manifest, Artifact) or (isinstance(manifest, Mapping) and "_folder" in manifest):
        art = as_artifact(manifest)
        return art, art.num_exits, art.class_names, art.preprocessing, art.calibration
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be an Artifact or a manifest dict, got {type(manifest).__name__}")
    return (None, *runtime_fields(manifest))


_FINGERPRINT_KEYS = (
    "backend",
    "backend_version",
    "precision",
    "device",
    "cpu",
    "gpu",
    "compute_capability",
    "jetson_power_mode",
)


def _fingerprint_changes(calibrated: Mapping | None, info) -> list[str]:
    """What differs between the calibration's device fingerprint and this one (host name aside)."""
    if not isinstance(calibrated, Mapping):
        return []
    from edgeexit.runtime.device import fingerprint

    now = fingerprint(info)
    return [
        f"{k}: calibrated {calibrated.get(k)!r}, now {now.get(k)!r}"
        for k in _FINGERPRINT_KEYS
        if (k in calibrated or k in now) and calibrated.get(k) != now.get(k)
    ]


__all__ = ["Cascade", "CascadeClosedError", "LatencyTableMissingError", "Prediction"]
