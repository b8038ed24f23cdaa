"""Stages ``evaluate_run`` / ``evaluate_run_lens`` (notebook 05): a trained run on held-out text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformer_lens import HookedTransformer

from mlsae import config, paths
from mlsae.activations import ActivationCache, take_tokens
from mlsae.analysis import power_law_fit, tokens_to_reach
from mlsae.latents import LayerStats
from mlsae.metrics import evaluate
from mlsae.models import load_model
from mlsae.precision import use_bf16
from mlsae.stages.runs import load_run
from mlsae.train import flatten_config, load_checkpoint, read_log
from mlsae.writers import write_csv, write_json, write_metrics

METRIC_KEYS = (
    "fvu", "fvu_se", "fvu_paper", "fvu_raw", "fvu_raw_se", "fvu_paper_raw", "l0", "l1",
    "delta_ce", "delta_ce_se", "kl", "kl_se", "dead_fraction_train", "inactive_fraction",
)  # fmt: skip
"""The means over layers that go to ``results/metrics/runs/<run>.json`` (``dvc metrics``)."""


def evaluate_sae(
    sae,
    test_cache: ActivationCache,
    model: HookedTransformer,
    eval_batch_size: int,
    eval_tokens: int,
    ce_contexts: int,
    layers: list[int] | None = None,
    lens=None,
    ce_bf16: bool = False,
):
    """Held-out metrics of a trained SAE and the latent statistics of the same pass.

    FVU, L0 and L1 come from the first ``eval_tokens`` tokens of the test cache (no model
    forward); delta CE and KL from the first ``ce_contexts`` contexts the test cache was built
    from, run through the model in batches of ``eval_batch_size``. Returns ``(result,
    latent_stats)``: the metrics (`mlsae.metrics.evaluate`) and a `mlsae.latents.LayerStats`
    (counts and summed activations per layer and latent) for the latent analyses.
    """
    layers = layers or list(range(test_cache.n_layers))
    vectors = take_tokens(test_cache.iter_batches(1024, layers=layers), eval_tokens)
    batches = test_cache.contexts()[:ce_contexts].split(eval_batch_size)
    latent_stats = LayerStats(len(layers), sae.n_latents)
    result = evaluate(
        sae,
        model,
        batches,
        lens=lens,
        layers=layers,
        vectors=vectors,
        latent_stats=latent_stats,
        vector_contexts=test_cache.context_ids(),
        ce_bf16=ce_bf16,
    )
    return result, latent_stats


def training_curve(log: list[dict], fvu_target: float) -> dict:
    """The logged training FVU, its trailing mean, and a power law fitted to its second half.

    Returns ``{"tokens", "fvu", "window", "smooth", "fit"}``; ``fit`` is ``{"a", "b",
    "target", "tokens_to_target"}`` for ``fvu = a * tokens ** b`` (None when the curve has
    fewer than 6 smoothed points).
    """
    tokens = np.array([r["tokens"] for r in log])
    fvus = np.array([r["fvu"] for r in log])
    window = max(1, min(max(5, len(fvus) // 20), len(fvus)))
    smooth = np.convolve(fvus, np.ones(window) / window, mode="valid") if len(fvus) else fvus
    fit, half = None, len(smooth) // 2
    if half >= 3:
        a, b = power_law_fit(tokens[window - 1 :][half:], smooth[half:])
        need = tokens_to_reach(a, b, fvu_target)
        fit = {"a": a, "b": b, "target": fvu_target, "tokens_to_target": need}
    return {"tokens": tokens, "fvu": fvus, "window": window, "smooth": smooth, "fit": fit}


def evaluate_run(
    params: config.Params,
    run: str,
    out_dir: str | Path,
    fvu_target: float,
    model: HookedTransformer | None = None,
) -> dict:
    """Held-out metrics of trained sweep entry ``run``, and its training curve.

    Writes ``results/runs/<run>.json`` (per layer, with standard errors, the run's config and
    the power-law fit of its training curve, `training_curve`), ``results/metrics/runs/<run>.json``
    (the means over layers: numbers only, for ``dvc metrics``), ``results/train/<run>.csv`` and
    ``results/per_layer/<run>.csv`` (for ``dvc plots``), and the latent statistics
    (`mlsae.paths.latent_stats_path`). Returns ``{"result", "curve"}``.
    """
    model = model or load_model(params.base.model, device=params.base.device)
    folder = paths.run_dir(params, run, out_dir)
    sae, lens = load_run(params, run, out_dir, params.base.device)
    result, stats = evaluate_sae(
        sae,
        ActivationCache(paths.cache_paths(params, out_dir)["test"]),
        model,
        eval_batch_size=params.data.batch_contexts,
        eval_tokens=params.eval.eval_tokens,
        ce_contexts=params.eval.ce_contexts,
        lens=lens,
        ce_bf16=use_bf16(params.eval.ce_bf16, params.base.device),
    )
    checkpoint = load_checkpoint(folder / "checkpoint.pt")
    result["config"] = flatten_config(checkpoint["train_config"])
    result["tokens_trained"] = checkpoint["tokens_seen"]
    log = read_log(folder)
    curve = training_curve(log, fvu_target)
    if curve["fit"] is not None:
        result["fvu_fit"] = curve["fit"]
    stats_path = paths.latent_stats_path(params, run, out_dir)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(stats_path)
    write_json(paths.results(out_dir, "runs", f"{run}.json"), result)
    metrics = {k: result["mean"][k] for k in METRIC_KEYS if k in result["mean"]}
    metrics["tokens_trained"] = result["tokens_trained"]
    write_metrics(paths.metrics(out_dir, "runs", f"{run}.json"), metrics)
    write_csv(paths.results(out_dir, "train", f"{run}.csv"), log)
    per_layer = result["per_layer"]
    layers = result["layers"]
    columns = {k: v for k, v in per_layer.items() if len(v) == len(layers)}
    rows = [{"layer": ly, **{k: v[i] for k, v in columns.items()}} for i, ly in enumerate(layers)]
    write_csv(paths.results(out_dir, "per_layer", f"{run}.csv"), rows)
    return {"result": result, "curve": curve}
