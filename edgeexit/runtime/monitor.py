"""A label-free drift warning with a false-alarm guarantee: an e-detector per camera.

Everything calibration promises (the ``--max-drop`` certificate, the thresholds chosen for a budget)
assumes that the frames at run time look like the calibration frames. This module watches that
assumption without labels, frame by frame, and says when it no longer holds.

**The statistic.** Per sampled frame, ``x = 1[c < q_k]``: whether the confidence ``c`` of the first
exit the plan evaluates (exit ``k``; it always runs, so watching it costs no extra unit) is below
``q_k``, the median of that exit's confidence on the calibration frames. Under the conditions of
calibration ``P(x = 1) = p_k``, with Clopper-Pearson bounds ``[lo_k, hi_k]`` from the calibration
frames (each one-sided at ``delta``). A darker, noisier, blurred or unfamiliar image moves ``p_k``
up (less confident) or down (images the cheap exit finds easier, plainer ones for example, make it
*more* confident), so the test is two-sided. A second channel watches the answered class (label shift): ``E = p̂(y) /
hi(y)`` with ``p̂`` a predictable mixture of the calibration class shares and a moving class
histogram, ``hi(y)`` the class share's upper bound; under the calibration's class shares its
expectation is at most 1 whatever ``p̂`` is. A third, when the calibration stored it, watches the
input's brightness as the network sees it (`input_level`: the mean of the preprocessed input) with
the same two-sided binary statistic ``1[level < median]``: a darker image that the cheap exit still
classifies confidently (brightness × 0.5 moved its below-median rate from 0.50 to 0.57 only) moves
this rate to 0.97. It is read on every `LEVEL_EVERY`-th sampled frame (a numpy dot product costs
about as much as the rest of the update); the other frames give it e-value 1.

**The e-detector** (Shin, Ramdas & Rinaldo 2022, arXiv 2203.03532). Each channel and each bet
``λ`` of a small grid is a CUSUM e-detector ``M_t = max(1, M_{t-1}) · E_t`` with ``E_t = 1 + λ(x_t -
hi_k)`` (upper half) or ``1 + λ(lo_k - x_t)`` (lower half): a conditional e-value while the frames
look like calibration, with no i.i.d. assumption. The average of e-detectors is an e-detector, so
the statistic ``S_t = Σ_channels w_c · mean_λ M_t`` (equal weights ``w_c`` over the halves and the
labels: alpha split among them) is one, and alarming when ``S_t ≥ 1/α`` gives an average run length
to a false alarm of at least ``1/α`` sampled frames (CUSUM ≤ Shiryaev-Roberts, whose value minus t
is a supermartingale). ``alpha`` is "at most one false alarm per 1/α sampled frames"; it holds when
the calibration bounds hold (probability ≥ 1 - 2·delta per exit and for the brightness, and ≥ 1 -
delta for the class shares together).

**What it cannot catch.** A change that leaves the first evaluated exit's below-median rate, the
input's below-median brightness rate and the answered class shares inside their calibration bounds
(an image change the cheap exit is blind to and that keeps the brightness, or one that moves
accuracy without moving confidence). The guarantee is on sampled frames that are
conditionally no more often below ``q_k`` than at calibration: consecutive video frames of one
scene are strongly dependent, so a live camera samples every ``every``-th frame (`DriftOptions`).

Per sampled frame the work is two table lookups and ``2·len(BET_GAPS)`` (+2 for the labels)
multiply-adds in Python, written out one by one; a frame that is not sampled costs a counter and a
modulo, no lock. benchmarks/drift_warning.py measures it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard, overload

import numpy as np

from edgeexit.errors import ArtifactError

REFERENCE_VERSION = 1
REFERENCE_QUANTILE = 0.5  # q_k is this quantile of exit k's confidence on the calibration frames
REFERENCE_DELTA = 1e-3  # each Clopper-Pearson bound misses the true rate with probability <= this
DEFAULT_ALPHA = 1e-4  # one false alarm per 10^4 sampled frames at most, on average
# The bets: each λ is the Kelly bet for a rate this far beyond the bound (λ = gap / (p (1 - p))),
# so the mixture is close to the best single bet for shifts from 2.5 to 40 points.
BET_GAPS = (0.025, 0.05, 0.1, 0.2, 0.4)
LABEL_RATE = 1 / 64  # the moving class histogram's forgetting rate (label channel)
LABEL_MIX = 0.5  # p̂ = (1 - mix) · calibration shares + mix · moving histogram
_KEEP = 1.0 - LABEL_RATE
# A live camera (or URL, or a video played in real time) is sampled every this many frames it
# delivers: at 30 frames/s, 3 samples a second, so 10^4 sampled frames are about an hour of video.
LIVE_EVERY = 10
# The input-brightness channel reads the network input on every this many sampled frames: reading it
# costs about as much as the rest of a frame's update (a numpy reduction), and a brightness change
# moves the rate so far that a quarter of the frames still finds it within a few hundred.
LEVEL_EVERY = 4
LEVEL_VALUES = 1024  # the brightness is the mean of about this many of the input's values, evenly strided
_CAP = 1e30  # the statistic is held below this after an alarm (no float overflow on a long run)


class DriftUnavailableError(ArtifactError, ValueError):
    """The artifact has no drift reference (calibrated before the drift monitor existed)."""


@dataclass(frozen=True, slots=True)
class DriftOptions:
    """How the drift monitor runs. ``alpha``: at most one false alarm per ``1/alpha`` sampled frames
    on average. ``every``: sample every ``every``-th frame (1: every frame; None: every frame of a
    folder or of one cascade's calls, every `LIVE_EVERY`-th of a camera, URL or video (`edgeexit run`
    on a video file read in order asks for `LIVE_EVERY` too),
    whose consecutive frames are nearly the same image while the guarantee wants sampled frames that
    are not). ``labels``: also watch the answered class (label shift)."""

    def every_for(self, live: bool) -> int:
        """The sampling interval for a live or an ordered source."""
        return self.every if self.every is not None else (LIVE_EVERY if live else 1)

    alpha: float = DEFAULT_ALPHA
    every: int | None = None  # None: 1 for one cascade, a folder or a video read in order; LIVE_EVERY live
    labels: bool = True

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float | np.floating) or not (0 < a < 1):
            raise ValueError(f"drift alpha must be a number in (0, 1), e.g. 1e-4, got {a!r}")
        object.__setattr__(self, "alpha", float(a))
        e = self.every
        if e is not None and (isinstance(e, bool) or not isinstance(e, int | np.integer) or e < 1):
            raise ValueError(f"drift sampling interval (every) must be a whole number >= 1, got {e!r}")
        object.__setattr__(self, "every", int(e) if e is not None else None)
        object.__setattr__(self, "labels", bool(self.labels))


def as_options(drift) -> DriftOptions | None:
    """``drift=`` as the API takes it: None/False (off), True (defaults) or a `DriftOptions`."""
    if drift is None or drift is False:
        return None
    if drift is True:
        return DriftOptions()
    if isinstance(drift, DriftOptions):
        return drift
    raise TypeError(f"drift must be True, False or a DriftOptions, got {type(drift).__name__}")


# --- the reference, computed by calibrate -------------------------------------------------------------


def _log_binom_pmf(n: int, p: float) -> np.ndarray:
    i = np.arange(n + 1, dtype=np.float64)
    lg = math.lgamma(n + 1) - np.array([math.lgamma(k + 1) + math.lgamma(n - k + 1) for k in range(n + 1)])
    with np.errstate(divide="ignore"):
        return lg + i * np.log(p) + (n - i) * np.log1p(-p)


def _tail_le(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    lp = _log_binom_pmf(n, p)[: k + 1]
    m = lp.max()
    return float(math.exp(m) * np.exp(lp - m).sum())


def clopper_pearson(k: int, n: int, delta: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds (each misses with probability <= ``delta``) of a binomial rate
    from ``k`` successes in ``n`` trials, by bisection on the binomial tail (no scipy in the runtime)."""
    if n <= 0:
        return 0.0, 1.0

    def solve(f) -> float:  # f increasing in p, root in (0, 1)
        a, b = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (a + b)
            if f(mid) < 0:
                a = mid
            else:
                b = mid
        return 0.5 * (a + b)

    # upper: P(X <= k; hi) = delta; lower: P(X >= k; lo) = delta, i.e. 1 - P(X <= k-1; lo) = delta
    hi = 1.0 if k >= n else solve(lambda p: delta - _tail_le(k, n, p))
    lo = 0.0 if k <= 0 else solve(lambda p: (1.0 - _tail_le(k - 1, n, p)) - delta)
    return lo, hi


