"""Recalibration keeps the previous calibration: `calibrate` saves the block it replaces beside the
manifest (``calibration.previous.json``) and says what it replaced; `calibrate ARTIFACT --restore`
swaps the two back (so a restore can itself be undone).

A calibration is a device measurement and a choice of thresholds made for a goal (a budget, a
--max-drop promise); replacing it silently would lose both, and rerunning it costs minutes.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from pathlib import Path

from edgeexit.errors import UserError

PREVIOUS_NAME = "calibration.previous.json"


def plan_goal(block: Mapping) -> str:
    """What a calibration's plan was chosen for, in the words of calibrate's flags: the --max-drop
    promise (with its confidence), the budget, or both."""
    opts = block.get("options") if isinstance(block.get("options"), Mapping) else {}
    promise = block.get("max_drop") if isinstance(block.get("max_drop"), Mapping) else None
    parts = []
    if promise and _number(promise.get("max_drop")) and _number(promise.get("confidence")):
        parts.append(
            f"--max-drop {100 * promise['max_drop']:.2f} pt at {100 * promise['confidence']:.0f}% "
            "confidence (at most that much less accurate than the full model)"
        )
    limited = opts.get("budget_ms") is not None or opts.get("budget_fraction") is not None
    if limited or not parts:
        fraction, budget_ms = opts.get("budget_fraction"), block.get("budget_ms")
        budget = f"budget {budget_ms:.3f} ms" if _number(budget_ms) else "a budget"
        budget += f" ({block.get('metric', 'mean')} per image"
        budget += f", {100 * fraction:.0f}% of the full model)" if _number(fraction) else ")"
        parts.append(budget)
    return " and ".join(parts)


def _number(value) -> bool:
    """A finite number (not a bool): what a block read from a file must hold before it is printed."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def threshold_words(thresholds) -> list[str]:
    """Each exit's threshold as calibrate's table prints it: 'skip' (the exit is never evaluated),
    a confidence such as '0.8000' (answer here when at least that confident), 'accept all' (the last
    exit answers whatever is left)."""
    words = []
    for k, th in enumerate(thresholds):
        last = k == len(thresholds) - 1
        words.append("accept all" if last else ("skip" if float(th) > 1 else f"{float(th):.4f}"))
    return words


def describe(block: Mapping) -> str:
    """One line: when and on what a calibration was made, its goal and its thresholds."""
    when = block.get("created") or "an unknown time"
    return (
        f"calibrated {when} on {block.get('backend') or '?'} for {plan_goal(block)}; thresholds "
        f"{', '.join(threshold_words(block.get('thresholds') or []))}"
    )


def keep_previous(artifact) -> dict | None:
    """Before a new calibration is written into ``artifact`` (an `Artifact`): save the block it
    replaces as ``calibration.previous.json`` (atomically), and return that block (None: there was
    none, nothing is written)."""
    from edgeexit.util import atomic_write_json

    if artifact.calibration is None:
        return None
    old = artifact.calibration.to_dict()
    atomic_write_json(
        Path(artifact.folder) / PREVIOUS_NAME,
        {
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "content_id": artifact.content_id,
            "calibration": old,
        },
    )
    return old


def restore(folder: str | Path) -> tuple[dict, dict | None]:
    """Put the calibration saved by the last recalibration back into the manifest; the one it
    replaces is saved in its place. Returns (restored block, replaced block or None)."""
    from edgeexit.runtime.artifact import Artifact, parse_calibration
    from edgeexit.runtime.manifest import write_calibration
    from edgeexit.util import atomic_write_json, check_input_file

    folder = Path(folder)
    art = Artifact.load(folder)
    path = folder / PREVIOUS_NAME
    if not path.exists():
        raise UserError(f"{folder} has no earlier calibration to restore ({PREVIOUS_NAME} is written when "
                        "calibrate replaces one)")  # fmt: skip
    check_input_file(path, "earlier calibration", root=folder, max_bytes=64 << 20)
    try:
        saved = json.loads(path.read_text())
        block = saved["calibration"]
        parse_calibration(block, art.model.num_exits, str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a saved calibration ({e}): nothing was changed") from None
    if saved.get("content_id") not in (None, art.content_id):
        raise UserError(f"{path} was saved for another export of {folder} (its units changed): nothing was changed")
    current = art.calibration.to_dict() if art.calibration is not None else None
    if isinstance(current, dict):
        atomic_write_json(
            path,
            {
                "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "content_id": art.content_id,
                "calibration": current,
            },
        )
    else:
        path.unlink()
    write_calibration(art, block)
    return block, current if isinstance(current, dict) else None
