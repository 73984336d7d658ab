"""Cascade simulation and the MSDNet geometric thresholds (numpy only).

Exit statistics are ``confidence (N, K)`` and ``correct (N, K)``: what every exit would say for every
sample. A cascade with thresholds ``th`` stops a sample at the first exit k whose confidence is
``>= th[k]``; the last exit always accepts. A threshold above 1 means the exit is never taken,
and the cascade skips that head entirely.
"""

from __future__ import annotations

import numpy as np

SKIP = 2.0  # any threshold > 1: the exit is never taken and its head is not evaluated


def exit_indices(confidence: np.ndarray, thresholds: np.ndarray | list[float]) -> np.ndarray:
    """0-based exit index of every sample under ``thresholds`` (last exit always accepts)."""
    th = np.asarray(thresholds, dtype=np.float64)
    take = confidence >= th[None, :]
    take[:, -1] = True
    return take.argmax(axis=1)


def cascade_accuracy(confidence: np.ndarray, correct: np.ndarray, thresholds) -> float:
    e = exit_indices(confidence, thresholds)
    return float(correct[np.arange(len(e)), e].mean())


def per_sample_cost(exits: np.ndarray, thresholds, segment_cost: np.ndarray, head_cost: np.ndarray) -> np.ndarray:
    """Cost of every sample: all segments up to its exit, plus every *evaluated* head up to it.

    Heads whose threshold is above 1 are skipped (cost nothing) except the last, which always runs.
    """
    th = np.asarray(thresholds, dtype=np.float64)
    evaluated = th <= 1.0
    evaluated[-1] = True
    cum = np.cumsum(np.asarray(segment_cost, dtype=np.float64) + np.where(evaluated, head_cost, 0.0))
    return cum[exits]


def geometric_thresholds(confidence: np.ndarray, q: float) -> np.ndarray:
    """MSDNet's budgeted-batch rule: a share ∝ q^k of the samples leaves at exit k.

    Thresholds are read off ``confidence`` (a held-out split) exit by exit: at exit k the
    ``n·p_k`` most confident of the samples still running leave.
    """
    n, k = confidence.shape
    p = q ** np.arange(1, k + 1, dtype=np.float64)
    p /= p.sum()
    th = np.full(k, -np.inf)
    remaining = np.ones(n, dtype=bool)
    for i in range(k - 1):
        count = int(np.floor(n * p[i]))
        conf = confidence[remaining, i]
        if count <= 0 or conf.size == 0:
            th[i] = SKIP  # nobody leaves here
            continue
        order = np.sort(conf)[::-1]
        th[i] = order[min(count, conf.size) - 1]
        remaining &= ~(confidence[:, i] >= th[i])
    th[-1] = -np.inf
    return th


GEOMETRIC_QS = tuple(np.round(np.arange(0.05, 2.0001, 0.05), 4))
