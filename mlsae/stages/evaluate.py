"""Stages ``evaluate_run`` / ``evaluate_run_lens`` (notebook 05): a trained run on held-out text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mlsae import bootstrap, config, paths
from mlsae.activations import ActivationCache, take_tokens
from mlsae.analysis import power_law_fit, tokens_to_reach
from mlsae.compare import per_context_rows
from mlsae.latents import LayerStats
from mlsae.metrics import evaluate
from mlsae.models import load_model
from mlsae.paper_lens_ce import delta_ce_paper
from mlsae.patching import stride_rows
from mlsae.precision import use_bf16
from mlsae.stages.runs import load_run
from mlsae.train import flatten_config, load_checkpoint, load_sae, read_log
from mlsae.writers import write_csv, write_json, write_metrics

METRIC_KEYS = (
    "fvu", "fvu_se", "fvu_paper", "fvu_raw", "fvu_raw_se", "fvu_paper_raw", "l0", "l1",
    "delta_ce", "delta_ce_se", "kl", "kl_se", "dead_fraction_train", "inactive_fraction",
    "delta_ce_paper", "delta_ce_paper_se", "lens_baseline_shift",
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
    ce_stride: int = 1,
):
    """Held-out metrics of a trained SAE and the latent statistics of the same pass.

    FVU, L0 and L1 come from the first ``eval_tokens`` tokens of the test cache (no model
    forward); delta CE and KL from the first ``ce_contexts`` contexts the test cache was built
    from (context c, its index there, patched at the layers l = c mod ``ce_stride``), run
    through the model in batches of ``eval_batch_size``. Returns ``(result, latent_stats)``: the
    metrics (`mlsae.metrics.evaluate`, with its per-context data) and a
    `mlsae.latents.LayerStats` (counts and summed activations per layer and latent) for the
    latent analyses.
    """
    layers = layers or list(range(test_cache.n_layers))
    vectors = take_tokens(test_cache.iter_batches(1024, layers=layers), eval_tokens)
    contexts = test_cache.contexts()[:ce_contexts]
    batches = contexts.split(eval_batch_size) if len(contexts) else []
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
        ce_stride=ce_stride,
        ce_context_ids=torch.arange(len(contexts)),
    )
    return result, latent_stats


@torch.no_grad()
def paper_delta_ce(sae, lens, contexts: torch.Tensor, model, batch: int, stride: int) -> dict:
    """The original code's lens delta CE (`mlsae.paper_lens_ce`, NOTES.md defect 9) per layer.

    On the ``(context, pos)`` tokens ``contexts`` (context c patched at the layers l = c mod
    ``stride``), in batches of ``batch``; with a bootstrap SE over contexts (stratified by the
    design, `mlsae.bootstrap.design_strata`). Returns ``{"per_layer": {"delta_ce_paper",
    "lens_baseline_shift"}, "mean": {... and "delta_ce_paper_se"}, "stride": stride}``.
    """
    rows = {"delta_ce_rows": [], "baseline_shift_rows": [], "n_layer_rows": []}
    for start in range(0, len(contexts), batch):
        tokens = contexts[start : start + batch]
        ids = torch.arange(start, start + len(tokens))
        res = delta_ce_paper(
            model, tokens, lambda y, _: sae(y).recons, lens, rows=stride_rows(ids, stride)
        )
        for key in rows:
            rows[key].append(res[key].T)  # (context, layer)
    d, shift, n = (torch.cat(rows[k]) for k in rows)
    per_layer = {
        "delta_ce_paper": (d.sum(0) / n.sum(0)).tolist(),
        "lens_baseline_shift": (shift.sum(0) / n.sum(0)).tolist(),
    }
    mean = {k: float(np.mean(v)) for k, v in per_layer.items()}
    w = bootstrap.weights(len(n), strata=bootstrap.design_strata(n > 0))
    _, mean["delta_ce_paper_se"] = bootstrap.standard_errors(bootstrap.mean_replicates(d, n, w))
    return {"per_layer": per_layer, "mean": mean, "stride": stride}


def ce_stride(params: config.Params, run: str, snapshot: bool = False) -> int:
    """The delta-CE stride of ``run`` (of its snapshot with ``snapshot``).

    ``eval.ce_stride`` for a Table 1 SAE (the baseline run's final SAE, ``analysis.lens_run``),
    else ``eval.sweep_ce_stride`` (other sweep runs, the other lenses' runs, every snapshot).
    """
    table1 = not snapshot and run in (params.analysis.baseline_run, params.analysis.lens_run)
    return params.eval.ce_stride if table1 else params.eval.sweep_ce_stride


def snapshot_tokens(params: config.Params, run: str, out_dir: str | Path = ".") -> list[int]:
    """``train.snapshot_tokens`` below ``run``'s budget whose snapshot file exists."""
    budget = params.sweep[run].train_tokens or params.data.train_tokens
    return [
        t
        for t in params.train.snapshot_tokens
        if t < budget and paths.snapshot_path(params, run, t, out_dir).exists()
    ]


def write_result(params, out_dir, name: str, result: dict, stats: LayerStats, tokens=None) -> None:
    """Write ``name``'s results: ``results/runs`` and ``results/metrics/runs`` JSON.

    For a snapshot (``tokens``): ``results/snapshots`` only.

    Also its per-context CSV (`mlsae.paths.per_context_path`; the ``per_context`` data goes
    there, not into the JSON) and its latent statistics (`mlsae.paths.latent_stats_path`).
    """
    run = name.split("@")[0]
    stats_path = paths.latent_stats_path(params, run, out_dir, tokens)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(stats_path)
    write_csv(paths.per_context_path(out_dir, name), per_context_rows(result))
    write_json(
        paths.run_result_path(out_dir, name),
        {k: v for k, v in result.items() if k != "per_context"},
    )
    if tokens is None:  # a snapshot's means go to results/metrics/snapshots.json
        write_metrics(paths.metrics(out_dir, "runs", f"{name}.json"), mean_metrics(result))


def mean_metrics(result: dict) -> dict:
    """The `METRIC_KEYS` means of ``result`` and its ``tokens_trained`` (numbers only)."""
    metrics = {k: result["mean"][k] for k in METRIC_KEYS if k in result["mean"]}
    return metrics | {"tokens_trained": result["tokens_trained"]}


def evaluate_snapshots(
    params, run: str, out_dir: str | Path = ".", model=None, lens=None
) -> dict[str, dict]:
    """Stage ``evaluate_snapshots`` (notebook 05b): each existing snapshot of ``run``.

    FVU, L0, L1 and latent statistics for each; delta CE and KL (``eval.sweep_ce_stride``) for
    the one at ``analysis.compare_tokens`` only. Writes each under `mlsae.paths.snapshot_name`
    (`write_result`) and their means to ``results/metrics/snapshots.json``; returns ``{name:
    result}``.
    """
    model = model or load_model(params.base.model, device=params.base.device)
    cache = ActivationCache(paths.cache_paths(params, out_dir)["test"])
    out = {}
    for tokens in snapshot_tokens(params, run, out_dir):
        path = paths.snapshot_path(params, run, tokens, out_dir)
        sae, seen = load_sae(path, params.base.device).eval(), load_checkpoint(path)["tokens_seen"]
        with_ce = tokens == params.analysis.compare_tokens
        result, stats = evaluate_sae(
            sae,
            cache,
            model,
            eval_batch_size=params.data.batch_contexts,
            eval_tokens=params.eval.eval_tokens,
            ce_contexts=params.eval.ce_contexts if with_ce else 0,
            lens=lens,
            ce_bf16=use_bf16(params.eval.ce_bf16, params.base.device),
            ce_stride=ce_stride(params, run, snapshot=True),
        )
        name = paths.snapshot_name(run, tokens)
        result |= {"name": name, "snapshot_of": run, "tokens_trained": seen or tokens}
        write_result(params, out_dir, name, result, stats, tokens)
        out[name] = result
    metrics = {name: mean_metrics(result) for name, result in out.items()}
    write_metrics(paths.metrics(out_dir, "snapshots.json"), metrics)
    return out


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

    Writes ``results/runs/<run>.json`` (per layer, with standard errors, the run's config, the
    delta-CE design ``ce_design`` (`ce_stride`), the FVU denominators ``fvu_denominator`` and
    the power-law fit of its training curve, `training_curve`), ``results/metrics/runs/<run>.json``
    (the means over layers: numbers only, for ``dvc metrics``), ``results/per_context/<run>.csv``
    (`mlsae.compare.per_context_rows`), ``results/train/<run>.csv`` and
    ``results/per_layer/<run>.csv`` (for ``dvc plots``), and the latent statistics
    (`mlsae.paths.latent_stats_path`). Its training snapshots are stage ``evaluate_snapshots``.
    Returns ``{"result", "curve"}``.
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
        ce_stride=ce_stride(params, run),
    )
    if lens is not None:  # the paper's twin of Table 1b's delta CE, on the sweep design
        contexts = ActivationCache(paths.cache_paths(params, out_dir)["test"]).contexts()
        paper = paper_delta_ce(
            sae,
            lens,
            contexts[: params.eval.ce_contexts],
            model,
            params.data.batch_contexts,
            params.eval.sweep_ce_stride,
        )
        result["per_layer"] |= paper["per_layer"]
        result["mean"] |= paper["mean"]
        result["delta_ce_paper_stride"] = paper["stride"]
    checkpoint = load_checkpoint(folder / "checkpoint.pt")
    result["config"] = flatten_config(checkpoint["train_config"])
    result["tokens_trained"] = checkpoint["tokens_seen"]
    log = read_log(folder)
    curve = training_curve(log, fvu_target)
    if curve["fit"] is not None:
        result["fvu_fit"] = curve["fit"]
    write_result(params, out_dir, run, result, stats)
    write_csv(paths.results(out_dir, "train", f"{run}.csv"), log)
    per_layer = result["per_layer"]
    layers = result["layers"]
    columns = {k: v for k, v in per_layer.items() if len(v) == len(layers)}
    rows = [{"layer": ly, **{k: v[i] for k, v in columns.items()}} for i, ly in enumerate(layers)]
    write_csv(paths.results(out_dir, "per_layer", f"{run}.csv"), rows)
    return {"result": result, "curve": curve}
