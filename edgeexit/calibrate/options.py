"""The options of `edgeexit calibrate`, validated in one place (numpy only).

A bad value raises `OptionError`, which names the `CalibrationOptions` fields at fault; its message is
phrased with the CLI's names for them (`CLI_NAMES`), which is what `edgeexit calibrate` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeexit.errors import UserError

# How the CLI names each option field in messages (fields without a flag keep their own name).
CLI_NAMES = {
    "budget_ms": "the budget",
    "budget_fraction": "the budget",
    "max_drop": "--max-drop",
    "confidence": "--confidence",
    "metric": "--metric",
    "split": "--split",
    "policy": "--policy",
    "limit": "--limit",
    "verify_limit": "--verify-limit",
    "repeats": "--repeats",
    "frame_size": "--frame-size",
    "repeat": "--repeat",
}


MAX_FRAME_SIDE = 16384  # wider than any camera sensor's frame; larger is a typo


def parse_frame_size(text: str) -> tuple[int, int]:
    """``1920x1080`` (also ``1920X1080``, ``1920*1080``) → (1920, 1080); anything else is an OptionError."""
    parts = text.strip().lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise OptionError("frame_size", f"must be WIDTHxHEIGHT in pixels (e.g. 1920x1080), got '{text}'")
    w, h = (int(p) for p in parts)
    if not (1 <= w <= MAX_FRAME_SIDE and 1 <= h <= MAX_FRAME_SIDE):
        raise OptionError("frame_size", f"must be WIDTHxHEIGHT, each 1..{MAX_FRAME_SIDE} pixels, got '{text}'")
    return w, h


class OptionError(UserError):
    """A bad `CalibrationOptions` value: ``fields`` names the fields at fault and ``problem`` says what
    is wrong with them; the message is that, phrased with the CLI's names (`CLI_NAMES`)."""

    def __init__(self, fields: str | tuple[str, ...], problem: str, message: str | None = None) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem = problem
        super().__init__(message or f"{CLI_NAMES.get(self.fields[0], self.fields[0])} {problem}")


@dataclass(frozen=True)
class CalibrationOptions:
    """Every option of `edgeexit calibrate`, validated in one place."""

    budget_ms: float | None = None
    budget_fraction: float | None = None  # of the full model's predicted latency
    metric: str = "mean"
    backend: str = "auto"
    data: str | None = None
    split: str = "heldout"
    limit: int | None = None  # calibration images
    verify_limit: int | None = None
    repeats: int = 200
    policy: str = "max_softmax"
    data_dir: str | None = None
    plot: str | None = None
    seed: int = 0
    iso_accuracy: bool = True
    max_drop: float | None = None  # accuracy drop vs the full model allowed (fraction: 0.005 = 0.5 pt)
    precision: str | None = None  # the units to calibrate (int8 after `export --int8`); None: the backend's
    confidence: float = 0.95  # of the --max-drop promise
    ladder_steps: int = 16  # plans in the ladder (the budget controller's rungs; benchmarks ask for more)
    # (width, height) of the frames the app hands the cascade: the budget then covers their
    # preprocessing too; None: the budget covers the cascade on network-size frames
    frame_size: tuple[int, int] | None = None
    repeat: int = 1  # profiles taken at most while the device is too busy to trust one (their rounds pooled)
    accept_load: bool = False  # write the plan even when the device stayed too busy (the report says so)

    def __post_init__(self) -> None:  # noqa: C901
        from edgeexit.runtime.policies import POLICIES

        if self.budget_ms is not None and self.budget_fraction is not None:
            raise OptionError(
                ("budget_ms", "budget_fraction"),
                "both given",
                "give one budget: in time (5ms) or as a share of the full model (50%), not both",
            )
        if self.budget_ms is None and self.budget_fraction is None and self.max_drop is None:
            raise OptionError(
                ("budget_ms", "budget_fraction", "max_drop"),
                "none given",
                "give --budget (5ms, 50%), --max-drop (0.5pt), or both",
            )
        if self.max_drop is not None and not (0 <= self.max_drop < 1):
            raise OptionError("max_drop", f"must be within 0pt..100pt, got {self.max_drop}")
        if not 2 <= self.ladder_steps <= 200:
            raise OptionError("ladder_steps", f"must be within 2..200, got {self.ladder_steps}")
        if not 0.5 <= self.confidence < 1:
            raise OptionError("confidence", f"must be within 0.5..0.999, got {self.confidence}")
        for name in ("budget_ms", "budget_fraction"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v > 0):
                raise OptionError(name, f"must be a positive finite number, got {v}")
        if self.metric not in ("mean", "p95"):
            raise OptionError("metric", f"must be mean or p95, got '{self.metric}'")
        if self.split not in ("heldout", "test"):
            raise OptionError("split", f"must be heldout or test, got '{self.split}'")
        if self.policy not in POLICIES:
            raise OptionError("policy", f"must be one of {', '.join(POLICIES)}, got '{self.policy}'")
        for name in ("limit", "verify_limit"):
            v = getattr(self, name)
            if v is not None and v < 20:
                raise OptionError(name, f"must be at least 20, got {v}")
        if self.repeats < 1:
            raise OptionError("repeats", f"must be at least 1, got {self.repeats}")
        if not 1 <= self.repeat <= 100:
            raise OptionError("repeat", f"must be within 1..100, got {self.repeat}")
        if self.frame_size is not None and not (
            len(self.frame_size) == 2 and all(isinstance(v, int) and 1 <= v <= MAX_FRAME_SIDE for v in self.frame_size)
        ):
            raise OptionError(
                "frame_size", f"must be WIDTHxHEIGHT, each 1..{MAX_FRAME_SIDE} pixels, got {self.frame_size}"
            )

    @property
    def limited(self) -> bool:
        """A latency budget was given (--budget), in time or as a share of the full model."""
        return self.budget_ms is not None or self.budget_fraction is not None
