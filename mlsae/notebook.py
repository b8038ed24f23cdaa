"""What every numbered notebook does first, and how it shows tables and explanations.

``P, out_dir = setup(params_path, out_dir)`` replaces the nine copies of the setup cell: it reads
and validates params.yaml, seeds torch, applies the figure style, and sends log lines (training
progress included) to stdout, where ``papermill --log-output`` prints them while the stage runs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from mlsae import config


def setup(
    params_path: str | Path, out_dir: str | Path = ".", figures: bool = True
) -> tuple[config.Params, Path]:
    """Validated params and the output root; seeds, logging and (``figures``) the figure style.

    Stages that draw nothing pass ``figures=False`` and so never import `mlsae.plotting`: a
    change to the figure code then does not make them stale in DVC's eyes.
    """
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    torch.manual_seed(0)
    if figures:
        from mlsae.plotting import setup_style

        setup_style()
    return config.load(params_path), Path(out_dir)


def _display(obj) -> None:
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython ships with jupyter
        print(obj)
        return
    display(obj)


def show_table(frame, floatfmt: str = ".3f", index: bool = False) -> None:
    """A pandas DataFrame as a markdown table in the notebook (plain text outside one)."""
    from IPython.display import Markdown

    # object dtype keeps integers integers (a mixed frame would otherwise print 3 as 3.000)
    _display(Markdown(frame.astype(object).to_markdown(index=index, floatfmt=floatfmt)))


def explain(text: str) -> None:
    """A paragraph of markdown under a figure (filled from the results by `mlsae.report`)."""
    from IPython.display import Markdown

    _display(Markdown(text))
