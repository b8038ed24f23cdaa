"""Stage ``residual_drift`` (notebook 02, paper Figure 1): how similar adjacent layers are."""

from __future__ import annotations

import json
from pathlib import Path

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.drift import residual_drift as drift_of
from mlsae.writers import write_csv, write_json, write_metrics


def residual_drift(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Adjacent-layer cosine similarity and norms on the test cache (`mlsae.drift`).

    Writes ``results/drift.json``, ``results/plots/drift.csv`` (for ``dvc plots``) and
    ``results/metrics/drift.json``. Returns the drift result, plus ``data_mix``: the summary
    stage 01 wrote (``results/data_mix.json``), shown beside it.
    """
    cache = ActivationCache(paths.cache_paths(params, out_dir)["test"])
    drift = drift_of(cache, params.analysis.drift_tokens)
    cos, centred = drift["cosine"], drift["cosine_centred"]
    n = len(drift["norm"])
    source = {"model": params.base.model, "corpus": params.base.corpus}
    write_json(paths.results(out_dir, "drift.json"), drift | source)
    rows = [{"layer": ly, "cosine": cos[ly], "cosine_centred": centred[ly]} for ly in range(n - 1)]
    write_csv(paths.results(out_dir, "plots", "drift.csv"), rows)
    summary = {
        "mean_cosine": sum(cos) / (n - 1),
        "min_cosine": min(cos),
        "mean_cosine_centred": sum(centred) / (n - 1),
    }
    write_metrics(paths.metrics(out_dir, "drift.json"), summary)
    mix = json.loads(paths.results(out_dir, "data_mix.json").read_text())
    return drift | {"data_mix": mix}
