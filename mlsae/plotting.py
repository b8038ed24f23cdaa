"""One house style for figures; `save_figure` writes PNG and PDF and shows the figure inline.

No backend is forced: in a Jupyter kernel (papermill included) matplotlib uses the inline
backend, so `save_figure` displays the figure in the notebook before closing it; elsewhere
(scripts, tests, no display) matplotlib falls back to Agg by itself. Importing this module
applies the house style (`setup_style`): only the notebooks that draw import it, so a change to
the figure code never makes a stage that draws nothing stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator

INLINE_DPI = 80
"""Resolution of the copy embedded in an executed notebook (the PNG file uses savefig.dpi)."""


def setup_style() -> None:
    """Readable defaults: larger labels; grid lines only where `line_grid` asks for them."""
    plt.rcParams.update(
        {
            "figure.dpi": INLINE_DPI,
            "savefig.dpi": 150,
            "axes.grid": False,
            "grid.alpha": 0.3,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "figure.constrained_layout.use": True,
        }
    )


setup_style()


def line_grid(*axes) -> None:
    """Light grid lines on line and bar plots (never on heatmaps)."""
    for ax in np.ravel(axes):
        ax.grid(True, alpha=0.3)


def plain_log_ticks(ax, axis: str = "x") -> None:
    """Log-scaled axis labelled 1,000 / 10k / 100k instead of 10^3 / 10^4 / 10^5."""

    def fmt(v, _):
        if v >= 1e6:
            return f"{v / 1e6:g}M"
        if v >= 1e4:
            return f"{v / 1e3:g}k"
        return f"{v:,.0f}" if v >= 1 else f"{v:g}"

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(fmt))
    target.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


def save_figure(fig, name: str, folder: str | Path = "figures") -> Path:
    """Save ``fig`` as ``folder/name.png`` and ``.pdf``, show it inline in a notebook, close it.

    Returns the PNG path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    fig.savefig(png)
    fig.savefig(folder / f"{name}.pdf")
    if _in_notebook():
        from IPython.display import display

        display(fig)
    plt.close(fig)
    return png
