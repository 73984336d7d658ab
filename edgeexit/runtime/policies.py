"""Exit confidence policies (numpy only). Higher means more confident; values lie in [0, 1].

The same functions are used by `calibrate` (to choose thresholds) and by the runtime (to apply
them), so a threshold means the same thing in both places.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(axis=1)


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability."""
    p = np.sort(softmax(logits), axis=1)
    return p[:, -1] - p[:, -2]


def entropy(logits: np.ndarray) -> np.ndarray:
    """1 - H(p) / log(C): 1 for a one-hot prediction, 0 for a uniform one."""
    p = softmax(logits)
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return 1.0 - h / np.log(p.shape[1])


POLICIES = {"max_softmax": max_softmax, "margin": margin, "entropy": entropy}


def get_policy(name: str):
    if name not in POLICIES:
        raise ValueError(f"unknown confidence policy '{name}': use one of {', '.join(POLICIES)}")
    return POLICIES[name]
