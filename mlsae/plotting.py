"""One house style for figures; `save_figure` writes PNG and PDF side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def setup_style() -> None:
    """Readable defaults: white grid, larger labels."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "figure.constrained_layout.use": True,
        }
    )


def save_figure(fig, name: str, folder: str | Path = "figures") -> Path:
    """Save ``fig`` as ``folder/name.png`` and ``folder/name.pdf``; returns the PNG path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    fig.savefig(png)
    fig.savefig(folder / f"{name}.pdf")
    plt.close(fig)
    return png
