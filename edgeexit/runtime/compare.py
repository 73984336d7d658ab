"""One comparator of two runners, exit by exit (numpy only: it runs on the device).

Modelled on Polygraphy's ``Comparator.run`` + ``compare_accuracy``: both runners walk the same
preprocessed images through every unit (`edgeexit.runtime.chain.chain_outputs`, the chain the
cascade runs), and every exit gets one record (`ExitStats`): |Δconfidence|, |Δlogit|, prediction
agreement with its binomial bounds and, with labels, both accuracies and the drop. A `Tolerance`
then says which of these quantities are judged, and how far they may go:

- ``max |Δconfidence|``: the value the cascade's thresholds act on. A head whose confidences moved
  moves every threshold's meaning, even when no prediction flips.
- prediction agreement, judged with an exact one-sided binomial (Clopper-Pearson) bound at 95 %:
  an exit fails when the data show, at that confidence, that the candidate disagrees with the
  reference on more than ``max_disagreement`` of frames. A healthy engine with a few flips then
  does not fail at random, and ``disagreement_upper`` says what the frames used can vouch for
  (0 flips in 600 frames: at most 0.50 %; in 5,000 frames: at most 0.06 %).
- ``max |Δlogit|`` and the accuracy drop, for export's own checks (below).

Every parity check of edgeexit is one call here, with its own tolerance:

- export, ONNX Runtime FP32 against PyTorch: |Δlogit| within ``--tolerance`` (`export/parity.py`);
- export --int8, the INT8 units against FP32: each exit's accuracy within ``--int8-tolerance``
  (`export/quantize.py`; the TensorRT flavour too, with the int8 agreement verdict beside it);
- export --half, the FP16 units against FP32: recorded under the fp16 tolerance (`export/onnx_units.py`);
- the engine gate, TensorRT against ONNX Runtime FP32: the precision's `TOLERANCES`
  (`export/tensorrt.py`); docs/design.md states them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from edgeexit.runtime.backends.base import Runner
from edgeexit.runtime.chain import ChainOutputs, chain_outputs

CONFIDENCE_LEVEL = 0.95  # of the binomial bounds
MIN_FRAMES = 100  # fewer frames cannot tell a 1 % disagreement from none; refused as a gate


@dataclass(frozen=True)
class Tolerance:
    """What one exit may differ by. A bound left None is not judged.

    - ``max_abs_confidence``: the largest |Δconfidence| on any frame;
    - ``max_disagreement``: the largest share of frames whose predicted label may differ (judged
      with the binomial bound; needs `MIN_FRAMES`);
    - ``max_abs_logit``: the largest |Δlogit| on any frame and class (export's FP32 check against
      PyTorch, where both sides compute the same function);
    - ``max_accuracy_drop``: the largest fall of accuracy from reference to candidate, a fraction
      (INT8 units, whose flips may cancel out; needs labels)."""

    max_abs_confidence: float | None = None
    max_disagreement: float | None = None
    max_abs_logit: float | None = None
    max_accuracy_drop: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# fp32 includes TF32 (TensorRT rounds FP32 conv/matmul inputs to 10-bit mantissas by default on
# Ampere and later: relative error 2^-11 per input); fp16 segments keep their heads in FP32; int8
# moves confidences of borderline frames the most, so its |Δconfidence| bound is the loosest.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_confidence=5e-3, max_disagreement=0.005),
    "fp16": Tolerance(max_abs_confidence=3e-2, max_disagreement=0.01),
    "int8": Tolerance(max_abs_confidence=0.25, max_disagreement=0.03),
}


def _log_binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    lg = np.vectorize(math.lgamma)
    return lg(n + 1) - lg(k + 1) - lg(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def _tail_at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return float(np.exp(_log_binom_pmf(np.arange(k, n + 1), n, p)).sum())


def _bisect(f, target: float) -> float:
    """The p in [0, 1] where the increasing function ``f`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, level: float = CONFIDENCE_LEVEL) -> tuple[float, float]:
    """Exact one-sided bounds on a binomial rate from ``k`` events in ``n`` trials: (lower, upper),
    each holding with probability ``level`` (the lower bound is 0 for k = 0, the upper 1 for k = n)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1.0 - level
    lower = 0.0 if k == 0 else _bisect(lambda p: _tail_at_least(k, n, p), alpha)
    # upper: the p at which P(X <= k) falls to alpha, i.e. P(X >= k + 1) rises to 1 - alpha
    upper = 1.0 if k == n else _bisect(lambda p: _tail_at_least(k + 1, n, p), 1.0 - alpha)
    return lower, upper


@dataclass(frozen=True)
class ExitStats:
    exit: int  # 1-based
    frames: int
    max_abs_confidence_diff: float
    mean_abs_confidence_diff: float
    max_abs_logit_diff: float
    disagreements: int
    prediction_agreement: float
    disagreement_lower: float  # at CONFIDENCE_LEVEL
    disagreement_upper: float
    reference_accuracy: float | None
    candidate_accuracy: float | None
    accuracy_drop_pt: float | None  # reference accuracy minus the candidate's, in points


@dataclass(frozen=True)
class ExitComparison:
    """Per-exit statistics of candidate vs reference, and the verdict under ``tolerance``."""

    reference: str
    candidate: str
    frames: int
    exits: tuple[ExitStats, ...]
    tolerance: Tolerance
    failures: tuple[str, ...]  # one line per exit and quantity out of tolerance

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_confidence_diff(self) -> float:
        return max(e.max_abs_confidence_diff for e in self.exits)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(e.max_abs_logit_diff for e in self.exits)

    @property
    def min_prediction_agreement(self) -> float:
        return min(e.prediction_agreement for e in self.exits)

    @property
    def max_drop_pt(self) -> float | None:
        """The largest per-exit accuracy drop in points; None without labels."""
        drops = [e.accuracy_drop_pt for e in self.exits if e.accuracy_drop_pt is not None]
        return max(drops) if drops else None

    def judged(self, tolerance: Tolerance | str) -> ExitComparison:
        """The same statistics judged under another tolerance (one run, two questions)."""
        tol = _tolerance(tolerance)
        return replace(self, tolerance=tol, failures=_failures(self.exits, tol))

    def to_json(self) -> dict:
        out = {
            "reference": self.reference,
            "candidate": self.candidate,
            "frames": self.frames,
            "confidence_level": CONFIDENCE_LEVEL,
            "tolerance": self.tolerance.to_json(),
            "exits": [asdict(e) for e in self.exits],
            "max_abs_confidence_diff": self.max_abs_confidence_diff,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "min_prediction_agreement": self.min_prediction_agreement,
            "failures": list(self.failures),
            "passed": self.passed,
        }
        if self.max_drop_pt is not None:
            out["max_drop_pt"] = self.max_drop_pt
        return out


def _describe(runner: Runner) -> str:
    info = runner.info
    return f"{info.name} {info.precision}"


def _tolerance(tolerance: Tolerance | str) -> Tolerance:
    return TOLERANCES[tolerance] if isinstance(tolerance, str) else tolerance


def compare_exits(
    reference: Runner,
    candidate: Runner,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    num_exits: int,
    tolerance: Tolerance | str = "fp32",
    batch_size: int | None = None,
) -> ExitComparison:
    """Run ``images`` (preprocessed float32 (N, C, H, W)) through both runners and judge every exit
    against ``tolerance`` (a `Tolerance`, or a precision naming one of `TOLERANCES`)."""
    tol = _tolerance(tolerance)
    n = len(images)
    if tol.max_disagreement is not None and n < MIN_FRAMES:
        raise ValueError(f"a comparison needs at least {MIN_FRAMES} frames to judge agreement, got {n}")
    if tol.max_accuracy_drop is not None and labels is None:
        raise ValueError("an accuracy-drop tolerance needs the images' labels")
    limits = [r.info.max_batch for r in (reference, candidate) if r.info.max_batch]
    batch = min([batch_size or 64, *limits])
    ref = chain_outputs(reference, images, num_exits, batch_size=batch, logits=True)
    cand = chain_outputs(candidate, images, num_exits, batch_size=batch, logits=True)
    exits = tuple(_exit_stats(ref, cand, pos, labels) for pos in range(num_exits))
    return ExitComparison(_describe(reference), _describe(candidate), n, exits, tol, _failures(exits, tol))


def _exit_stats(ref: ChainOutputs, cand: ChainOutputs, pos: int, labels: np.ndarray | None) -> ExitStats:
    n = len(ref["prediction"])
    dconf = np.abs(ref["confidence"][:, pos] - cand["confidence"][:, pos])
    disagree = int((ref["prediction"][:, pos] != cand["prediction"][:, pos]).sum())
    lower, upper = clopper_pearson(disagree, n)
    ref_acc: float | None = None
    cand_acc: float | None = None
    if labels is not None:
        ref_acc, cand_acc = (float((out["prediction"][:, pos] == labels).mean()) for out in (ref, cand))
    return ExitStats(
        exit=pos + 1,
        frames=n,
        max_abs_confidence_diff=float(dconf.max()),
        mean_abs_confidence_diff=float(dconf.mean()),
        max_abs_logit_diff=float(np.abs(ref["logits"][pos] - cand["logits"][pos]).max()),
        disagreements=disagree,
        prediction_agreement=1.0 - disagree / n,
        disagreement_lower=lower,
        disagreement_upper=upper,
        reference_accuracy=ref_acc,
        candidate_accuracy=cand_acc,
        accuracy_drop_pt=None if ref_acc is None or cand_acc is None else 100 * (ref_acc - cand_acc),
    )


def _failures(exits: tuple[ExitStats, ...], tol: Tolerance) -> tuple[str, ...]:
    """One line per exit and judged quantity out of ``tol`` (a NaN difference fails too)."""
    out = []
    for e in exits:
        k = e.exit
        if tol.max_abs_confidence is not None and not e.max_abs_confidence_diff <= tol.max_abs_confidence:
            out.append(f"exit {k}: max |Δconfidence| {e.max_abs_confidence_diff:.3g} > {tol.max_abs_confidence:g}")
        if tol.max_abs_logit is not None and not e.max_abs_logit_diff <= tol.max_abs_logit:
            out.append(f"exit {k}: max |Δlogit| {e.max_abs_logit_diff:.3g} > {tol.max_abs_logit:g}")
        if tol.max_disagreement is not None and e.disagreement_lower > tol.max_disagreement:
            out.append(
                f"exit {k}: predictions differ on {e.disagreements}/{e.frames} frames, at least "
                f"{100 * e.disagreement_lower:.2f} % at {CONFIDENCE_LEVEL:.0%} confidence "
                f"> {100 * tol.max_disagreement:g} %"
            )
        # a drop equal to the tolerance passes: the epsilon absorbs the float rounding of two means
        if tol.max_accuracy_drop is not None and not (e.accuracy_drop_pt or 0.0) <= 100 * tol.max_accuracy_drop + 1e-10:
            out.append(f"exit {k}: accuracy drops {e.accuracy_drop_pt:.2f} pt > {100 * tol.max_accuracy_drop:.2f} pt")
    return tuple(out)