def level_stride(values: int) -> int:
    """The stride `input_level` reads a frame of this many input values with (about `LEVEL_VALUES`)."""
    return max(1, int(values) // LEVEL_VALUES)


_LEVEL_WEIGHTS: dict[int, np.ndarray] = {}  # values read -> their equal weights (the mean as one dot product)


def input_level(x: np.ndarray, stride: int) -> float:
    """One frame's brightness as the network sees it: the mean of every ``stride``-th value of its
    preprocessed input (``x`` holds one frame, any shape). Calibration and the monitor both call this.
    One BLAS dot product with equal weights: a third of the time of numpy's reduction on a small frame."""
    v = x.ravel()
    if stride != 1:
        v = v[::stride]
    w = _LEVEL_WEIGHTS.get(v.size)
    if w is None:
        w = _LEVEL_WEIGHTS.setdefault(v.size, np.full(v.size, 1.0 / v.size, dtype=np.float32))
    return float(np.dot(v, w))


def _below_median(values: np.ndarray, n: int, delta: float) -> dict:
    q = float(np.quantile(values, REFERENCE_QUANTILE))
    below = int((values < q).sum())
    lo, hi = clopper_pearson(below, n, delta)
    return {"q": q, "below": below, "low": lo, "high": hi}


def frame_levels(x: np.ndarray) -> tuple[np.ndarray, int]:
    """`input_level` of every frame of a preprocessed batch (N, ...), and the stride it used."""
    stride = level_stride(x[0].size)
    return np.array([input_level(f, stride) for f in x], dtype=np.float64), stride


def reference_statistics(
    confidence: np.ndarray,
    answered: np.ndarray | None,
    num_classes: int,
    thresholds,
    delta: float = REFERENCE_DELTA,
    levels: tuple[np.ndarray, int] | None = None,
) -> dict:
    """The manifest's ``calibration.drift_reference`` block from the calibration frames' exit
    statistics on the deployed units: per exit the median confidence ``q``, the count below it and
    its Clopper-Pearson bounds; the answered classes' shares under the calibrated ``thresholds`` and
    their upper bounds (Bonferroni over the classes); with ``levels`` (`frame_levels` of the same
    frames) the input brightness's median, count below it, bounds and stride."""
    conf = np.asarray(confidence, dtype=np.float64)
    n, k = conf.shape
    exits = [_below_median(conf[:, pos], n, delta) for pos in range(k)]
    out = {
        "version": REFERENCE_VERSION,
        "statistic": "first evaluated exit's confidence below its calibration median",
        "frames": int(n),
        "delta": float(delta),
        "exits": exits,
        "thresholds": [float(t) for t in thresholds] if thresholds is not None else None,
    }
    if levels is not None:
        values, stride = levels
        out["level"] = {**_below_median(np.asarray(values, dtype=np.float64), n, delta), "stride": int(stride)}
    if answered is not None:
        counts = np.bincount(np.asarray(answered, dtype=np.int64), minlength=num_classes)[:num_classes]
        per = delta / num_classes
        out["classes"] = {
            "counts": [int(c) for c in counts],
            "high": [clopper_pearson(int(c), n, per)[1] for c in counts],
        }
    return out


def _finite(v) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_level(level) -> None:
    """The optional input-brightness block (artifacts calibrated before it have none)."""
    if level is None:
        return
    ok = isinstance(level, Mapping) and all(_finite(level.get(f)) for f in ("q", "low", "high"))
    if not ok or not (0.0 <= level["low"] <= level["high"] <= 1.0):
        raise ValueError("calibration.drift_reference.level needs finite q and 0 <= low <= high <= 1")
    stride = level.get("stride")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError("calibration.drift_reference.level.stride must be a whole number >= 1")


@overload
def parse_reference(block: None, num_exits: int) -> None: ...
@overload
def parse_reference(block: Mapping, num_exits: int) -> dict: ...
def parse_reference(block, num_exits: int) -> dict | None:
    """The ``drift_reference`` block checked (None when absent); a malformed one raises ValueError."""
    if block is None:
        return None
    if not isinstance(block, Mapping) or block.get("version") != REFERENCE_VERSION:
        raise ValueError("calibration.drift_reference is not one this edgeexit reads")
    exits = block.get("exits")
    if not isinstance(exits, list | tuple) or len(exits) != num_exits:
        raise ValueError(f"calibration.drift_reference.exits must list {num_exits} exits")
    for e in exits:
        if not isinstance(e, Mapping):
            raise ValueError("calibration.drift_reference.exits holds a non-object")
        lo, hi, q = e.get("low"), e.get("high"), e.get("q")
        if not (_finite(lo) and _finite(hi) and _finite(q)):
            raise ValueError("calibration.drift_reference.exits needs finite q, low and high")
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError("calibration.drift_reference.exits: need 0 <= low <= high <= 1")
    _check_level(block.get("level"))
    classes = block.get("classes")
    if classes is not None:
        counts, high = classes.get("counts"), classes.get("high")
        seqs = isinstance(counts, list | tuple) and isinstance(high, list | tuple)
        ok = seqs and len(counts) == len(high) and len(high) > 0
        if not ok or not all(isinstance(h, int | float) and 0.0 < h <= 1.0 for h in high):
            raise ValueError("calibration.drift_reference.classes needs counts and upper bounds in (0, 1]")
        if sum(counts) <= 0:
            raise ValueError("calibration.drift_reference.classes.counts are all zero")
    return dict(block)


# --- the monitor ------------------------------------------------------------------------------------


def _bets(rate_bound: float, upper: bool) -> tuple[float, ...]:
    """λ for each gap of `BET_GAPS`, kept below the largest bet that leaves every e-value > 0."""
    p = min(max(rate_bound, 1e-6), 1 - 1e-6)
    cap = 0.9 / p if upper else 0.9 / (1 - p)
    return tuple(min(g / (p * (1 - p)), cap) for g in BET_GAPS)


def _factors(low: float, high: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The e-values of one binary statistic's bets for x = 0 and x = 1: the upper half's bets (against
    ``high``) first, then the lower half's (against ``low``)."""
    lu, ld = _bets(high, True), _bets(low, False)
    x0 = tuple([1.0 - lam * high for lam in lu] + [1.0 + lam * low for lam in ld])
    x1 = tuple([1.0 + lam * (1.0 - high) for lam in lu] + [1.0 - lam * (1.0 - low) for lam in ld])
    return x0, x1


def _cusum_step(m: tuple[float, ...], f: tuple[float, ...]) -> tuple[float, ...]:
    """One frame of every bet's CUSUM e-detector, ``M = max(1, M) · E``, for the ten bets of a binary
    statistic (both halves), written out one by one: a loop over them costs twice as much in CPython.
    `DriftMonitor.observe` has the same lines inline for the confidence channel."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = m
    g0, g1, g2, g3, g4, g5, g6, g7, g8, g9 = f
    return (
        a0 * g0 if a0 > 1.0 else g0,
        a1 * g1 if a1 > 1.0 else g1,
        a2 * g2 if a2 > 1.0 else g2,
        a3 * g3 if a3 > 1.0 else g3,
        a4 * g4 if a4 > 1.0 else g4,
        a5 * g5 if a5 > 1.0 else g5,
        a6 * g6 if a6 > 1.0 else g6,
        a7 * g7 if a7 > 1.0 else g7,
        a8 * g8 if a8 > 1.0 else g8,
        a9 * g9 if a9 > 1.0 else g9,
    )


assert len(BET_GAPS) == 5, "the CUSUM updates are written out for exactly 2 x 5 bets"


class DriftMonitor:
    """One stream's e-detector. `observe(exit_position, confidence, label, plan, x)` once per frame (it
    samples every ``options.every``-th); `state()` is the JSON block. Thread safe: a sampled frame's
    update holds one lock; a frame that is not sampled takes no lock (its number comes from an
    atomic counter)."""

    def __init__(self, reference: Mapping, options: DriftOptions | None = None, live: bool = False) -> None:
        options = options or DriftOptions()
        self.options = options
        self.every = options.every_for(live)
        self.alpha = options.alpha
        self.threshold = 1.0 / options.alpha
        # above this the statistics are scaled down to 1e-10 of it (the alarm is raised by then): finite
        # on an endless run, and rare enough that a long alarm costs nothing per frame
        self._cap = min(max(_CAP, 1e10 * self.threshold), 1e300)
        self._lock = threading.Lock()
        self._count = itertools.count()  # next() is atomic: the frame's number without the lock
        exits = reference["exits"]
        self._q = tuple(float(e["q"]) for e in exits)
        # per exit, per x in (0, 1) (indexed by the bool ``confidence < q``): the ten e-values
        self._factors = tuple(_factors(float(e["low"]), float(e["high"])) for e in exits)
        self._k = len(BET_GAPS)
        self._m = (1.0,) * (2 * self._k)
        level = reference.get("level")
        self.level = level is not None
        if level is not None:  # the input's brightness: same bets, every LEVEL_EVERY-th sampled frame
            self._level_q, self._level_stride = float(level["q"]), int(level["stride"])
            self._level_factors = _factors(float(level["low"]), float(level["high"]))
        self._ml = (1.0,) * (2 * self._k)
        self._ml_sum = 2.0 * self._k if self.level else 0.0  # the level bets' CUSUMs, summed (1 each at first)
        classes = reference.get("classes") if options.labels else None
        self.labels = classes is not None
        ref_th = reference.get("thresholds")
        self._label_thresholds = tuple(float(t) for t in ref_th) if ref_th is not None else None
        if classes is not None:
            counts = [float(c) for c in classes["counts"]]
            total = sum(counts)
            self._pi = [c / total for c in counts]
            self._pi_kept = [(1.0 - LABEL_MIX) * p for p in self._pi]
            self._classes = len(self._pi)
            self._hi = [float(h) for h in classes["high"]]
            # the moving histogram stored as B[c] = G · ewma(c), so that one frame costs O(1) (see observe)
            self._b = list(self._pi)
            self._g = 1.0
        self._m_label = 1.0
        # the weights of the channels: each half of each binary statistic and the labels share alpha
        # equally; each half is the mean of its bets' CUSUMs
        self._w = 1.0 / ((4 if self.level else 2) + (1 if self.labels else 0))
        self._w_bet = self._w / self._k
        self._w_label = self._w if self.labels else 0.0
        self.frames = 0
        self.sampled = 0
        self.statistic = 0.0
        self.alarm = False
        self.first_alarm_frame: int | None = None  # the frame's number in the stream (1-based, every frame)
        self.first_alarm_sample: int | None = None
        self.channel: str | None = None  # what raised the alarm: confidence down/up, input darker/brighter, labels
        self._label_plan = True  # whether the answering plan is the calibrated one (labels watched)
        self._plan = None  # the plan last seen (an identity check per frame notices a switch)

    def set_label_plan(self, thresholds) -> None:
        """The label channel's reference holds for the calibrated plan only: another plan (other
        thresholds, a budget controller's rung) answers with other class shares, so its labels are
        not watched (e-value 1) while it runs."""
        cal = self._label_thresholds
        self._label_plan = cal is not None and tuple(float(t) for t in thresholds) == cal

    def observe(self, pos: int, confidence: float, label: int | None = None, plan=None, x=None, level=None) -> bool:
        """One frame: the first evaluated exit's position (0-based) and confidence, the answered class,
        the `CascadePlan` that answered (its thresholds decide whether the labels are watched) and the
        network's input ``x`` (its brightness is read on every `LEVEL_EVERY`-th sampled frame only;
        ``level``: that brightness already computed, `input_level`). Returns whether the monitor is in
        alarm. It runs once per frame on the hot path: the sampling test comes first, and the
        confidence channel's bets are written out (`_cusum_step` is the same update as a loop)."""
        n = next(self._count)
        self.frames = n + 1
        if n % self.every:
            return self.alarm
        with self._lock:
            if plan is not self._plan and plan is not None:
                self._plan = plan
                self.set_label_plan(plan.to_list())
            self.sampled = sampled = self.sampled + 1
            g0, g1, g2, g3, g4, g5, g6, g7, g8, g9 = self._factors[pos][confidence < self._q[pos]]
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = self._m
            a0 = a0 * g0 if a0 > 1.0 else g0
            a1 = a1 * g1 if a1 > 1.0 else g1
            a2 = a2 * g2 if a2 > 1.0 else g2
            a3 = a3 * g3 if a3 > 1.0 else g3
            a4 = a4 * g4 if a4 > 1.0 else g4
            a5 = a5 * g5 if a5 > 1.0 else g5
            a6 = a6 * g6 if a6 > 1.0 else g6
            a7 = a7 * g7 if a7 > 1.0 else g7
            a8 = a8 * g8 if a8 > 1.0 else g8
            a9 = a9 * g9 if a9 > 1.0 else g9
            self._m = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9)
            if self.level and not sampled % LEVEL_EVERY:
                self._level_step(x, level)
            s = self._w_bet * (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + self._ml_sum)
            if self.labels:
                # the label channel's CUSUM: e-value p̂(y)/hi(y), p̂ from the frames before this one
                # (predictable); the moving histogram is B/G with G growing by 1/(1-η) per frame, so a
                # frame updates one class, not all of them; a frame without a watched class has e-value 1
                ml = self._m_label
                ml = ml if ml > 1.0 else 1.0
                if label is not None and self._label_plan and 0 <= label < self._classes:
                    b, g = self._b, self._g
                    ml *= (self._pi_kept[label] + LABEL_MIX * b[label] / g) / self._hi[label]
                    g /= _KEEP
                    b[label] += LABEL_RATE * g
                    if g > 1e100:  # renormalise (rarely): B and G scale together
                        self._b = [v / g for v in b]
                        g = 1.0
                    self._g = g
                self._m_label = ml
                s += self._w * ml
            self.statistic = s
            if s >= self.threshold:
                self._alarm(s, n + 1)
            return self.alarm

    def _level_step(self, x, level) -> None:
        """The input-brightness channel's frame (no input and no level: e-value 1, the frame unread)."""
        if level is None:
            if x is None:
                return
            level = input_level(x, self._level_stride)
        m = self._ml = _cusum_step(self._ml, self._level_factors[level < self._level_q])
        self._ml_sum = sum(m)

    def parts(self) -> dict[str, float]:
        """Each channel's share of the statistic before its weight: the mean of a half's bets' CUSUMs,
        the label CUSUM."""
        k, m, ml = self._k, self._m, self._ml
        out = {"confidence down": sum(m[:k]) / k, "confidence up": sum(m[k:]) / k}
        if self.level:
            out["input darker"] = sum(ml[:k]) / k  # more frames below the calibration median brightness
            out["input brighter"] = sum(ml[k:]) / k
        out["labels"] = self._m_label if self.labels else 0.0
        return out

    def _alarm(self, s: float, frame: int) -> None:
        if not self.alarm:
            self.alarm = True
            self.first_alarm_frame, self.first_alarm_sample = frame, self.sampled
            parts = self.parts()  # confidence down: more frames below the median, less confident
            self.channel = max(parts, key=lambda name: parts[name])
        if s > self._cap:  # keeps the numbers finite on an endless run (the alarm is already raised)
            r = 1e-10 * self._cap / s
            self._m = tuple(a * r for a in self._m)
            self._ml = tuple(a * r for a in self._ml)
            self._ml_sum *= r
            self._m_label *= r
            self.statistic = s * r

    def state(self) -> dict:
        """The ``drift`` block of `edgeexit run --json`: alarm, first_alarm_frame, statistic (compared
        with 1/alpha), alpha, sampled_frames; and what raised the alarm."""
        with self._lock:
            return {
                "alarm": self.alarm,
                "first_alarm_frame": self.first_alarm_frame,
                "statistic": float(self.statistic),
                "alpha": self.alpha,
                "sampled_frames": self.sampled,
                "frames": self.frames,
                "every": self.every,
                "threshold": self.threshold,
                "channel": self.channel,
                "labels_watched": self.labels and self._label_plan,
                "input_level_watched": self.level,
            }


