r"""Evaluation of an SAE on held-out data: every metric per layer and its mean over layers.

Each metric is defined, as a formula, in the module that computes it; all are accumulated in
float64 over the evaluation set:

* ``fvu`` (ours: per-dimension mean) and ``fvu_paper`` (the original code's, tim-lawson/mlsae,
  ``mlsae/metrics/layerwise_fvu.py``: MSE over the variance of all entries), L0 and L1:
  `mlsae.reconstruction`. ``space`` says whether x is the raw residual or its lens transform.
  The original compares de-standardised reconstructions with its inputs, so ``fvu_paper`` is in
  the space the SAE reconstructs (raw, or lens space for a lens run; ``fvu_paper_raw`` is raw).
  Our batches: 1024 test tokens (the original: one context).
* delta CE and KL with a layer replaced by its reconstruction: `mlsae.patching`.
* standard errors by bootstrap over contexts: `mlsae.bootstrap`.

MMCS of dictionaries is `mlsae.similarity`, the residual drift of Figure 1 `mlsae.drift`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from transformer_lens import HookedTransformer

from mlsae import bootstrap
from mlsae.activations import residual_stream, special_mask
from mlsae.models import special_token_ids
from mlsae.patching import delta_ce_kl
from mlsae.reconstruction import ReconstructionStats
from mlsae.sae import MLSAE


@torch.no_grad()
def evaluate(
    sae: MLSAE,
    model: HookedTransformer,
    token_batches: Iterable[torch.Tensor],
    lens=None,
    ce_batches: int | None = None,
    layers: list[int] | None = None,
    vectors: Iterable[torch.Tensor] | None = None,
    latent_stats=None,
    vector_contexts: torch.Tensor | None = None,
    n_boot: int = 1000,
    ce_bf16: bool = False,
) -> dict:
    """Evaluate an SAE on held-out data; per-layer metrics and their mean over layers.

    Args:
        sae: the SAE (trained on lens-space vectors when ``lens`` is given).
        model: the language model.
        token_batches: ``(batch, pos)`` token batches of held-out text.
        lens: a `mlsae.lens.TunedLens` or None. With a lens, ``fvu`` is in lens space (the space
            the SAE reconstructs) and ``fvu_raw`` in the raw residual space.
        ce_batches: compute delta CE and KL on the first this-many batches (all if None).
        layers: model layers the SAE was trained on (default all); for a single-layer SAE, one.
        vectors: raw residual batches ``(len(layers), token, d)`` for FVU, L0 and L1, e.g. from
            the test activation cache. Then the model runs only on the delta-CE batches; without
            it, FVU, L0 and L1 come from the residuals of every token batch.
        latent_stats: a `mlsae.latents.LayerStats` to feed with the same activations.
        vector_contexts: ``(token,)`` context index of each token of ``vectors`` (in order);
            with it FVU gets a standard error (``fvu_se``) by bootstrap over contexts. delta CE
            and KL always get one (``delta_ce_se``, ``kl_se``), over the contexts of
            ``token_batches`` (`mlsae.bootstrap`).
        n_boot: bootstrap replicates for the standard errors.
        ce_bf16: run the delta-CE forwards under bfloat16 autocast (`mlsae.patching.delta_ce_kl`).

    Returns:
        ``{"per_layer": {metric: [value per layer]}, "mean": {metric: value}, "layers": [...],
        "n_tokens": int, "n_ce_tokens": int}``.
    """
    sae.eval()
    device = next(sae.parameters()).device
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    specials = special_token_ids(model)
    stats = ReconstructionStats(len(layers), sae.d_model, sae.n_latents)
    raw_stats = ReconstructionStats(len(layers), sae.d_model, sae.n_latents) if lens else None
    ce_rows, kl_rows, n_rows = [], [], []  # per context: (layer,), (layer,), ()
    seen = 0

    def to_space(x: torch.Tensor, layer: int) -> torch.Tensor:
        return lens.transform(x, layer) if lens is not None else x

    def from_space(x: torch.Tensor, layer: int) -> torch.Tensor:
        return lens.invert(x, layer) if lens is not None else x

    def reconstruct(x: torch.Tensor, layer: int) -> torch.Tensor:
        return from_space(sae(to_space(x.to(device), layer)).recons, layer).to(x.dtype)

    def add(x_raw: torch.Tensor, groups: torch.Tensor | None = None) -> None:  # (layer, token, d)
        x_raw = x_raw.to(device)
        x = torch.stack([to_space(x_raw[j], layer) for j, layer in enumerate(layers)])
        out = sae(x)
        stats.update(x, out.recons, out.values, out.indices, groups)
        if raw_stats is not None:
            raw = torch.stack([from_space(out.recons[j], ly) for j, ly in enumerate(layers)])
            raw_stats.update(x_raw, raw, out.values, groups=groups)
        if latent_stats is not None:
            latent_stats.update(out.values, out.indices)

    for x_raw in vectors if vectors is not None else ():
        n = x_raw.shape[1]
        add(x_raw, None if vector_contexts is None else vector_contexts[seen : seen + n])
        seen += n
    if vectors is not None and ce_batches is not None:
        token_batches = itertools.islice(token_batches, ce_batches)  # read no batch past them
    for i, tokens in enumerate(token_batches):
        with_ce = ce_batches is None or i < ce_batches
        resid = residual_stream(model, tokens)  # (layer, batch, pos, d)
        if vectors is None:
            add(resid[layers][:, ~special_mask(tokens.to(resid.device), specials)])
        if with_ce:
            res = delta_ce_kl(model, tokens, reconstruct, layers, resid, bf16=ce_bf16)
            ce_rows += list(res["delta_ce_rows"][layers].T)
            kl_rows += list(res["kl_rows"][layers].T)
            n_rows += list(res["n_rows"])

    per_layer = stats.compute()
    if raw_stats is not None:
        raw = raw_stats.compute()
        per_layer["fvu_raw"], per_layer["fvu_paper_raw"] = raw["fvu"], raw["fvu_paper"]
    n_ce = float(sum(n_rows))
    if n_ce:
        per_layer["delta_ce"] = (torch.stack(ce_rows).sum(0) / n_ce).tolist()
        per_layer["kl"] = (torch.stack(kl_rows).sum(0) / n_ce).tolist()
    per_layer["dead_fraction_train"] = [sae.dead_fraction()] * len(layers)
    mean = {k: sum(v) / len(v) for k, v in per_layer.items()}
    # standard errors by bootstrap over contexts (mlsae.bootstrap)
    if len(n_rows) > 1:
        w = bootstrap.weights(len(n_rows), n_boot)
        counts = torch.stack(n_rows)
        for key, rows in (("delta_ce", ce_rows), ("kl", kl_rows)):
            reps = bootstrap.mean_replicates(torch.stack(rows), counts, w)
            per_layer[f"{key}_se"], mean[f"{key}_se"] = bootstrap.standard_errors(reps)
    for key, acc in (("fvu", stats), ("fvu_raw", raw_stats)):
        sums = acc.group_sums() if acc is not None else None
        if sums is not None and len(sums[3]) > 1:
            reps = bootstrap.fvu_replicates(*sums, bootstrap.weights(len(sums[3]), n_boot))
            per_layer[f"{key}_se"], mean[f"{key}_se"] = bootstrap.standard_errors(reps)
    mean["inactive_fraction_all_layers"] = stats.fired.any(0).logical_not().double().mean().item()
    return {
        "layers": layers,
        "per_layer": per_layer,
        "mean": mean,
        "n_tokens": int(stats.n[0].item()),
        "n_ce_tokens": int(n_ce),
        "n_ce_contexts": len(n_rows),
        "n_fvu_contexts": len(stats.group_sums()[3]) if stats.groups else None,
        "uncertainty": f"standard errors: bootstrap over contexts, {n_boot} replicates",
        "space": "lens" if lens is not None else "raw",
    }
