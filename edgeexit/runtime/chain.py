"""Every unit in order over a `Runner`: the one "run the unit chain" of edgeexit (numpy only).

Export's parity checks (FP32 vs PyTorch, INT8 and FP16 vs FP32), INT8 calibration (the inputs each
segment sees), calibration's exit statistics and bench's every-unit latency all walk the chain
here, through the same runner the cascade uses (`OnnxRuntimeBackend.for_units` over export's
temporary folder), rather than each building its own sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypedDict

import numpy as np

from edgeexit.runtime.backends.base import HeadOutput, Runner


class _ChainExits(TypedDict):
    confidence: np.ndarray  # (N, K)
    prediction: np.ndarray  # (N, K) int64


class ChainOutputs(_ChainExits, total=False):
    """What `chain_outputs` returns; ``logits`` only when asked for."""

    logits: list[np.ndarray]  # K arrays of (N, classes)


def walk(runner: Runner, state: tuple, num_exits: int) -> Iterator[tuple[int, tuple, tuple, HeadOutput]]:
    """Segment 1, head 1, segment 2, ... on one batch: yields (pos, the segment's inputs, its outputs,
    the head's output) for every 0-based exit position."""
    for pos in range(num_exits):
        inputs = state
        state = runner.run_segment(pos, inputs)
        yield pos, inputs, state, runner.run_head(pos, state[-1])


def chain_outputs(
    runner: Runner,
    images: np.ndarray,
    num_exits: int,
    batch_size: int = 64,
    confidence: Callable[[HeadOutput], np.ndarray] | None = None,
    logits: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ChainOutputs:
    """Every exit on preprocessed float32 (N, C, H, W) images, in batches of ``batch_size``:
    ``confidence`` (N, K) (the head's own, or ``confidence(head)``), ``prediction`` (N, K) and, with
    ``logits``, a list of K (N, classes) arrays."""
    n = len(images)
    conf = np.zeros((n, num_exits))
    pred = np.zeros((n, num_exits), dtype=np.int64)
    kept: list[list[np.ndarray]] = [[] for _ in range(num_exits)]
    for start in range(0, n, batch_size):
        xb = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        rows = slice(start, start + len(xb))
        for pos, _, _, head in walk(runner, runner.from_host(xb), num_exits):
            z = head.logits()
            conf[rows, pos] = head.confidence if confidence is None else confidence(head)
            pred[rows, pos] = z.argmax(axis=1)
            if logits:
                kept[pos].append(np.asarray(z))
        if progress is not None:
            progress(min(start + batch_size, n))
    out: ChainOutputs = {"confidence": conf, "prediction": pred}
    if logits:
        out["logits"] = [np.concatenate(k) for k in kept]
    return out
