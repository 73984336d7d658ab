"""The few lines every benchmark plot ends with (imported by the scripts beside it)."""

from __future__ import annotations


def figure(size: tuple[float, float]):
    """A headless matplotlib figure and axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def finish(fig, ax, path: str, xlabel: str, ylabel: str) -> None:
    """Label, grid, legend, save to ``path`` and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
