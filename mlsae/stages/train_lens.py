"""Stage ``train_lens`` (notebook 03a): the tuned lens the lens runs and analyses use.

Trains one on the training cache (``lens.train: true``) or copies a published one, into
``<cache_dir>/lens/<model>`` with its training curve (``history.json``). Drawing and held-out
evaluation are stage ``evaluate_lens``, so a figure edit never retrains the lens.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.lens import TunedLens
from mlsae.lens_training import train_lens as fit_lens
from mlsae.models import load_model


def train_lens(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Train (or load) the lens and save it; returns ``{"folder", "history"}``.

    ``history`` is the mean training KL over layers at each step (empty for a loaded lens).
    """
    model = load_model(params.base.model, device=params.base.device)
    if params.lens.train:
        cache = ActivationCache(paths.cache_paths(params, out_dir)["train"])
        lens, history = fit_lens(model, cache, params.lens)
    else:
        lens, history = TunedLens.load(params.base.model, lens_dir=params.lens.lens_dir), []
    folder = paths.lens_path(params, out_dir)
    lens.save(folder)
    (folder / "history.json").write_text(json.dumps(history))
    return {"folder": folder, "history": history}
