"""Cascaded early-exit inference (docs/contract.md §7): run segment 1, evaluate head 1, stop if confident...

Which exits run and when a sample leaves is the business of `CascadePlan` (runtime/plan.py); how a
unit runs is the business of a `Runner` (runtime/backends/base.py). `Cascade` joins the two:

- ``cascade.plan`` is the current plan. `set_thresholds` builds a new plan and swaps it in with one
  assignment; every call reads ``self.plan`` once and uses only that object, so a thread changing
  thresholds never makes another thread's call mix two plans.
- The hot path (`predict` at default settings) does the frame checks and runs the plan: no dict,
  no per-unit timing. ``Cascade.load(..., unit_timing=True)`` fills ``Prediction.unit_latency_ms``.
- `derive` gives a second view (other thresholds, fusion off) of the same loaded runner, for
  verification and profiling, without touching the cascade a camera thread is using. How a view
  runs is one frozen `CascadeOptions`; what views share (runner, lock, lifetime) is one `_Shared`.
- Ownership follows Polygraphy: `Cascade.load` creates its runner and `close` frees it; a runner
  handed to `Cascade(artifact, runner)` stays the caller's unless ``owns_runner=True``.
- Calibration's services (`exit_statistics`, `profile`, `set_unit_latency`) are functions over a
  runner and a plan in runtime/profiling.py; the methods here delegate to them.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import numpy as np

from edgeexit.errors import ArtifactError
from edgeexit.runtime import profiling
from edgeexit.runtime.artifact import Artifact, Calibration
from edgeexit.runtime.backends import BackendOptions, Runner, choose_backend, create_backend
from edgeexit.runtime.backends.options import option_names
from edgeexit.runtime.device import fingerprint_changes
from edgeexit.runtime.monitor import DriftMonitor, input_level, monitor_for
from edgeexit.runtime.monitor import as_options as as_drift_options
from edgeexit.runtime.plan import CascadePlan, head_name
from edgeexit.runtime.policies import get_policy
from edgeexit.runtime.preprocessing import Preprocessor


@dataclass(slots=True)
class Prediction:
    """One frame's answer.

    ``label``/``class_name``: the class (index into the artifact's class names, and its name).
    ``confidence``: the value the exit's threshold was compared with (the policy's confidence, by
    default the softmax maximum), in [0, 1]. ``exit_index``: the exit that answered, counted from 1
    (1 = the cheapest head; ``num_exits`` = the full model). ``latency_ms``: the cascade's time, from
    the network-size tensor to the answer: what ``calibrate --budget`` budgets. ``preprocess_ms``:
    the time to turn the frame the app passed (any size, uint8) into that tensor (colour order,
    shrink, normalisation); it grows with the frame (``calibrate --frame-size WxH`` budgets it too).
    ``total_ms``: the two together, frame in to answer out. In `predict_batch` the batch's
    preprocessing is shared equally among its frames. ``unit_latency_ms``: per-unit times, only with
    ``unit_timing=True``. ``deadline_hit``: True when ``deadline_ms`` stopped the cascade before an
    exit was confident enough (the answer is then the deepest exit evaluated)."""

    label: int
    class_name: str
    confidence: float
    exit_index: int  # 1-based
    latency_ms: float  # the cascade alone; preprocessing is preprocess_ms
    unit_latency_ms: dict[str, float] | None = None  # only with unit_timing=True
    deadline_hit: bool = False  # True when a deadline stopped the cascade before a confident exit
    preprocess_ms: float = 0.0
    # the first evaluated exit's confidence (what the drift monitor watches); only with a drift
    # monitor or CascadeOptions(first_confidence=True), so the default path does not pay for it
    first_confidence: float | None = None
    # the network input's brightness (runtime/monitor.py `input_level`), on a watching view without a
    # monitor of its own (Streams feeds each camera's monitor from the predictions)
    input_level: float | None = None

    @property
    def total_ms(self) -> float:
        """Frame in to answer out: preprocessing plus the cascade."""
        return self.preprocess_ms + self.latency_ms


class CascadeClosedError(RuntimeError):
    """The cascade was closed (by another thread) while or before this call ran."""


class LatencyTableMissingError(ArtifactError, ValueError):
    """``deadline_ms`` on a cascade without per-unit latencies for its backend (a user error: exit 2)."""


class NonFiniteOutputError(ArtifactError, ArithmeticError):
    """The answering exit's confidence is NaN or infinite: its logits hold a NaN or an infinity. No
    class can be trusted then (NumPy's argmax picks the first NaN), so the frame gets an error, never
    a silent class 0. On a device the usual cause is an FP16 engine whose activations overflow
    (FP16 stops at 65504); weights holding NaN are the other."""

    def __init__(self, exit_index: int, backend: str, frames: int = 1, of: str = "the batch") -> None:
        where = f"{frames} frame(s) of {of}" if frames > 1 or of != "the batch" else "this frame"
        super().__init__(
            f"exit {exit_index} answered {where} with a non-finite confidence (its logits hold NaN or "
            f"infinity) on the {backend} backend: on an FP16 engine this is activation overflow, so "
            "rebuild the engines in FP32 (edgeexit engines ... --precision fp32); otherwise the model's "
            "weights hold NaN: re-export from a checkpoint that evaluates cleanly"
        )
        self.exit_index = exit_index


def check_finite_confidence(confidence: np.ndarray, backend: str) -> None:
    """Exit statistics, (N, K) confidences, hold only finite numbers; else `NonFiniteOutputError`
    naming the first exit at fault. Calibration decides on them: a NaN confidence would pass no
    threshold test and silently read as "never exits here" (or, at the last exit, class 0)."""
    bad = ~np.isfinite(confidence)
    if bad.any():
        pos = int(np.flatnonzero(bad.any(axis=0))[0])
        raise NonFiniteOutputError(pos + 1, backend, int(bad[:, pos].sum()), of=f"{len(confidence)} images")


def _finite(value: float) -> bool:
    return -math.inf < value < math.inf  # False for NaN too: one chained comparison on the hot path


@dataclass(frozen=True, slots=True)
class CascadeOptions:
    """How a cascade runs, apart from its runner and thresholds. Frozen and checked when built: a
    view (`Cascade.derive`) gets its own by `replace`, so a new option is a field here and nowhere else.

    ``policy``: the confidence policy (max_softmax, margin, entropy); None: the calibration's, else
    max_softmax. ``input_order``: channel order of uint8 frames (RGB or BGR). ``fuse``: run the
    segments between two evaluated exits as one graph where the runner can (ONNX Runtime; see
    runtime/fusion.py). ``unit_timing``: fill ``Prediction.unit_latency_ms`` (a few µs per frame).
    ``budget_ms``: hold the mean latency at this budget as the device drifts, moving along the
    calibration's ladder of plans (`Cascade.controller`). ``budget_window``: frames per controller
    decision (None: the controller's default for the calibrated metric). ``first_confidence``: fill
    ``Prediction.first_confidence`` (what a drift monitor watches; on with ``drift=``)."""

    policy: str | None = None
    input_order: str = "RGB"
    fuse: bool = True
    unit_timing: bool = False
    budget_ms: float | None = None
    budget_window: int | None = None
    first_confidence: bool = False

    def __post_init__(self) -> None:
        if self.policy is not None:
            get_policy(self.policy)  # a ValueError naming the policies
        if self.input_order not in ("RGB", "BGR"):
            raise ValueError(f"input_order must be RGB or BGR, got {self.input_order}")
        object.__setattr__(self, "fuse", bool(self.fuse))
        object.__setattr__(self, "unit_timing", bool(self.unit_timing))
        object.__setattr__(self, "first_confidence", bool(self.first_confidence))
        b = self.budget_ms
        if b is not None:
            number = isinstance(b, int | float | np.integer | np.floating) and not isinstance(b, bool | np.bool_)
            if not (number and math.isfinite(b) and b > 0):  # True is not 1 ms
                raise ValueError(f"budget_ms must be a positive number of milliseconds, got {b!r}")
            object.__setattr__(self, "budget_ms", float(b))
        w = self.budget_window
        if w is not None and not (isinstance(w, int | np.integer) and not isinstance(w, bool) and w >= 2):
            raise ValueError(f"budget_window must be a whole number of frames >= 2, got {w!r}")
        if w is not None:
            object.__setattr__(self, "budget_window", int(w))

    def replace(self, **changes) -> CascadeOptions:
        return replace(self, **changes)


_OPTION_FIELDS = frozenset(f.name for f in fields(CascadeOptions))


def _with(options: CascadeOptions | None, changes: Mapping, where: str = "Cascade()") -> CascadeOptions:
    """``options`` (default: `CascadeOptions()`) with option fields given by keyword
    (``Cascade.load(path, unit_timing=True)``)."""
    if options is None:
        options = CascadeOptions()
    elif not isinstance(options, CascadeOptions):
        raise TypeError(f"options must be a CascadeOptions, got {type(options).__name__}")
    unknown = sorted(set(changes) - _OPTION_FIELDS)
    if unknown:
        raise TypeError(
            f"{where} got unknown option {', '.join(unknown)} (options: {', '.join(sorted(_OPTION_FIELDS))})"
        )
    return options.replace(**changes) if changes else options


class _Shared:
    """What a cascade and every view `derive`d from it share: the runner, its lock, who closes it,
    whether it is closed (so a view sees its parent's close and raises CascadeClosedError, never what
    a closed runner happens to raise), and the artifact's fields."""

    __slots__ = (
        "runner",
        "lock",
        "owns_runner",
        "closed",
        "backend_choice",
        "views",
        "artifact",
        "num_exits",
        "class_names",
        "preprocessing",
        "calibration",
        "fingerprint_changes",
    )

    def __init__(self, artifact: Artifact, runner: Runner, owns_runner: bool) -> None:
        if not isinstance(artifact, Artifact):
            raise TypeError(
                "artifact must be an Artifact (Artifact.load, or Artifact.in_memory for a runner of your own), "
                f"got {type(artifact).__name__}"
            )
        self.artifact, self.num_exits = artifact, artifact.num_exits
        self.preprocessing, self.calibration = artifact.preprocessing, artifact.calibration
        self.class_names = list(artifact.class_names)
        self.runner, self.owns_runner, self.closed = runner, bool(owns_runner), False
        # Runners that are not thread safe (TensorRT, torch with CUDA graphs) get one caller at a time.
        self.lock = nullcontext() if runner.thread_safe else threading.RLock()
        self.backend_choice = "a runner given to Cascade()"
        cal = self.calibration
        self.fingerprint_changes = fingerprint_changes(cal.device, runner.info) if cal is not None else []
        self.views: weakref.WeakSet[Cascade] = weakref.WeakSet()  # to close with the first one


class _PlanFollowers:
    """The budget controller's ``apply``: a switch assigns the new plan (one assignment each, as
    `set_thresholds`) to the cascade and to every view derived from it without thresholds of its own:
    they feed the same controller, so they must run the plan it chose."""

    __slots__ = ("views", "_lock")

    def __init__(self) -> None:
        self.views: weakref.WeakSet[Cascade] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, view: Cascade) -> None:
        with self._lock:
            self.views.add(view)

    def __call__(self, plan: CascadePlan) -> None:
        with self._lock:
            views = list(self.views)
        for view in views:
            view.plan = plan


class Cascade:
    """An early-exit cascade over a NAME.edgeexit artifact. Safe to call from several threads.

    A cascade is a view: (runner, lock, plan, options). `Cascade(...)`/`Cascade.load` make the first
    one; `derive` makes more over the same runner and lock, each with its own plan and options."""

    CHUNK = profiling.CHUNK  # frames per call into the runner when a caller gives more

    def __init__(
        self,
        artifact: Artifact,
        runner: Runner,
        thresholds=None,
        options: CascadeOptions | None = None,
        *,
        owns_runner: bool = False,
        drift=None,
    ) -> None:
        """``artifact``: the `Artifact` (`Artifact.load`; `Artifact.in_memory` for a runner of your
        own). ``options``: `CascadeOptions` (policy, input_order, fuse, unit_timing, budget_ms, ...).
        ``owns_runner``: whether `close` (or a failure here) closes ``runner``. Polygraphy's rule: a
        runner handed in stays the caller's (False, the default); `Cascade.load` creates and owns one.
        ``drift``: True or a `DriftOptions` to watch the frames for drift from the calibration
        frames (``cascade.drift``, runtime/monitor.py); an artifact calibrated without the monitor's
        reference raises `DriftUnavailableError`."""
        if not isinstance(runner, Runner):
            raise TypeError(f"runner must implement edgeexit.runtime.backends.Runner, got {type(runner).__name__}")
        try:
            options = _with(options, {})
            shared = _Shared(artifact, runner, owns_runner)
            cal = shared.calibration
            if options.policy is None:
                options = options.replace(policy=cal.policy if cal is not None else "max_softmax")
            if thresholds is None and cal is not None:
                thresholds = cal.thresholds
            latency = None
            if cal is not None and cal.latency_p95_ms and cal.backend == runner.info.name:
                latency = profiling.unit_latency_table(CascadePlan.full_model(shared.num_exits), cal.latency_p95_ms)
            controller = None
            if options.budget_ms is not None:  # it picks the plan to start on
                controller, thresholds = _controller(cal, options, options.budget_ms, shared.num_exits)
            monitor = None
            drift_options = as_drift_options(drift)
            if drift_options is not None:
                monitor = monitor_for(cal, shared.num_exits, drift_options)
                options = options.replace(first_confidence=True)
            self._init_view(shared, options, thresholds, latency, controller, root=True, drift=monitor)
        except BaseException:
            if owns_runner:
                runner.close()
            raise
        if self.fingerprint_changes:
            warnings.warn(
                "this device differs from the one the artifact was calibrated on ("
                + "; ".join(self.fingerprint_changes)
                + "): its latency table and thresholds may not fit; run `edgeexit calibrate` here",
                RuntimeWarning,
                stacklevel=3,
            )

    def _init_view(
        self, shared: _Shared, options: CascadeOptions, thresholds, latency, controller, root=False, drift=None
    ):
        """Every field of a view, in one place: `__init__` and `derive` both come here."""
        self.drift: DriftMonitor | None = drift
        # a watching view without its own monitor reports each frame's input brightness, when the
        # calibration's reference watches it (with a monitor, the monitor reads it on its own frames)
        ref = getattr(shared.calibration, "drift_reference", None) if drift is None else None
        level = ref.get("level") if ref is not None and options.first_confidence else None
        self._level_stride: int | None = int(level["stride"]) if level is not None else None
        if options.first_confidence or drift is not None:
            # the watched hot path, bound on this instance only: a cascade without it runs `_run` untouched
            self._run = self._run_watched  # type: ignore[method-assign]  # per instance, on purpose (above)
        self._shared, self._root, self._closed = shared, root, False
        self.runner, self._lock = shared.runner, shared.lock
        self.artifact = shared.artifact
        self.num_exits, self.class_names = shared.num_exits, shared.class_names
        self.fingerprint_changes = shared.fingerprint_changes
        self.options = options
        policy_fn = get_policy(options.policy or "max_softmax")  # a root's options name it (`__init__`)
        self._policy = None if options.policy == "max_softmax" else policy_fn
        self._fuse, self._unit_timing = options.fuse, options.unit_timing  # read by the hot paths
        self.preprocessor = Preprocessor(shared.preprocessing, options.input_order)
        self._unit_p95: profiling.UnitLatency | None = latency
        self.controller = controller
        # predict on a thread-safe runner without timing or controller needs no lock and no bookkeeping
        self._lean = self.runner.thread_safe and not options.unit_timing and controller is None
        self.plan: CascadePlan = CascadePlan.full_model(self.num_exits)
        self.set_thresholds(thresholds if thresholds is not None else self.plan)
        shared.views.add(self)
        if controller is not None:  # a switch assigns this view's plan too; fused graphs for every rung, now
            with self._lock:
                for rung in controller.ladder:
                    self.runner.prepare(rung.plan, self._fuse)
            controller.apply.add(self)

    @classmethod
    def load(
        cls,
        artifact: str | os.PathLike,
        backend: str = "auto",
        thresholds=None,
        options: CascadeOptions | None = None,
        backend_options: BackendOptions | None = None,
        drift=None,
        **keywords,
    ) -> Cascade:
        """Open NAME.edgeexit with a runner this cascade owns (`close` closes it). ``backend``: auto
        (tensorrt > onnxruntime-cuda > onnxruntime-cpu), tensorrt, onnxruntime, onnxruntime-cuda,
        torch. ``options``: `CascadeOptions` (policy, input_order, fuse, unit_timing, budget_ms, ...).
        ``backend_options``: the chosen backend's typed options (`OnnxRuntimeOptions`, `TorchOptions`,
        `TensorRTOptions`: precision, threads, io_binding, device, cuda_graphs, ...). Both are also
        accepted field by field as keywords: ``Cascade.load(path, budget_ms=5, precision="int8")``.
        ``drift``: True or a `DriftOptions`: watch for frames unlike the calibration frames
        (``cascade.drift.state()``; runtime/monitor.py)."""
        unknown = sorted(set(keywords) - _OPTION_FIELDS - option_names())
        if unknown:
            raise TypeError(
                f"Cascade.load() got unknown option {', '.join(unknown)} (CascadeOptions: "
                f"{', '.join(sorted(_OPTION_FIELDS))}; backend options: {', '.join(sorted(option_names()))})"
            )
        options = _with(options, {k: v for k, v in keywords.items() if k in _OPTION_FIELDS}, "Cascade.load()")
        backend_kw = {k: v for k, v in keywords.items() if k not in _OPTION_FIELDS}
        art = Artifact.load(artifact)
        precision = backend_kw.get("precision", backend_options.precision if backend_options is not None else None)
        name, why = choose_backend(art, backend, precision)
        runner = create_backend(art, name, backend_options, **backend_kw)
        cascade = cls(art, runner, thresholds, options, owns_runner=True, drift=drift)  # closes the runner if it fails
        cascade._shared.backend_choice = why
        return cascade

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
    def owns_runner(self) -> bool:
        """Whether closing this cascade closes its runner (views never do)."""
        return self._root and self._shared.owns_runner

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
            "why": self._shared.backend_choice,
        }

    def set_unit_latency(self, p95_ms: Mapping[str, float]) -> None:
        """Per-unit p95 latency used by ``deadline_ms`` (from calibration, or `Cascade.profile`)."""
        self._unit_p95 = profiling.unit_latency_table(self.plan, p95_ms)

    def derive(
        self,
        thresholds=None,
        fuse: bool | None = None,
        input_order: str | None = None,
        first_confidence: bool | None = None,
    ) -> Cascade:
        """Another view over the same loaded runner (and lock) with other thresholds, fusion or
        frame channel order. Without thresholds it keeps this cascade's plan and budget controller (a
        switch moves both) and its drift monitor (its frames are watched too); with them, neither.
        ``first_confidence``: fill ``Prediction.first_confidence``. Closing it leaves the runner open;
        closing the cascade it came from closes the view too (its calls raise CascadeClosedError)."""
        self._check_open()
        changes: dict = {} if thresholds is None else {"budget_ms": None}
        if fuse is not None:
            changes["fuse"] = fuse
        if input_order is not None:
            changes["input_order"] = input_order
        if first_confidence is not None:
            changes["first_confidence"] = first_confidence
        controller = self.controller if thresholds is None else None
        drift = self.drift if thresholds is None else None
        if drift is not None:
            changes["first_confidence"] = True
        view = type(self).__new__(type(self))
        plan = self.plan if thresholds is None else thresholds
        view._init_view(self._shared, self.options.replace(**changes), plan, self._unit_p95, controller, drift=drift)
        return view

    def confidence(self, head) -> np.ndarray:
        """This cascade's confidence (its policy) for every row of a head's output."""
        return head.confidence if self._policy is None else self._policy(head.logits())

    # -- single frame ----------------------------------------------------------------------------
    def predict(self, frame, deadline_ms: float | None = None) -> Prediction:
        """Classify one frame. With ``deadline_ms``, never start a unit whose measured p95 latency
        would overrun the deadline; return the deepest exit evaluated so far."""
        t_frame = time.perf_counter()
        x = self.preprocessor(frame)[None]
        t0 = time.perf_counter()
        if deadline_ms is None and self._lean:
            try:
                pred = self._run(x, self.plan, t0)
            except Exception:
                self._raise_if_closed()
                raise
            if not _finite(pred.confidence):
                raise NonFiniteOutputError(pred.exit_index, self.runner.info.name)
            pred.preprocess_ms = (t0 - t_frame) * 1e3
            if self.controller is not None:  # a switch assigns self.plan (one assignment, as set_thresholds)
                self.controller.observe(pred.latency_ms, pred.exit_index)
            return pred
        pred = self._predict_locked(x, t0, deadline_ms)
        if not _finite(pred.confidence):
            raise NonFiniteOutputError(pred.exit_index, self.runner.info.name)
        pred.preprocess_ms = (t0 - t_frame) * 1e3
        return pred

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
        return self._closed or self._shared.closed

    def _raise_if_closed(self) -> None:
        if self._closed or self._shared.closed:
            raise CascadeClosedError("the cascade was closed while this call ran") from None

    def _check_open(self) -> None:
        if self._closed or self._shared.closed:
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
            state, head = runner.run_exit(first, pos, state, fused)
            conf = float(head.confidence[0] if policy is None else policy(head.logits())[0])
            if pos == last or conf >= th[pos]:
                return self._prediction(pos, conf, head, t0)
        raise AssertionError("unreachable: the last exit always accepts")

    def _run_watched(self, x: np.ndarray, plan: CascadePlan, t0: float) -> Prediction:
        """`_run` that also keeps the first evaluated exit's confidence (it always runs) in the
        prediction and feeds the drift monitor: bound in place of `_run` only on a cascade that
        watches, so one that does not pays nothing."""
        runner = self.runner
        fused = self._fuse
        policy = self._policy
        th = plan.thresholds
        last = self.num_exits - 1
        state = runner.from_host(x)
        watched = None
        for group, pos in plan.groups:
            state, head = runner.run_exit(group, pos, state, fused)
            conf = float(head.confidence[0] if policy is None else policy(head.logits())[0])
            if watched is None:
                watched = (pos, conf, x)
            if pos == last or conf >= th[pos]:
                return self._prediction(pos, conf, head, t0, watched=watched, plan=plan)
        raise AssertionError("unreachable: the last exit always accepts")

    def _run_timed(self, x: np.ndarray, plan: CascadePlan, t0: float) -> Prediction:
        """`_run` with each group's and head's latency recorded (``unit_timing=True``)."""
        runner, clock, units_ms = self.runner, time.perf_counter, {}
        state = runner.from_host(x)
        watched = None
        for (first, pos), name in zip(plan.groups, plan.group_names, strict=True):
            t = clock()
            state = runner.run_segments(first, pos, state, self._fuse)
            t2 = clock()
            units_ms[name] = (t2 - t) * 1e3
            head = runner.run_head(pos, state[-1])
            conf = float(self.confidence(head)[0])
            units_ms[head_name(pos)] = (clock() - t2) * 1e3
            watched = watched or (pos, conf, x)
            if plan.accepts(pos, conf):
                return self._prediction(pos, conf, head, t0, units_ms, watched=watched, plan=plan)
        raise AssertionError("unreachable: the last exit always accepts")

    def _run_deadline(self, x: np.ndarray, plan: CascadePlan, t0: float, deadline_ms: float) -> Prediction:
        """Segment by segment; a pair (segment, head) starts only if its p95 fits what is left.
        A skipped head still runs when nothing else could answer before the deadline."""
        if not deadline_ms >= 0:  # NaN fails this too
            raise ValueError(f"deadline_ms must be a number >= 0 (0: answer from the first exit), got {deadline_ms}")
        if self._unit_p95 is None:
            backend = self.runner.info.name
            raise LatencyTableMissingError(
                f"deadline_ms (--deadline-ms) needs per-unit latencies measured on {backend}: "
                f"calibrate the artifact on this backend first (`edgeexit calibrate --backend {backend}`) "
                "or call set_unit_latency()"
            )
        seg_p95, head_p95 = self._unit_p95
        runner, best, last = self.runner, None, self.num_exits - 1
        units_ms: dict[str, float] = {}  # the deadline walk times no unit
        state = runner.from_host(x)
        first_pos, watched = plan.groups[0][1], None  # the watched exit, if the deadline lets it run

        def elapsed_ms() -> float:
            return (time.perf_counter() - t0) * 1e3

        for pos in range(self.num_exits):
            if best is not None and elapsed_ms() + seg_p95[pos] + head_p95[pos] > deadline_ms:
                return self._prediction(*best, t0, units_ms, deadline_hit=True, watched=watched, plan=plan)
            state = runner.run_segment(pos, state)
            must_answer = (
                pos < last and best is None and elapsed_ms() + seg_p95[pos + 1] + head_p95[pos + 1] > deadline_ms
            )
            if not plan.evaluated[pos] and not must_answer:
                continue
            head = runner.run_head(pos, state[-1])
            conf = float(self.confidence(head)[0])
            if pos == first_pos:
                watched = (pos, conf, x)
            if plan.accepts(pos, conf):
                return self._prediction(pos, conf, head, t0, units_ms, watched=watched, plan=plan)
            best = (pos, conf, head)
        raise AssertionError("unreachable: the last exit always accepts")

    def _prediction(
        self, pos, conf, head, t0, units_ms=None, deadline_hit=False, watched=None, plan=None
    ) -> Prediction:
        """The one frame's `Prediction`, whichever walk answered (exit ``pos``, 0-based, with
        ``head`` of a batch of 1). ``watched``: (position, confidence, network input) of the first
        evaluated exit, when it ran: kept and fed to the drift monitor on a view that watches."""
        label = int(head.logits().argmax())  # batch 1: the flat argmax is the class
        pred = Prediction(
            label,
            self.class_names[label],
            conf,
            pos + 1,
            (time.perf_counter() - t0) * 1e3,
            units_ms if self._unit_timing else None,
            deadline_hit,
        )
        if watched is not None and self.options.first_confidence:
            pred.first_confidence = watched[1]
            if self.drift is not None:
                self.drift.observe(watched[0], watched[1], label, plan, watched[2])
            elif self._level_stride is not None:
                pred.input_level = input_level(watched[2], self._level_stride)
        return pred

    # -- batch -----------------------------------------------------------------------------------
    def predict_batch(self, frames) -> list[Prediction]:
        """Classify a batch; samples that exit are dropped before the next unit (compaction)."""
        t_frames = time.perf_counter()
        x = self.preprocessor.batch(frames)
        t0 = time.perf_counter()
        plan = self.plan
        out = self._run_batches(x, plan, t0)
        bad = ~np.isfinite(out["confidence"])
        if bad.any():
            raise NonFiniteOutputError(int(out["exit"][bad][0]), self.runner.info.name, frames=int(bad.sum()))
        names = self.class_names
        pre_ms = (t0 - t_frames) * 1e3 / len(x)
        preds = [
            Prediction(int(y), names[int(y)], float(c), int(e), float(t), preprocess_ms=pre_ms)
            for y, c, e, t in zip(out["label"], out["confidence"], out["exit"], out["latency_ms"], strict=True)
        ]
        if "first_confidence" in out:
            first_pos, drift, stride = plan.groups[0][1], self.drift, self._level_stride
            for p, c, row in zip(preds, out["first_confidence"].tolist(), x, strict=True):
                p.first_confidence = c
                if drift is not None:
                    drift.observe(first_pos, c, p.label, plan, row)
                elif stride is not None:
                    p.input_level = input_level(row, stride)
        return preds

    def predict_arrays(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed float (N, C, H, W) → arrays: label, confidence, exit (1-based), latency_ms.
        Any N: the work runs in chunks (`CHUNK` frames, or the runner's max batch), so memory is
        bounded by the chunk, not by N."""
        t0 = time.perf_counter()
        x = x if isinstance(x, np.ndarray) else np.asarray(x)  # converted and checked chunk by chunk
        return self._run_batches(x, self.plan, t0, checked=False)

    def _batch_size(self, requested: int | None = None) -> int:
        return profiling.chunk_size(self.runner, requested, self.CHUNK)

    def _run_batches(self, x: np.ndarray, plan: CascadePlan, t0: float, checked: bool = True) -> dict[str, np.ndarray]:
        """Batches larger than a chunk (or than the runner takes at once) run in slices; unchecked
        input is checked and converted slice by slice."""
        if not checked and (not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype == np.uint8 or len(x) == 0):
            x, checked = self.preprocessor.batch(x), True  # the error for what is not a float batch
        n, size = len(x), self._batch_size(len(x))
        out = {
            "label": np.zeros(n, dtype=np.int64),
            "confidence": np.zeros(n, dtype=np.float64),
            "exit": np.zeros(n, dtype=np.int64),
            "latency_ms": np.zeros(n, dtype=np.float64),
        }
        if self.options.first_confidence:
            out["first_confidence"] = np.zeros(n, dtype=np.float64)
        try:
            with self._lock:
                self._check_open()
                for start in range(0, n, size):
                    xb = x[start : start + size]
                    self._run_batch(xb if checked else self.preprocessor.batch(xb), plan, t0, out, start)
        except Exception:
            self._raise_if_closed()
            raise
        return out

    def _run_batch(self, x: np.ndarray, plan: CascadePlan, t0: float, out: dict, offset: int) -> None:
        runner, last = self.runner, self.num_exits - 1
        active = np.arange(len(x)) + offset
        state = runner.from_host(x)
        for first, pos in plan.groups:
            state, head = runner.run_exit(first, pos, state, self._fuse)
            conf = self.confidence(head)
            if pos == plan.groups[0][1] and "first_confidence" in out:
                out["first_confidence"][active] = conf
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

    # -- statistics and timing for calibration (runtime/profiling.py) ---------------------------------
    @contextmanager
    def _runner_held(self):
        """The runner, under the lock, while this cascade is open (what the profiling calls need)."""
        with self._lock:
            self._check_open()
            yield self.runner

    def exit_statistics(self, x: np.ndarray, batch_size: int = 256, progress=None) -> dict[str, np.ndarray]:
        """Run every unit on preprocessed images: (N, K) confidences (this cascade's policy) and
        predictions (`profiling.exit_statistics`). Batches respect the runner's max batch."""
        with self._runner_held() as runner:
            stats = profiling.exit_statistics(runner, self.plan, x, self.confidence, batch_size, progress)
        check_finite_confidence(stats["confidence"], self.runner.info.name)
        return stats

    def profile(self, image: np.ndarray, batch: int = 1, repeats: int = 200, min_seconds: float = 1.0, progress=None):
        """Per-unit latency on this device (`profiling.profile_units`)."""
        with self._runner_held() as r:
            return profiling.profile_units(r, self.plan, image, batch, repeats, min_seconds, progress, self.confidence)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close this cascade. Closing the one `Cascade(...)`/`load` made also closes every view
        derived from it, and frees the runner if the cascade owns it (``owns_runner``). A call
        running in another thread finishes or raises CascadeClosedError."""
        with self._lock:
            self._closed = True
            self._lean = False  # the checked path from now on: a runner it does not own still runs
            shared = self._shared
            if self._root and not shared.closed:
                shared.closed = True  # first, so that a call failing on the closing runner says why
                for view in list(shared.views):
                    view._lean = False
                if shared.owns_runner:
                    self.runner.close()

    def __enter__(self) -> Cascade:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _controller(cal: Calibration | None, options: CascadeOptions, budget_ms: float, num_exits: int):
    """The budget controller over the calibration's ladder, and the plan it starts on. Its ``apply``
    assigns every switch to the views `_init_view` registers (the controller swaps the plan itself,
    under its lock, so two threads never undo a switch)."""
    from edgeexit.runtime.controller import calibrated_ladder, controller_for

    if cal is None or not cal.ladder:
        raise ArtifactError(
            "budget_ms needs the calibration's ladder of plans: run `edgeexit calibrate` with this edgeexit"
        )
    ladder = calibrated_ladder(cal, lambda th: CascadePlan.from_thresholds(th, num_exits))
    controller = controller_for(cal, ladder, budget_ms, apply=_PlanFollowers(), window=options.budget_window)
    return controller, controller.plan


__all__ = ["Cascade", "CascadeClosedError", "LatencyTableMissingError", "Prediction"]
