"""Calibration table and accuracy–latency plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from rich.table import Table


def calibration_table(result: dict) -> Table:
    pred, meas = result["predicted"], result["measured"]
    units = result["latency"]["units"]
    from edgeexit.calibrate.history import plan_goal, threshold_words

    t = Table(
        title=f"Calibration on {result['device']['backend']} ({result['device']['device'] or result['device']['cpu']})"
        f" for {plan_goal(result)}"
    )
    t.add_column("exit", justify="right")
    t.add_column("threshold", justify="right")
    t.add_column("evaluated", justify="center")
    t.add_column("share exiting", justify="right")
    t.add_column("cum. latency ms", justify="right")
    t.add_column("measured share", justify="right")
    field = "mean_ms" if result["metric"] == "mean" else "p95_ms"
    words = threshold_words(result["thresholds"])
    for k, (word, cum) in enumerate(zip(words, _cumulative_ms(result, units, field), strict=True)):
        evaluated = (k + 1) in result["evaluated_exits"]
        t.add_row(
            str(k + 1),
            word,
            "yes" if evaluated else "-",
            f"{100 * pred['exit_shares'][k]:.1f}%",
            f"{cum:.3f}",
            f"{100 * meas['exit_shares'][k]:.1f}%",
        )
    t.caption = "\n".join(_caption_lines(result))
    return t


def _cumulative_ms(result: dict, units: dict, field: str) -> list[float]:
    """Predicted latency of a frame leaving at each exit under the chosen plan, by the cost model
    calibrate used (fused exit groups where the runner fuses, else the units one by one)."""
    from edgeexit.calibrate.optimizer import CostModel

    k = len(result["thresholds"])
    cost = CostModel.from_latency_block({**result["latency"], "units": units}, k, field)
    return cost.exit_costs(np.array([(pos + 1) in result["evaluated_exits"] for pos in range(k)])).tolist()


def _caption_lines(result: dict) -> list[str]:
    pred, meas = result["predicted"], result["measured"]
    lines = [
        f"predicted (stored frames): accuracy {100 * pred['accuracy']:.2f}%{_interval(pred, 'accuracy')}, "
        f"{result['metric']} {pred['latency_ms']:.3f} ms{_drop(pred)}",
        *(
            [f"on frames its thresholds were not fitted on: accuracy {100 * pred['out_of_fold_accuracy']:.2f}%"]
            if pred.get("out_of_fold_accuracy") is not None
            else []
        ),
        f"measured (verification frames, real cascade): accuracy {100 * meas['accuracy']:.2f}%, mean "
        f"{meas['mean_ms']:.3f} ms, p95 {meas['p95_ms']:.3f} ms{_drop(meas)}",
    ]
    if result.get("decided_by"):
        lines.append(f"decided by {result['decided_by']}")
    if result.get("load"):
        from edgeexit.calibrate.load import describe

        accepted = " (written with --accept-load)" if result["load"].get("accepted") else ""
        lines.append(f"device load while profiling: {describe(result['load'])}{accepted}")
    if result["measured"].get("fraction_of_full") is not None:
        lines.append(
            f"measured share of the full model (the two run interleaved): "
            f"{100 * result['measured']['fraction_of_full']:.1f}%"
        )
    promise = result.get("max_drop")
    if promise:
        lines.append(
            f"promise (--max-drop {100 * promise['max_drop']:.2f} pt at {100 * promise['confidence']:.0f}%): on "
            f"{promise['n_frames']} frames this plan is at most {100 * promise['drop_bound']:.2f} pt less accurate "
            f"than the full model, with {100 * promise['confidence']:.0f}% confidence"
        )
        lines.append(FRONTIER_WORDS + frontier_text(promise.get("frontier") or []))
        for x, need in (promise.get("frames_needed") or {}).items():
            lines.append(
                f"{x}× as fast within {100 * promise['max_drop']:.2f} pt "
                + (f"would need ≈ {need:,} stored frames (export --calib-images {need})" if need else "is out of reach")
            )
    if result.get("baseline_msdnet"):
        b = result["baseline_msdnet"]
        lines.append(
            f"MSDNet geometric thresholds at the same budget: accuracy {100 * b['accuracy']:.2f}%, "
            f"mean {b['latency_ms']:.3f} ms"
        )
    full = result["full_model"]["measured"]
    lines.append(
        f"full model: accuracy {100 * full['accuracy']:.2f}%, mean {full['mean_ms']:.3f} ms; this plan runs "
        f"{speedup(full, meas):.2f}× as fast (both run on the verification frames, interleaved)"
    )
    iso = result.get("iso_accuracy")
    if iso:
        lines.append(
            f"cheapest plan certified within 0.5 pt of the full model: mean {iso['measured']['mean_ms']:.3f} ms, "
            f"{speedup(full, iso['measured']):.2f}× as fast, measured at {100 * iso['measured']['accuracy']:.2f}% "
            f"vs {100 * full['accuracy']:.2f}% on the verification frames"
        )
    if result.get("note"):
        lines.append(result["note"])
    return lines


# Said before `frontier_text` wherever it is printed: what its "1.25× at 0.31 pt" pairs mean.
FRONTIER_WORDS = "plans these frames can certify (N× as fast as the full model: at most D pt less accurate): "


def speedup(full: Mapping, plan: Mapping) -> float:
    """The one speed-up figure printed for a plan: the full model's measured mean latency over the
    plan's, both run on the same frames (the console never prints another ratio for the same plan)."""
    return full["mean_ms"] / max(1e-9, plan["mean_ms"])


