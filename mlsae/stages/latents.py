"""Stage ``latents_over_layers`` (notebook 09, paper Figures 2-3 and section 4.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlsae import config, paths
from mlsae.analysis import PROMPTS, decoder_summary, prompt_activations, summary
from mlsae.latents import LayerStats
from mlsae.models import load_model
from mlsae.stages.runs import load_run
from mlsae.stages.sweeps import sweep_groups, sweep_points
from mlsae.writers import write_json, write_metrics

KEEP = (
    "n_latents_active", "mean_layers_active_ge1", "mean_layers_active_ge10",
    "median_entropy_nats", "variance_ratio", "variance_ratio_paper",
)  # fmt: skip
"""Summary numbers per run that go to ``results/metrics/latents.json``."""


def load_latent_stats(params, run: str, out_dir: str | Path = ".") -> LayerStats:
    """The latent statistics that evaluating sweep entry ``run`` wrote (held-out test cache)."""
    return LayerStats.load(paths.latent_stats_path(params, run, out_dir))


def threshold_quantiles(out: dict, n_tokens: int) -> tuple[list[int], np.ndarray]:
    """Percentiles over latents of the layers with at least t activations, per threshold t.

    For each threshold up to ``n_tokens``: the 10th, 50th and 90th percentile of the number of
    layers at which a latent fires at least t times, among latents that reach t at one layer.

    ``out`` is `mlsae.latents.LayerStats.compute`'s result. Returns ``(thresholds, (t, 3))``.
    """
    ts = [t for t in out["thresholds"] if t <= n_tokens]
    q = []
    for t in ts:
        n = out["n_layers_above"][out["thresholds"].index(t)].double()
        n = n[n > 0]
        q.append(np.quantile(n.numpy(), [0.1, 0.5, 0.9]) if len(n) else [np.nan] * 3)
    return ts, np.array(q)


def latents_over_layers(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Latent statistics of ``analysis.baseline_run`` and its lens twin ``analysis.lens_run``.

    Per run: the statistics its evaluation wrote and their summary (`mlsae.analysis.summary`),
    the decoder's cosine similarities, and the summed activations on each prompt of
    `mlsae.analysis.PROMPTS`; across the sweep, multi-layer activity per run. Writes
    ``results/latents.json`` and ``results/metrics/latents.json``. Returns ``{"runs",
    "label", "stats", "computed", "prompts", "results", "activity", "metrics", "n_layers"}``.
    """
    model = load_model(params.base.model, device=params.base.device)
    runs = [r for r in (params.analysis.baseline_run, params.analysis.lens_run) if r]
    label = {r: ("with tuned lens" if params.sweep[r].lens else "no lens") for r in runs}
    stats, computed, prompts, results = {}, {}, {}, {}
    for r in runs:
        sae, lens = load_run(params, r, out_dir)
        stats[r] = load_latent_stats(params, r, out_dir)
        computed[r] = stats[r].compute()
        results[r] = {"summary": summary(stats[r]), "decoder": decoder_summary(sae)}
        prompts[r] = [prompt_activations(model, sae, prompt, lens) for prompt in PROMPTS]
        results[r]["prompts"] = [
            {
                "prompt": prompt,
                "n_tokens": res["n_tokens"],
                "n_latents_active": res["stats"]["summary"]["n_latents_active"],
                "mean_layers_active": res["stats"]["summary"]["mean_layers_active_ge1"],
                "variance_ratio": res["stats"]["summary"]["variance_ratio"],
            }
            for prompt, res in zip(PROMPTS, prompts[r], strict=True)
        ]
    groups = sweep_groups(params)
    activity = sweep_points(
        params, groups, lambda n: summary(load_latent_stats(params, n, out_dir))
    )
    source = {"model": params.base.model, "corpus": params.base.corpus}
    write_json(
        paths.results(out_dir, "latents.json"),
        {"runs": results, "activity": activity} | source,
    )
    metrics = {
        r: {
            **{k: results[r]["summary"][k] for k in KEEP},
            "mmcs": results[r]["decoder"]["mmcs_self"],
        }
        for r in runs
    }
    write_metrics(paths.metrics(out_dir, "latents.json"), metrics)
    return {
        "runs": runs,
        "label": label,
        "stats": stats,
        "computed": computed,
        "prompts": prompts,
        "results": results,
        "activity": activity,
        "metrics": metrics,
        "n_layers": model.cfg.n_layers,
    }