def monitor_for(calibration, num_exits: int, options: DriftOptions, live: bool = False) -> DriftMonitor:
    """A monitor from a `Calibration` (runtime/artifact.py) or None; a calibration without the
    reference raises `DriftUnavailableError` saying what to do."""
    block = None if calibration is None else getattr(calibration, "drift_reference", None)
    if block is None:
        raise DriftUnavailableError(
            "the drift monitor needs the calibration's drift reference, which this artifact does not have "
            "(calibrated before the monitor existed, or not calibrated): run `edgeexit calibrate` again"
        )
    ref = parse_reference(block, num_exits)
    return DriftMonitor(ref, options, live)


def alarm_message(source: str, state: Mapping) -> str:
    """The warning `run` prints once a stream's monitor alarms (the caller adds "drift warning: ")."""
    why = {
        "confidence down": "the first evaluated exit is less confident than on the calibration images",
        "confidence up": "the first evaluated exit is more confident than on the calibration images",
        "labels": "the answered classes are not shared as on the calibration images",
        "input darker": "the images are darker than the calibration images, as the network sees them",
        "input brighter": "the images are brighter than the calibration images, as the network sees them",
    }.get(state["channel"], "")
    return (
        f"{source}: at frame {state['first_alarm_frame']} the images stopped looking like the calibration images "
        f"({why}; e-detector {state['statistic']:.3g} >= 1/alpha = {1 / state['alpha']:.0f}): the --max-drop "
        "certificate and the calibrated thresholds no longer apply; collect labelled frames from this camera and "
        "re-calibrate on them (edgeexit calibrate --data)"
    )


__all__ = [
    "DEFAULT_ALPHA",
    "LEVEL_EVERY",
    "LIVE_EVERY",
    "DriftMonitor",
    "DriftOptions",
    "DriftUnavailableError",
    "alarm_message",
    "as_options",
    "clopper_pearson",
    "frame_levels",
    "input_level",
    "monitor_for",
    "parse_reference",
    "reference_statistics",
]
