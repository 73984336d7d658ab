"""The options of `edgeexit calibrate`, validated in one place (numpy only).

A bad value raises `OptionError`, which names the `CalibrationOptions` fields at fault; its message is
phrased with the flags that set them (each field is named as its flag), which is what `edgeexit calibrate`
prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeexit.errors import UserError


def flag(field_name: str) -> str:
    """The `edgeexit calibrate` flag of a `CalibrationOptions` field: ``--`` and the field's name, except
    the two budget fields, which one flag sets (``--budget 5ms``, ``--budget 50%``), and the fields no
    flag sets (benchmarks' knobs), which keep their own name."""
    if field_name.startswith("budget_"):
        return "--budget"
    return field_name if field_name in NO_FLAG else "--" + field_name.replace("_", "-")


NO_FLAG = {"seed", "iso_accuracy", "ladder_steps"}  # set from Python only (benchmarks, tests)


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
    is wrong with them; the message is that, phrased with the flag that sets the first of them."""

    def __init__(self, fields: str | tuple[str, ...], problem: str, message: str | None = None) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem = problem
        super().__init__(message or f"{flag(self.fields[0])} {problem}")


@dataclass(frozen=True)
class CalibrationOptions:
    """Every option of `edgeexit calibrate`, validated in one place."""

    budget_ms: float | None = None
    budget_fraction: float | None = None  # of the full model's predicted latency
    metric: str = "mean"
    backend: str = "auto"
    data: str | None = None
    split: str = "heldout"
    images: int | None = None  # at most this many images per calibration half
    verify_images: int | None = None  # at most this many verification frames
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

    def __post_init__(self) -> None:
        _check_goal(self)
        for name, (low, high) in _INT_RANGES.items():
            v = getattr(self, name)
            if v is None and name in _OPTIONAL:
                continue
            if not (isinstance(v, int) and not isinstance(v, bool) and low <= v <= (high or v)):
                raise OptionError(name, f"must be {f'within {low}..{high}' if high else f'at least {low}'}, got {v!r}")
        for name, (bottom, top, shown) in _REAL_RANGES.items():
            x = getattr(self, name)
            if x is not None and not (_real(x) and bottom <= x < top):
                raise OptionError(name, f"must be within {shown}, got {x}")
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                raise OptionError(name, f"must be {_one_of(choices)}, got '{getattr(self, name)}'")
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


# Range checks, one small table per kind of value (an option missing here takes any value of its type).
_INT_RANGES = {  # low..high, both included; high None: no upper bound
    "images": (20, None),
    "verify_images": (20, None),
    "repeats": (1, None),
    "repeat": (1, 100),
    "ladder_steps": (2, 200),
}
_OPTIONAL = {"images", "verify_images"}  # None: every image
_REAL_RANGES = {  # low <= value < high, and how the range reads in an error
    "max_drop": (0.0, 1.0, "0pt..100pt"),
    "confidence": (0.5, 1.0, "0.5..0.999"),
}


def _choices() -> dict[str, tuple[str, ...]]:
    from edgeexit.runtime.policies import POLICIES

    return {"metric": ("mean", "p95"), "split": ("heldout", "test"), "policy": tuple(POLICIES)}


def _one_of(choices: tuple[str, ...]) -> str:
    return " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"


def _real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


def _check_goal(o: CalibrationOptions) -> None:
    """One budget at most (in time or as a share of the full model), and a budget or a promise."""
    if o.budget_ms is not None and o.budget_fraction is not None:
        raise OptionError(
            ("budget_ms", "budget_fraction"),
            "both given",
            "give one budget: in time (5ms) or as a share of the full model (50%), not both",
        )
    if o.budget_ms is None and o.budget_fraction is None and o.max_drop is None:
        raise OptionError(
            ("budget_ms", "budget_fraction", "max_drop"),
            "none given",
            "give --budget (5ms, 50%), --max-drop (0.5pt), or both",
        )
    for name in ("budget_ms", "budget_fraction"):
        v = getattr(o, name)
        if v is not None and not (_real(v) and v > 0):
            raise OptionError(name, f"must be a positive finite number, got {v}")
