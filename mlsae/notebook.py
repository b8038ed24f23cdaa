"""What every numbered notebook does first, and how it shows tables and explanations.

``P, out_dir = setup(params_path, out_dir)`` replaces the copies of the setup cell: it reads and
validates params.yaml, seeds torch, and sends log lines (training
progress included) to stdout, where ``papermill --log-output`` prints them while the stage runs.
With the notebooks' defaults (``None``) it finds the repository from the working directory, so a
notebook opened in Jupyter (whose kernel starts in ``notebooks/``) reads and writes exactly
where its DVC stage does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from mlsae import config
from mlsae.paths import repo_root


def setup(
    params_path: str | Path | None = None, out_dir: str | Path | None = None
) -> tuple[config.Params, Path]:
    """Validated params and the output root; seeds torch and sends log lines to stdout.

    ``params_path`` None: the repository's ``params.yaml``; ``out_dir`` None: the repository
    (`mlsae.paths.repo_root`). Given paths are taken as they are (papermill runs the stages with
    ``--cwd .`` and ``-p params_path params.yaml -p out_dir .``).
    """
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    torch.manual_seed(0)
    if params_path is None or out_dir is None:
        root = repo_root()
        params_path = root / "params.yaml" if params_path is None else params_path
        out_dir = root if out_dir is None else out_dir
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
