"""One comparator of two runners, exit by exit (numpy only: it runs on the device).

Modelled on Polygraphy's ``Comparator.run`` + ``compare_accuracy``: both runners walk the same
preprocessed images through every unit (`edgeexit.runtime.chain.chain_outputs`, the chain the
cascade runs), and every exit is judged on two quantities:

- ``max |Δconfidence|``: the value the cascade's thresholds act on. A head whose confidences moved
  moves every threshold's meaning, even when no prediction flips.
- prediction agreement, judged with an exact one-sided binomial (Clopper-Pearson) bound at 95 %:
  an exit fails when the data show, at that confidence, that the candidate disagrees with the
  reference on more than ``max_disagreement`` of frames. A healthy engine with a few flips then
  does not fail at random, and ``disagreement_upper`` says what the frames used can vouch for
  (0 flips in 600 frames: at most 0.50 %; in 5,000 frames: at most 0.06 %).

Tolerances are per precision (`TOLERANCES`); docs/design.md states them. Labels, when given, add
each runner's accuracy per exit (reported, not gated: agreement with the reference is the stricter
question, and it needs no labels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgeexit.runtime.backends.base import Runner
from edgeexit.runtime.chain import chain_outputs

CONFIDENCE_LEVEL = 0.95  # of the binomial bounds
MIN_FRAMES = 100  # fewer frames cannot tell a 1 % disagreement from none; refused as a gate


@dataclass(frozen=True)
class Tolerance:
    """What one exit may differ by: the largest |Δconfidence| on any frame, and the largest share of
    frames whose predicted label may differ (judged with the binomial bound)."""

    max_abs_confidence: float
    max_disagreement: float


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

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "frames": self.frames,
            "confidence_level": CONFIDENCE_LEVEL,
            "tolerance": asdict(self.tolerance),
            "exits": [asdict(e) for e in self.exits],
            "max_abs_confidence_diff": max(e.max_abs_confidence_diff for e in self.exits),
            "min_prediction_agreement": min(e.prediction_agreement for e in self.exits),
            "failures": list(self.failures),
            "passed": self.passed,
        }


def _describe(runner: Runner) -> str:
    info = runner.info
    return f"{info.name} {info.precision}"


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
    tol = TOLERANCES[tolerance] if isinstance(tolerance, str) else tolerance
    n = len(images)
    if n < MIN_FRAMES:
        raise ValueError(f"a comparison needs at least {MIN_FRAMES} frames to judge agreement, got {n}")
    limits = [r.info.max_batch for r in (reference, candidate) if r.info.max_batch]
    batch = min([batch_size or 64, *limits])
    ref = chain_outputs(reference, images, num_exits, batch_size=batch, logits=True)
    cand = chain_outputs(candidate, images, num_exits, batch_size=batch, logits=True)
    exits, failures = [], []
    for pos in range(num_exits):
        dconf = np.abs(ref["confidence"][:, pos] - cand["confidence"][:, pos])
        disagree = int((ref["prediction"][:, pos] != cand["prediction"][:, pos]).sum())
        lower, upper = clopper_pearson(disagree, n)
        acc = (
            (None, None)
            if labels is None
            else tuple(float((p[:, pos] == labels).mean()) for p in (ref["prediction"], cand["prediction"]))
        )
        stats = ExitStats(
            exit=pos + 1,
            frames=n,
            max_abs_confidence_diff=float(dconf.max()),
            mean_abs_confidence_diff=float(dconf.mean()),
            max_abs_logit_diff=float(np.abs(ref["logits"][pos] - cand["logits"][pos]).max()),
            disagreements=disagree,
            prediction_agreement=1.0 - disagree / n,
            disagreement_lower=lower,
            disagreement_upper=upper,
            reference_accuracy=acc[0],
            candidate_accuracy=acc[1],
        )
        exits.append(stats)
        if not stats.max_abs_confidence_diff <= tol.max_abs_confidence:  # NaN fails too
            failures.append(
                f"exit {pos + 1}: max |Δconfidence| {stats.max_abs_confidence_diff:.3g} > {tol.max_abs_confidence:g}"
            )
        if lower > tol.max_disagreement:
            failures.append(
                f"exit {pos + 1}: predictions differ on {disagree}/{n} frames, at least {100 * lower:.2f} % "
                f"at {CONFIDENCE_LEVEL:.0%} confidence > {100 * tol.max_disagreement:g} %"
            )
    return ExitComparison(_describe(reference), _describe(candidate), n, tuple(exits), tol, tuple(failures))
