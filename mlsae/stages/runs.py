"""A sweep entry's pieces, shared by the stages that train, evaluate and analyse runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlsae import config, paths
from mlsae.lens import TunedLens
from mlsae.sae import MLSAE
from mlsae.train import load_sae


def sweep_entry(params: config.Params, run: str) -> config.Run:
    """``params.sweep[run]``, or a clear error naming the runs there are."""
    if run not in params.sweep:
        raise KeyError(f"Unknown sweep run {run!r}; params.yaml has {sorted(params.sweep)}.")
    return params.sweep[run]


def run_lens_method(params, run: str) -> str | None:
    """The lens method of sweep entry ``run``: its ``lens_method``, else ``lens.method``.

    None for a run without a lens.
    """
    entry = sweep_entry(params, run)
    if not entry.lens:
        return None
    return entry.lens_method or params.lens.method


def run_lens(params, run: str, out_dir: str | Path = ".", device: str | None = None):
    """``(lens, sha)`` of sweep entry ``run``, ``(None, None)`` for a run without a lens.

    The lens is the one of the entry's method (`run_lens_method`), from
    ``<cache_dir>/lens/<model>/<method>``. ``sha`` is a short hash of the lens weights, recorded
    in the run's config so that a retrained lens never resumes a stale run.
    """
    method = run_lens_method(params, run)
    if method is None:
        return None, None
    folder = paths.lens_path(params, out_dir, method)
    lens = TunedLens.load(folder).to(device or params.base.device)
    return lens, hashlib.sha256((folder / "params.pt").read_bytes()).hexdigest()[:16]


def load_run(params, run: str, out_dir: str | Path = ".", device: str = "cpu"):
    """``(sae, lens or None)`` of a trained sweep entry, in eval mode on ``device``."""
    sae: MLSAE = load_sae(paths.run_dir(params, run, out_dir) / "checkpoint.pt", device).eval()
    return sae, run_lens(params, run, out_dir, device)[0]
