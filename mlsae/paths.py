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


def lens_path(params, out_dir: str | Path = ".", method: str | None = None) -> Path:
    """``<cache_dir>/lens/<model>/<method>``: the pipeline's copy of a tuned lens.

    Trained (or loaded) by the lens stage; ``method`` None: the default ``lens.method``.
    """
    method = params.lens.method if method is None else method
    return Path(out_dir) / params.base.cache_dir / "lens" / params.base.model / method


def run_dir(params, run: str, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/runs/<run>``: the run's ``checkpoint.pt`` and ``log.jsonl``."""
    return Path(out_dir) / params.base.cache_dir / "runs" / run


def baselines_dir(params, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/baselines``: one ``layer-<L>`` run folder per single-layer SAE."""
    return Path(out_dir) / params.base.cache_dir / "baselines"


def snapshot_name(run: str, tokens: int | None) -> str:
    """``<run>@<tokens>``: a run's SAE after ``tokens`` training tokens (None: ``run``, final)."""
    return run if tokens is None else f"{run}@{tokens}"


def snapshot_file(folder: str | Path, tokens: int) -> Path:
    """``<folder>/snapshots/tokens-<N>.pt``: a run's SAE after the first step reaching N tokens.

    Written by `mlsae.train.train` for each of ``train.snapshot_tokens`` below the budget (a
    checkpoint without the optimizer state; `mlsae.train.load_sae` reads it).
    """
    return Path(folder) / "snapshots" / f"tokens-{tokens}.pt"


def snapshot_path(params, run: str, tokens: int, out_dir: str | Path = ".") -> Path:
    """`snapshot_file` of sweep entry ``run``'s folder (`run_dir`)."""
    return snapshot_file(run_dir(params, run, out_dir), tokens)


def latent_stats_path(
    params, run: str, out_dir: str | Path = ".", tokens: int | None = None
) -> Path:
    """``<cache_dir>/latent_stats/<run>.pt``, or ``snapshot_stats/<run>@<tokens>.pt``.

    Written by the run's evaluation (stage ``evaluate_run``), or for a training snapshot by
    stage ``evaluate_snapshots``.
    """
    folder = "latent_stats" if tokens is None else "snapshot_stats"
    return Path(out_dir) / params.base.cache_dir / folder / f"{snapshot_name(run, tokens)}.pt"


def per_context_path(out_dir: str | Path, name: str) -> Path:
    """``results/per_context/<name>.csv``: delta CE, KL and FVU sums per (context, layer).

    For a training snapshot (``name`` = `snapshot_name`): ``results/snapshots/<name>.csv``.
    """
    if "@" in name:
        return results(out_dir, "snapshots", f"{name}.csv")
    return results(out_dir, "per_context", f"{name}.csv")


def run_result_path(out_dir: str | Path, name: str) -> Path:
    """``results/runs/<name>.json``, or ``results/snapshots/<name>.json`` for a snapshot."""
    if "@" in name:
        return results(out_dir, "snapshots", f"{name}.json")
    return results(out_dir, "runs", f"{name}.json")


def results(out_dir: str | Path, *parts: str) -> Path:
    """``<out_dir>/results/<parts>``: small JSON and CSV results, committed to git."""
    return Path(out_dir).joinpath("results", *parts)


def metrics(out_dir: str | Path, *parts: str) -> Path:
    """``<out_dir>/results/metrics/<parts>``: numbers-only files for ``dvc metrics``."""
    return Path(out_dir).joinpath("results", "metrics", *parts)


def figures(out_dir: str | Path) -> Path:
    """``<out_dir>/figures``: every figure (PNG and PDF) and table the pipeline makes."""
    return Path(out_dir) / "figures"
