"""Tables and plots for `edgeexit eval`."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def eval_table(result: dict) -> Table:
    t = Table(
        title=f"Anytime prediction on {result.get('dataset', '')} {result['split']} ({result['num_samples']} images)"
    )
    t.add_column("exit", justify="right")
    t.add_column("accuracy", justify="right")
    t.add_column("cumulative MFLOPs", justify="right")
    for e in result["exits"]:
        t.add_row(str(e["exit"]), f"{100 * e['accuracy']:.2f}%", f"{e['cumulative_flops'] / 1e6:.2f}")
    t.add_row("avg", f"{100 * result['average_accuracy']:.2f}%", "", style="bold")
    if result.get("budgeted"):
        pts = result["budgeted"]
        final = result["exits"][-1]
        cheapest_iso = next((p for p in pts if p["accuracy"] >= final["accuracy"] - 0.005), None)
        if cheapest_iso:
            t.caption = (
                f"budgeted batch: {100 * cheapest_iso['accuracy']:.2f}% at "
                f"{cheapest_iso['expected_flops'] / 1e6:.2f} MFLOPs/image "
                f"({cheapest_iso['expected_flops'] / final['cumulative_flops']:.2f}× the full cascade)"
            )
    return t


def budgeted_plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = result["budgeted"]
    ax.plot(
        [p["expected_flops"] / 1e6 for p in pts],
        [100 * p["accuracy"] for p in pts],
        "o-",
        ms=3,
        label="budgeted (MSDNet geometric thresholds)",
    )
    ax.plot(
        [e["cumulative_flops"] / 1e6 for e in result["exits"]],
        [100 * e["accuracy"] for e in result["exits"]],
        "s--",
        ms=4,
        label="anytime (single exit)",
    )
    ax.set_xlabel("average MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from edgeexit.util import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
