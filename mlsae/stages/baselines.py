"""Stage ``single_layer_baselines`` (notebook 07b): single-layer SAEs against one MLSAE.

The single-layer SAEs come trained from stage ``train_baselines`` (`mlsae.stages.train`); this
stage only evaluates them, so a figure or sentence edit never retrains them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.baselines import delta_ce_matrix, fvu_sums, paired_at_layers
from mlsae.models import load_model
from mlsae.precision import use_bf16
from mlsae.train import load_sae
from mlsae.writers import write_json, write_metrics

OFF_DIAGONAL_CONTEXTS = 8
"""Contexts for an off-diagonal delta-CE entry (an SAE at a layer it was not trained on); the
diagonal and the MLSAE row use all ``analysis.baseline_ce_contexts``."""


def single_layer_baselines(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Train layer x eval layer FVU, delta CE and KL of each single-layer SAE and the MLSAE.

    The matrices have one row per single-layer SAE (train layer) and a last row for the MLSAE
    of ``analysis.baseline_run`` at the same training length (`mlsae.config.compare_tokens`: its
    snapshot there when it trains longer, as the single-layer SAEs stop there), all
    evaluated on the same held-out tokens at each baseline layer: FVU on ``eval.eval_tokens``
    tokens of the test cache; delta CE and KL on the first ``analysis.baseline_ce_contexts``
    contexts for the diagonal and the MLSAE row, the first `OFF_DIAGONAL_CONTEXTS` of them off
    the diagonal. ``paired``: at each baseline layer the MLSAE (b) against the single-layer SAE
    (a), FVU and delta CE (`mlsae.baselines.paired_at_layers`). Writes ``results/baselines.json``
    and ``results/metrics/baselines.json`` (the means over baseline layers of each single-layer
    SAE at its own layer and of the MLSAE).
    """
    model = load_model(params.base.model, device=params.base.device)
    run, layers = params.analysis.baseline_run, list(params.analysis.baseline_layers)
    device = params.base.device
    folder = paths.baselines_dir(params, out_dir)
    saes = {ly: load_sae(folder / f"layer-{ly}" / "checkpoint.pt", device).eval() for ly in layers}
    at = config.compare_tokens(params)  # the single-layer SAEs' budget (stage train_baselines)
    mlsae_path = (
        paths.snapshot_path(params, run, at, out_dir)
        if config.baseline_snapshot(params)
        else paths.run_dir(params, run, out_dir) / "checkpoint.pt"
    )
    saes["mlsae"] = load_sae(mlsae_path, device).eval()
    test_cache = ActivationCache(paths.cache_paths(params, out_dir)["test"])
    fvu = fvu_sums(saes, test_cache, layers, params.eval.eval_tokens)
    tokens = test_cache.contexts()[: params.analysis.baseline_ce_contexts]
    ce = delta_ce_matrix(
        saes,
        model,
        tokens,
        layers,
        bf16=use_bf16(params.eval.ce_bf16, params.base.device),
        off_diagonal_contexts=OFF_DIAGONAL_CONTEXTS,
        batch_contexts=params.data.batch_contexts,
    )
    n = ce["n"]
    result = {
        "layers": layers,
        "rows": [f"single layer {ly}" for ly in layers] + [f"MLSAE {run}"],
        "run": run,
        "tokens_trained": at,  # every SAE compared here, the MLSAE included
        "fvu": fvu["fvu"].tolist(),
        "delta_ce": ce["delta_ce"].tolist(),
        "kl": ce["kl"].tolist(),
        "n_fvu_tokens": min(params.eval.eval_tokens, test_cache.n_tokens),
        "n_ce_tokens": int(n[-1, 0]),  # predictions of the MLSAE row at a layer, as in Table 1
        "n_ce_predictions": n.tolist(),  # per entry: fewer off the diagonal
        "ce_contexts": len(tokens),
        "ce_contexts_off_diagonal": min(OFF_DIAGONAL_CONTEXTS, len(tokens)),
        "paired": paired_at_layers(list(saes), layers, fvu, ce),
        "n_layers": model.cfg.n_layers,
        "model": params.base.model,
        "corpus": params.base.corpus,
    }
    write_json(paths.results(out_dir, "baselines.json"), result)
    own = {key: np.diag(np.array(result[key])[:-1]) for key in ("fvu", "delta_ce")}
    mlsae = {key: np.array(result[key])[-1] for key in ("fvu", "delta_ce")}
    write_metrics(
        paths.metrics(out_dir, "baselines.json"),
        {
            "single_layer_fvu": float(own["fvu"].mean()),
            "mlsae_fvu": float(mlsae["fvu"].mean()),
            "single_layer_delta_ce": float(own["delta_ce"].mean()),
            "mlsae_delta_ce": float(mlsae["delta_ce"].mean()),
        },
    )
    return result
