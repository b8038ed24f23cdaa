"""Stage ``evaluate_lens`` (notebook 03b): every trained lens against the logit lens, held out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.lens import TunedLens
from mlsae.lens_kl import lens_kl_per_layer
from mlsae.models import load_model
from mlsae.writers import write_csv, write_json, write_metrics


@torch.no_grad()
def lens_geometry(lens: TunedLens) -> dict[str, list[float]]:
    """Per block output l: ``cond`` = cond(I + W) and ``w_norm`` = ||W||_F of its translator.

    Translator l + 1 (`mlsae.lens.TunedLens.translator_index`); the last block's output takes the
    identity (cond 1, norm 0). ||W||_F is the distance of the map from the identity.
    """
    cond, w_norm = [], []
    for layer in range(lens.n_layers):
        i = lens.translator_index(layer)
        if i is None:
            cond.append(1.0)
            w_norm.append(0.0)
            continue
        w = lens.translators[i].weight.double()
        sv = torch.linalg.svdvals(torch.eye(lens.d_model, dtype=torch.float64) + w.cpu())
        cond.append((sv[0] / sv[-1]).item())
        w_norm.append(w.norm().item())
    return {"cond": cond, "w_norm": w_norm}


def evaluate_lens(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Held-out KL(final || lens) per block output for each lens of stage ``train_lens``.

    For every method in ``lens.methods`` (the one of ``lens.method`` for a loaded lens) and the
    logit lens, on ``lens.eval_tokens`` tokens of the test cache; with each lens's cond(I + W)
    and ||W||_F per layer (`lens_geometry`) and its training record (history, belrose's held-out
    curve and convergence test, ridge's lambdas, seconds). Writes ``results/lens_kl.json``,
    ``results/plots/lens_kl.csv`` and ``lens_train.csv`` (for ``dvc plots``) and
    ``results/metrics/lens.json``. Returns ``{"logit", "tuned", "history", "methods",
    "default", "n_tokens", "n_layers"}`` (``tuned``, ``history``: of the default lens.method).
    """
    model = load_model(params.base.model, device=params.base.device)
    test = ActivationCache(paths.cache_paths(params, out_dir)["test"])
    n_eval = params.lens.eval_tokens
    names = params.lens.methods if params.lens.train else [params.lens.method]
    methods = {}
    for name in names:
        folder = paths.lens_path(params, out_dir, name)
        lens = TunedLens.load(folder).to(params.base.device)
        record_file = folder / "record.json"
        methods[name] = {
            "kl": lens_kl_per_layer(model, lens, test, n_eval),
            **lens_geometry(lens),
            "history": json.loads((folder / "history.json").read_text()),
            "record": json.loads(record_file.read_text()) if record_file.exists() else {},
        }
    logit = lens_kl_per_layer(model, None, test, n_eval)
    default = methods[params.lens.method]
    n = len(logit) - 1  # the last block's output is the model's own (KL 0)
    source = {"model": params.base.model, "corpus": params.base.corpus}
    write_json(
        paths.results(out_dir, "lens_kl.json"),
        {
            "logit_lens": logit,
            "tuned_lens": default["kl"],
            "train_history": default["history"],
            "default_method": params.lens.method,
            "methods": methods,
        }
        | source,
    )
    rows = [
        {"layer": ly, "logit_lens": logit[ly]} | {m: r["kl"][ly] for m, r in methods.items()}
        for ly in range(n + 1)
    ]
    write_csv(paths.results(out_dir, "plots", "lens_kl.csv"), rows)
    curve = [{"step": i + 1, "kl": v} for i, v in enumerate(default["history"])]
    write_csv(
        paths.results(out_dir, "plots", "lens_train.csv"),
        curve or [{"step": 0, "kl": float("nan")}],
    )
    summary = {
        "tuned_lens_kl": float(np.mean(default["kl"][:n])),
        "logit_lens_kl": float(np.mean(logit[:n])),
        "steps": len(default["history"]),
    }
    for m, r in methods.items():
        summary |= {
            f"{m}_kl": float(np.mean(r["kl"][:n])),
            f"{m}_max_cond": float(max(r["cond"])),
            f"{m}_mean_w_norm": float(np.mean(r["w_norm"][:n])),
        }
        conv = r["record"].get("convergence")
        if conv is not None:
            summary[f"{m}_converged"] = int(conv["converged"])
            summary[f"{m}_relative_decrease"] = float(conv["relative_decrease"])
    write_metrics(paths.metrics(out_dir, "lens.json"), summary)
    return {
        "logit": logit,
        "tuned": default["kl"],
        "history": default["history"],
        "methods": methods,
        "default": params.lens.method,
        "n_tokens": min(n_eval, test.n_tokens),
        "n_layers": model.cfg.n_layers,
    }