def frontier_text(frontier: list[dict], points: tuple[float, ...] = (1.1, 1.25, 1.5, 2.0, 3.0)) -> str:
    """'1.25× at 0.31 pt, 1.5× at 0.62 pt, ...': the smallest certifiable drop at a few speed-ups."""
    out = []
    for x in points:
        rows = [r for r in frontier if r["speedup"] >= x - 1e-9]
        if rows:
            out.append(f"{x:g}× at {100 * min(r['certified_drop'] for r in rows):.2f} pt")
    return ", ".join(out) if out else "nothing faster than the full model"


def _interval(pred: dict, key: str) -> str:
    iv = pred.get(f"{key}_interval_95")
    return f" [95%: {100 * iv[0]:.2f}–{100 * iv[1]:.2f}]" if iv else ""


def _drop(d: dict) -> str:
    if d.get("drop_vs_full") is None:
        return ""
    iv = d.get("drop_interval_95")
    ci = f" [95%: {100 * iv[0]:+.2f}–{100 * iv[1]:+.2f}]" if iv else ""
    return f", drop vs full model {100 * d['drop_vs_full']:+.2f} pt{ci}"


def calibration_plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    fr = result["frontier"]
    ax.plot([p["latency_ms"] for p in fr], [100 * p["accuracy"] for p in fr], ".-", label="edgeexit optimiser (calib.)")
    ms = result["msdnet_curve"]
    ax.plot([p["latency_ms"] for p in ms], [100 * p["accuracy"] for p in ms], "x--", label="MSDNet geometric (calib.)")
    ax.axvline(result["budget_ms"], color="gray", lw=0.8, ls=":", label="budget")
    ax.plot(
        [result["measured"]["latency_ms"]],
        [100 * result["measured"]["accuracy"]],
        "r*",
        ms=12,
        label="chosen, measured (verification)",
    )
    if result.get("baseline_msdnet"):
        b = result["baseline_msdnet"]
        ax.plot([b["latency_ms"]], [100 * b["accuracy"]], "kP", ms=8, label="MSDNet, measured")
    full = result["full_model"]["measured"]
    ax.plot([full["mean_ms"]], [100 * full["accuracy"]], "gs", label="full model, measured")
    ax.set_xlabel(f"{result['metric']} latency per image (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from edgeexit.util import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
