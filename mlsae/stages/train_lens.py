"""Stage ``train_lens`` (notebook 03a): the tuned lenses the lens runs and analyses use.

With ``lens.train`` it fits one lens per method of ``lens.methods`` on the training cache
(``belrose``: `mlsae.lens_belrose`; ``ridge``: `mlsae.lens_ridge`; ``regression``:
`mlsae.lens_training.train_lens`), each into ``<cache_dir>/lens/<model>/<method>``
(`mlsae.paths.lens_path`) with ``history.json`` (training KL per step; empty for ridge) and
``record.json`` (the method's record: held-out curve, convergence test, chosen lambdas, seconds).
Without, it copies a published lens into the folder of ``lens.method``. Drawing and evaluation
on the test cache are stage ``evaluate_lens``, so a figure edit never retrains a lens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformer_lens import HookedTransformer

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.lens import TunedLens
from mlsae.lens_belrose import train_belrose
from mlsae.lens_ridge import ridge_lens
from mlsae.lens_training import train_lens as train_regression
from mlsae.models import load_model


def fit_lens(
    method: str, model: HookedTransformer, cache, settings: config.Lens, seed: int = 0
) -> tuple[TunedLens, list[float], dict]:
    """``(lens, history, record)`` of one method on training cache ``cache``."""
    start = time.time()
    if method == "belrose":
        lens, record = train_belrose(model, cache, settings, seed=seed)
        return lens, record["history"], record
    if method == "ridge":
        lens, record = ridge_lens(model, cache, settings, seed=seed)
        return lens, [], record
    if method == "regression":
        lens, history = train_regression(model, cache, settings)
        return lens, history, {"seconds": time.time() - start}
    raise ValueError(f"Unknown lens method {method!r}; known: {', '.join(config.LENS_METHODS)}.")


def train_lens(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Train (or load) the lenses and save them.

    Returns ``{method: {"folder", "history", "record"}}`` for each method trained (the one of
    ``lens.method`` for a loaded lens, with an empty history and ``{"loaded": ...}`` record).
    """
    model = load_model(params.base.model, device=params.base.device)
    out = {}
    if params.lens.train:
        cache = ActivationCache(paths.cache_paths(params, out_dir)["train"])
        fitted = {
            m: fit_lens(m, model, cache, params.lens, params.base.seed) for m in params.lens.methods
        }
    else:
        lens = TunedLens.load(params.base.model, lens_dir=params.lens.lens_dir)
        fitted = {params.lens.method: (lens, [], {"loaded": params.base.model})}
    for method, (lens, history, record) in fitted.items():
        folder = paths.lens_path(params, out_dir, method)
        lens.save(folder)
        (folder / "history.json").write_text(json.dumps(history))
        (folder / "record.json").write_text(json.dumps(record))
        out[method] = {"folder": folder, "history": history, "record": record}
    return out
