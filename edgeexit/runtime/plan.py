"""`CascadePlan`: which exits a cascade evaluates and when a sample leaves (numpy only).

This module is the single owner of the cascade's rules; everything else asks it:

- **thresholds**: one per exit, compared with that exit's confidence (``>=`` leaves);
- **the skip rule**: a threshold above 1 means the exit is never taken, so its head never runs
  (``SKIP`` is the value written for such an exit); the last exit always runs and accepts;
- **segment groups**: the runs of segments between two evaluated exits (run back to back, and
  fused into one graph by backends that can);
- **unit names** (``seg_01``, ``head_01``, ``seg_02-04`` for a fused group) and unit positions;
- **exit numbering**: public outputs (``Prediction.exit_index``, JSON, tables) count exits from 1;
  positions inside the code count from 0 and are named ``pos`` (``exit_pos``, ``first_pos``).

A plan is immutable: `Cascade.set_thresholds` builds a new one and swaps it in with one assignment,
so a thread that read ``cascade.plan`` keeps a consistent view for the whole call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SKIP = 2.0  # any threshold > 1 skips the exit; this is the value edgeexit writes for one

# MSDNet's budgeted-batch rule (a share ∝ q^k of the samples leaves at exit k), one grid of q for
# every caller: evaluation's budgeted curve, the calibration baseline and its plot.
MSDNET_QS = tuple(
    float(q) for q in np.round(np.concatenate([np.arange(0.02, 1.0, 0.02), np.arange(1.0, 4.01, 0.1)]), 4).tolist()
)


def segment_name(pos: int) -> str:
    """Name of segment ``pos`` (0-based): ``seg_01`` for the first."""
    return f"seg_{pos + 1:02d}"


def head_name(pos: int) -> str:
    return f"head_{pos + 1:02d}"


def group_name(first_pos: int, last_pos: int) -> str:
    """``seg_03`` for one segment, ``seg_02-04`` for segments 2..4 fused into one graph."""
    if first_pos == last_pos:
        return segment_name(first_pos)
    return f"seg_{first_pos + 1:02d}-{last_pos + 1:02d}"


def exit_group_name(first_pos: int, last_pos: int) -> str:
    """``seg_02-04+head_04``: segments 2..4 and head 4, run as one call (one evaluated exit's work)."""
    return f"{group_name(first_pos, last_pos)}+{head_name(last_pos)}"


def unit_names(num_exits: int) -> list[str]:
    """The manifest's unit order: seg_01, head_01, seg_02, head_02, ..."""
    return [n for pos in range(num_exits) for n in (segment_name(pos), head_name(pos))]


def evaluated_mask(thresholds: np.ndarray) -> np.ndarray:
    """Which heads run under ``thresholds`` (array form of the skip rule, for vectorised search)."""
    ev = np.asarray(thresholds, dtype=np.float64) <= 1.0
    ev[-1] = True
    return ev


def exit_positions(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0-based exit of every sample from every exit's confidence (N, K) under ``thresholds``:
    the first evaluated exit whose confidence is >= its threshold, else the last."""
    th = np.asarray(thresholds, dtype=np.float64)
    take = (confidence >= th[None, :]) & evaluated_mask(th)[None, :]
    take[:, -1] = True
    return take.argmax(axis=1)


def segment_groups(evaluated: tuple[bool, ...] | list[bool]) -> tuple[tuple[int, int], ...]:
    """0-based (first, last) segment of each run that ends at an evaluated exit.

    >>> segment_groups([True, False, True, False, False, True])
    ((0, 0), (1, 2), (3, 5))
    """
    groups, start = [], 0
    for pos, ev in enumerate(evaluated):
        if ev or pos == len(evaluated) - 1:
            groups.append((start, pos))
            start = pos + 1
    return tuple(groups)


@dataclass(frozen=True)
class CascadePlan:
    """An immutable cascade configuration. Build it with `CascadePlan.from_thresholds` (or the
    named constructors); never edit it."""

    thresholds: tuple[float, ...]  # one per exit; the last is ignored (always accepts)
    evaluated: tuple[bool, ...]  # which heads run
    groups: tuple[tuple[int, int], ...]  # 0-based (first, last) segment per evaluated exit
    group_names: tuple[str, ...]

    @classmethod
    def from_thresholds(cls, thresholds, num_exits: int | None = None) -> CascadePlan:
        """Validate ``thresholds`` (one number per exit, no NaN) and derive the plan."""
        values = [float(t) for t in thresholds]
        if num_exits is not None and len(values) != num_exits:
            raise ValueError(f"thresholds needs one value per exit ({num_exits}), got {len(values)}")
        if not values:
            raise ValueError("thresholds needs at least one value")
        if any(math.isnan(t) for t in values):
            raise ValueError("thresholds must be numbers, not NaN")
        evaluated = tuple(bool(e) for e in evaluated_mask(np.asarray(values)))
        groups = segment_groups(evaluated)
        return cls(tuple(values), evaluated, groups, tuple(group_name(a, b) for a, b in groups))

    @classmethod
    def full_model(cls, num_exits: int) -> CascadePlan:
        """Every intermediate exit skipped: the backbone and the final head, i.e. the plain model."""
        return cls.from_thresholds([SKIP] * (num_exits - 1) + [0.0])

    @classmethod
    def first_exit(cls, num_exits: int) -> CascadePlan:
        """Every sample leaves at exit 1 (the cheapest cascade)."""
        return cls.from_thresholds([0.0] * num_exits)

    @classmethod
    def msdnet(cls, confidence: np.ndarray, q: float) -> CascadePlan:
        """MSDNet's geometric thresholds read off held-out ``confidence`` (N, K): at exit k the
        ``N·p_k`` most confident of the samples still running leave, with p_k ∝ q^k."""
        n, k = confidence.shape
        p = q ** np.arange(1, k + 1, dtype=np.float64)
        p /= p.sum()
        th = np.full(k, SKIP)
        remaining = np.ones(n, dtype=bool)
        for pos in range(k - 1):
            count = int(np.floor(n * p[pos]))
            conf = confidence[remaining, pos]
            if count <= 0 or conf.size == 0:
                continue  # nobody leaves here: skipped
            th[pos] = np.sort(conf)[::-1][min(count, conf.size) - 1]
            remaining &= ~(confidence[:, pos] >= th[pos])
        th[-1] = 0.0
        return cls.from_thresholds(th)

    # -- what the plan says ----------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    @property
    def evaluated_exits(self) -> list[int]:
        """1-based numbers of the exits whose heads run."""
        return [pos + 1 for pos, ev in enumerate(self.evaluated) if ev]

    def accepts(self, exit_pos: int, confidence: float) -> bool:
        """Does a sample with ``confidence`` at exit ``exit_pos`` (0-based) leave there?"""
        return exit_pos == len(self.thresholds) - 1 or confidence >= self.thresholds[exit_pos]

    def exit_positions(self, confidence: np.ndarray) -> np.ndarray:
        """0-based exit of every sample, from every exit's confidence (N, K)."""
        return exit_positions(confidence, np.asarray(self.thresholds))

    def to_list(self) -> list[float]:
        """JSON form: skipped exits as ``SKIP``, the last exit as 0.0 (it always accepts)."""
        return [
            SKIP if not ev else max(0.0, min(t, 1.0))
            for t, ev in zip(self.thresholds[:-1], self.evaluated, strict=False)
        ] + [0.0]

    def describe(self) -> str:
        """``0.914, skip, 0.818, ..., accept``."""
        return ", ".join(
            "skip" if not ev else f"{t:.3f}" for t, ev in zip(self.thresholds[:-1], self.evaluated, strict=False)
        ) + (", accept")
