"""Figures: one place that sets up matplotlib (headless) and writes PNGs atomically."""

from __future__ import annotations

from pathlib import Path


def new_figure(width: float = 6.0, height: float = 4.0):
    """``(fig, ax)`` from matplotlib with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_png(fig, path: str | Path, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
