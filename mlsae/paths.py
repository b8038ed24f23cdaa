"""Where every stage reads and writes, relative to one output root (the repository by default).

One function per place, so a stage and the notebook that draws it agree on a path, and moving a
file is one edit. Nothing here reads a file.
"""

from __future__ import annotations

from pathlib import Path


def repo_root(start: str | Path | None = None) -> Path:
    """The repository holding ``start`` (default: the working directory).

    That is the first folder up from ``start`` with ``params.yaml`` and ``dvc.yaml``. A notebook
    opened in Jupyter starts in ``notebooks/``; its defaults find the root with this, so it
    reads and writes where its DVC stage does.
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").exists() and (folder / "dvc.yaml").exists():
            return folder
    raise FileNotFoundError(
        f"No params.yaml and dvc.yaml in {here} or any folder above it: run from inside the "
        "repository (or pass params_path and out_dir)."
    )


def cache_paths(params, out_dir: str | Path = ".") -> dict[str, Path]:
    """``{"train", "test"}`` activation caches (stage 01; rebuilt when their settings change)."""
    root = Path(out_dir) / params.base.cache_dir / "activations"
    return {"train": root / "train", "test": root / "test"}


def lens_path(params, out_dir: str | Path = ".") -> Path:
    """The pipeline's copy of the model's tuned lens (trained, or loaded, by the lens stage)."""
    return Path(out_dir) / params.base.cache_dir / "lens" / params.base.model


def run_dir(params, run: str, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/runs/<run>``: the run's ``checkpoint.pt`` and ``log.jsonl``."""
    return Path(out_dir) / params.base.cache_dir / "runs" / run


def baselines_dir(params, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/baselines``: one ``layer-<L>`` run folder per single-layer SAE."""
    return Path(out_dir) / params.base.cache_dir / "baselines"


def latent_stats_path(params, run: str, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/latent_stats/<run>.pt``, written by the run's evaluation."""
    return Path(out_dir) / params.base.cache_dir / "latent_stats" / f"{run}.pt"


def results(out_dir: str | Path, *parts: str) -> Path:
    """``<out_dir>/results/<parts>``: small JSON and CSV results, committed to git."""
    return Path(out_dir).joinpath("results", *parts)


def metrics(out_dir: str | Path, *parts: str) -> Path:
    """``<out_dir>/results/metrics/<parts>``: numbers-only files for ``dvc metrics``."""
    return Path(out_dir).joinpath("results", "metrics", *parts)


def figures(out_dir: str | Path) -> Path:
    """``<out_dir>/figures``: every figure (PNG and PDF) and table the pipeline makes."""
    return Path(out_dir) / "figures"
