"""Stage ``latent_explorer`` (notebook 10): the static latent explorer site."""

from __future__ import annotations

import time
from pathlib import Path

from mlsae import config, explorer, explorer_site, paths
from mlsae.activations import ActivationCache
from mlsae.lens import TunedLens
from mlsae.models import load_model
from mlsae.stages.runs import load_run
from mlsae.writers import write_metrics


def latent_explorer(
    params: config.Params, out_dir: str | Path, n_top: int, n_top_layer: int
) -> dict:
    """Build ``figures/explorer`` for ``analysis.baseline_run`` (`mlsae.explorer`).

    ``n_top`` contexts per latent and ``n_top_layer`` per latent and layer (the notebook's
    parameters, its one source of these).

    For a run on raw residuals, the pipeline's tuned lens (when there is one) carries decoder
    directions to the last layer's basis for the logit effects. Writes
    ``results/metrics/explorer.json``. Returns ``{"run", "data", "size", "seconds"}``.
    """
    model = load_model(params.base.model, device=params.base.device)
    run = params.analysis.baseline_run
    sae, lens = load_run(params, run, out_dir)
    folder = paths.lens_path(params, out_dir)
    has_lens = (folder / "params.pt").exists()
    lens_for_logits = TunedLens.load(folder) if lens is None and has_lens else None
    start = time.time()
    data = explorer.build(
        sae,
        ActivationCache(paths.cache_paths(params, out_dir)["test"]),
        model,
        params.data.test_tokens,
        lens,
        lens_for_logits,
        n_top=n_top,
        n_top_layer=n_top_layer,
    )
    size = explorer_site.write_explorer(
        paths.figures(out_dir) / "explorer",
        data,
        model.tokenizer,
        f"MLSAE {run}",
        f"{params.base.model} on {params.base.corpus}",
    )
    seconds = time.time() - start
    write_metrics(
        paths.metrics(out_dir, "explorer.json"),
        {
            "latents": data["n_latents"],
            "bytes": size["bytes"],
            "files": size["files"],
            "build_seconds": round(seconds, 1),
            "projected_bytes_32k_latents": round(size["bytes"] / data["n_latents"] * 32768),
        },
    )
    return {"run": run, "data": data, "size": size, "seconds": seconds}
