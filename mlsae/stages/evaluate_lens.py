"""Stage ``evaluate_lens`` (notebook 03b): tuned lens against logit lens on held-out tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.lens import TunedLens
from mlsae.lens_kl import lens_kl_per_layer
from mlsae.models import load_model
from mlsae.writers import write_csv, write_json, write_metrics


def evaluate_lens(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Held-out KL(final || lens) per block output, for the tuned and the logit lens.

    Reads the lens and training curve of stage ``train_lens``. Writes ``results/lens_kl.json``,
    ``results/plots/lens_kl.csv`` and ``lens_train.csv`` (for ``dvc plots``) and
    ``results/metrics/lens.json``. Returns ``{"logit", "tuned", "history", "n_tokens",
    "n_layers"}``.
    """
    model = load_model(params.base.model, device=params.base.device)
    folder = paths.lens_path(params, out_dir)
    lens = TunedLens.load(folder).to(params.base.device)
    history = json.loads((folder / "history.json").read_text())
    test = ActivationCache(paths.cache_paths(params, out_dir)["test"])
    tuned = lens_kl_per_layer(model, lens, test, params.lens.eval_tokens)
    logit = lens_kl_per_layer(model, None, test, params.lens.eval_tokens)
    n = len(tuned) - 1  # the last block's output is the model's own (KL 0)
    source = {"model": params.base.model, "corpus": params.base.corpus}
    write_json(
        paths.results(out_dir, "lens_kl.json"),
        {"logit_lens": logit, "tuned_lens": tuned, "train_history": history} | source,
    )
    rows = [{"layer": ly, "logit_lens": logit[ly], "tuned_lens": tuned[ly]} for ly in range(n + 1)]
    write_csv(paths.results(out_dir, "plots", "lens_kl.csv"), rows)
    curve = [{"step": i + 1, "kl": v} for i, v in enumerate(history)]
    write_csv(
        paths.results(out_dir, "plots", "lens_train.csv"),
        curve or [{"step": 0, "kl": float("nan")}],
    )
    summary = {
        "tuned_lens_kl": float(np.mean(tuned[:n])),
        "logit_lens_kl": float(np.mean(logit[:n])),
        "steps": len(history),
    }
    write_metrics(paths.metrics(out_dir, "lens.json"), summary)
    return {
        "logit": logit,
        "tuned": tuned,
        "history": history,
        "n_tokens": min(params.lens.eval_tokens, test.n_tokens),
        "n_layers": model.cfg.n_layers,
    }
