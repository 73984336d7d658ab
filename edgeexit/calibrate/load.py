"""How busy the device was while calibrate profiled it, and whether the profile can be trusted (numpy only).

The cost model every plan is chosen on is read off the fastest third of interleaved profiling rounds
(runtime/profiling.py `profile_rounds`): other processes on the cores slow every piece of a round
alike, so ratios hold even on a loaded device, and being busy alone is said, not refused. What
breaks it is a device so busy that even the fastest rounds disagree: the quiet level is not known.
"""

from __future__ import annotations

# A profile is trusted when the quiet level is known within this relative standard error
MAX_QUIET_ERROR = 0.10
# Above this slowdown of a typical round over the quiet ones the device is called busy (said, not refused)
BUSY_SLOWDOWN = 1.15
# ... or when calibrate ran less than this share of the wall time (it runs on one thread: 1.0 when alone)
BUSY_CPU_SHARE = 0.9


def verdict(load: dict) -> tuple[str, list[str]]:
    """("quiet" | "busy" | "too busy", the reasons in words) for a `profile_rounds` load block."""
    reasons = []
    if load.get("quiet_error", 0.0) > MAX_QUIET_ERROR:
        reasons.append(
            f"the quietest profiling rounds still disagree: their level is known only within "
            f"±{100 * load['quiet_error']:.1f}% (trusted within ±{100 * MAX_QUIET_ERROR:.0f}%)"
        )
    if reasons:
        return "too busy", reasons
    if load.get("slowdown", 1.0) > BUSY_SLOWDOWN or load.get("cpu_share", 1.0) < BUSY_CPU_SHARE:
        return "busy", []
    return "quiet", []


def describe(load: dict) -> str:
    """One line: the load figures calibrate reports."""
    parts = []
    if "cpu_share" in load:
        parts.append(f"calibrate ran {100 * load['cpu_share']:.0f}% of the time")
    if "preemptions_per_s" in load:
        parts.append(f"{load['preemptions_per_s']:.0f} preemptions/s")
    parts.append(
        f"a typical profiling round {load['slowdown']:.2f}x the quiet ones ({load['quiet_rounds']} of "
        f"{load['rounds']} rounds, their level known within ±{100 * load.get('quiet_error', 0.0):.1f}%)"
    )
    return (f"{load['verdict']}: " if "verdict" in load else "") + ", ".join(parts)


def too_busy_message(load: dict, reasons: list[str], tries: int) -> str:
    """The one-line refusal: what was seen and the three ways on."""
    return (
        f"the device was too busy to calibrate reliably ({'; '.join(reasons)}; {tries} profile(s) taken): "
        "wait until other work on it stops and run again, or profile more times with --repeat N (up to N "
        "profiles, their quiet rounds pooled), or write the plan anyway with --accept-load"
    )
