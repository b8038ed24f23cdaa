"""Stage ``latents_over_layers`` (notebook 09, paper Figures 2-3 and section 4.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlsae import config, paths
from mlsae.analysis import (
    PROMPTS,
    decoder_summary,
    flat_findings,
    latent_findings,
    prompt_activations,
    summary,
)
from mlsae.latent_measures import sweep_measures
from mlsae.latents import LayerStats
from mlsae.models import load_model
from mlsae.stages.runs import load_run
from mlsae.stages.sweeps import compare_point, sweep_groups, sweep_points
from mlsae.writers import write_json, write_metrics

KEEP = (
    "n_latents_active", "mean_layers_active_ge1", "mean_layers_active_ge10",
    "median_entropy_nats", "variance_ratio", "variance_ratio_paper",
)  # fmt: skip
"""Summary numbers per run that go to ``results/metrics/latents.json`` (with `flat_findings`)."""
N_BOOT = 1000
"""Bootstrap replicates (over test contexts) of the latent measures."""


def load_latent_stats(
    params, run: str, out_dir: str | Path = ".", tokens: int | None = None
) -> LayerStats:
    """The latent statistics that evaluating sweep entry ``run`` wrote (held-out test cache).

    ``tokens``: those of its training snapshot at that many tokens (None: the final SAE).
    """
    return LayerStats.load(paths.latent_stats_path(params, run, out_dir, tokens))


def sweep_tokens(params, run: str, out_dir: str | Path = ".") -> int | None:
    """The training length whose statistics stand for ``run`` in the sweeps (None: final).

    The rule of the other sweep comparisons (`mlsae.stages.sweeps.compare_point`): the baseline
    run, which trains past ``analysis.compare_tokens``, stands in as its snapshot there. Its
    snapshot's statistics are used when they exist, else (and for every other run) the final
    SAE's.
    """
    if compare_point(params, run) == run:
        return None
    at = params.analysis.compare_tokens
    return at if paths.latent_stats_path(params, run, out_dir, at).exists() else None


def by_training_length(
    params, out_dir: str | Path, window_tokens: int, n_boot: int = N_BOOT
) -> list[dict]:
    """`flat_findings` of the baseline run at each of ``train.snapshot_tokens`` and at the end.

    One row per statistics file that exists (snapshot files are written by the evaluation;
    missing ones are skipped): ``{"tokens", "final", **flat_findings}``; the final row's
    ``tokens`` is the run's budget. The prompt's values need the snapshot's SAE and are not
    in these rows; the windows are.
    """
    run = params.analysis.baseline_run
    budget = params.sweep[run].train_tokens or params.data.train_tokens
    rows = []
    for tokens in [*sorted(params.train.snapshot_tokens), None]:
        if not paths.latent_stats_path(params, run, out_dir, tokens).exists():
            continue
        stats = load_latent_stats(params, run, out_dir, tokens)
        found = latent_findings(stats, window_tokens, n_boot=n_boot)
        rows.append({"tokens": tokens or budget, "final": tokens is None, **flat_findings(found)})
    return rows


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


def latents_over_layers(
    params: config.Params, out_dir: str | Path = ".", n_boot: int = N_BOOT
) -> dict:
    """Latent statistics of ``analysis.baseline_run`` and its lens twin ``analysis.lens_run``.

    Per run: the statistics its evaluation wrote and their summary (`mlsae.analysis.summary`),
    the measures that do not saturate (`mlsae.analysis.latent_findings`, the first prompt of
    `mlsae.analysis.PROMPTS` against windows of its length), the decoder's cosine similarities,
    and the summed activations on each prompt; across each sweep group, multi-layer activity per
    run (``activity``) and `mlsae.latent_measures.sweep_measures` (``sweep``: raw and at matched
    activation counts); the baseline run's headline measures against training length
    (``by_tokens``, `by_training_length`). Writes ``results/latents.json`` and
    ``results/metrics/latents.json``. Returns ``{"runs", "label", "stats", "computed",
    "prompts", "results", "activity", "sweep", "by_tokens", "metrics", "n_layers"}``.
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
                "frac_single_layer": res["window"]["frac_single_layer"],
            }
            for prompt, res in zip(PROMPTS, prompts[r], strict=True)
        ]
        first = prompts[r][0]
        results[r]["findings"] = latent_findings(
            stats[r], first["n_tokens"], first["window"], n_boot=n_boot
        )
    groups = sweep_groups(params)
    tokens = {n: sweep_tokens(params, n, out_dir) for g in groups.values() for n in g}
    activity = sweep_points(
        params,
        groups,
        lambda n: {"tokens": tokens[n]} | summary(load_latent_stats(params, n, out_dir, tokens[n])),
    )
    sweep = {}
    for g, names in groups.items():
        loaded = {n: load_latent_stats(params, n, out_dir, tokens[n]) for n in names}
        measured = sweep_measures(loaded, n_boot)
        del loaded  # a file with per-context sums is ~90 MB in memory
        points = sweep_points(
            params, {g: names}, lambda n, m=measured: {"tokens": tokens[n]} | m[n]
        )
        sweep[g] = points[g]
    window_tokens = prompts[runs[0]][0]["n_tokens"]  # the first prompt of the baseline run
    by_tokens = by_training_length(params, out_dir, window_tokens, n_boot)
    source = {"model": params.base.model, "corpus": params.base.corpus}
    write_json(
        paths.results(out_dir, "latents.json"),
        {"runs": results, "activity": activity, "sweep": sweep, "by_tokens": by_tokens} | source,
    )
    metrics = {
        r: {
            **{k: results[r]["summary"][k] for k in KEEP},
            "mmcs": results[r]["decoder"]["mmcs_self"],
            **flat_findings(results[r]["findings"]),
        }
        for r in runs
    }
    metrics["sweep_layer_std"] = {
        g: {
            p["run"]: {
                "raw": p["raw"]["layer_std_mean"]["value"],
                **({"matched": p["matched"]["layer_std_mean"]["value"]} if p["matched"] else {}),
            }
            for p in points
        }
        for g, points in sweep.items()
    }
    metrics["by_tokens"] = {
        str(row["tokens"]): {k: v for k, v in row.items() if k not in ("tokens", "final")}
        for row in by_tokens
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
        "sweep": sweep,
        "by_tokens": by_tokens,
        "metrics": metrics,
        "n_layers": model.cfg.n_layers,
    }
