r"""Evaluation of an SAE on held-out data: every metric per layer and its mean over layers.

Each metric is defined, as a formula, in the module that computes it; all are accumulated in
float64 over the evaluation set:

* ``fvu`` (ours: per-dimension mean) and ``fvu_paper`` (the original code's, tim-lawson/mlsae,
  ``mlsae/metrics/layerwise_fvu.py``: MSE over the variance of all entries), L0 and L1:
  `mlsae.reconstruction`. ``space`` says whether x is the raw residual or its lens transform.
  The original compares de-standardised reconstructions with its inputs, so ``fvu_paper`` is in
  the space the SAE reconstructs (raw, or lens space for a lens run; ``fvu_paper_raw`` is raw).
  Our batches: 1024 test tokens (the original: one context).
* delta CE and KL with a layer replaced by its reconstruction: `mlsae.patching`; under the stride
  design (``ce_stride``, `mlsae.patching.stride_mask`) context c is patched only at the layers
  :math:`l \equiv c \pmod s`, and delta CE at layer l is :math:`\sum_c s_{cl} / \sum_c n_{cl}`
  over the contexts patched there; the mean over layers is the plain mean of those.
* standard errors by bootstrap over contexts: `mlsae.bootstrap`; paired run-against-run
  comparisons from the per-context sums returned here: `mlsae.compare`.

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
from mlsae.patching import delta_ce_kl, stride_mask, stride_rows
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
    ce_stride: int = 1,
    ce_context_ids: torch.Tensor | None = None,
) -> dict:
    r"""Evaluate an SAE on held-out data; per-layer metrics and their mean over layers.

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
        ce_stride: the layer design of delta CE (`mlsae.patching.stride_mask`; 1: every pair).
        ce_context_ids: ``(context,)`` id of each row of the delta-CE batches, in order (default
            0, 1, ...): the design's c and the ``context`` of the per-context data.

    Returns:
        ``{"per_layer": {metric: [value per layer]}, "mean": {metric: value}, "layers": [...],
        "n_tokens": int, "n_ce_tokens": int, "ce_design": {...}, "fvu_denominator": {...},
        "per_context": {...}}``. ``n_ce_tokens``: predictions in the delta-CE contexts (each
        counted once); ``ce_design``: ``{"stride", "contexts", "pairs"}`` (patched (context,
        layer) pairs). ``fvu_denominator``: per layer :math:`D_l = \sum_t \|x_t - \bar x\|^2`
        over the FVU tokens, ``"space"`` (the SAE's) and ``"raw"``. ``per_context``: ``context``
        ids (union of the delta-CE and FVU contexts, increasing), and per (context, layer)
        ``n_pred``, ``delta_ce_sum``, ``kl_sum`` (0 where not patched), ``sse``, ``sse_raw``
        (NaN where a context has no FVU token; ``sse_raw`` None without a lens), and
        per context ``n_tokens`` (FVU tokens).
    """
    sae.eval()
    device = next(sae.parameters()).device
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    specials = special_token_ids(model)
    stats = ReconstructionStats(len(layers), sae.d_model, sae.n_latents)
    raw_stats = ReconstructionStats(len(layers), sae.d_model, sae.n_latents) if lens else None
    ce_rows, kl_rows, n_rows, n_pairs = [], [], [], []  # per context: (layer,) x 2, (), (layer,)
    ce_ids: list[int] = []
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
            latent_stats.update(out.values, out.indices, groups)

    for x_raw in vectors if vectors is not None else ():
        n = x_raw.shape[1]
        add(x_raw, None if vector_contexts is None else vector_contexts[seen : seen + n])
        seen += n
    if vectors is not None and ce_batches is not None:
        token_batches = itertools.islice(token_batches, ce_batches)  # read no batch past them
    row = 0
    for i, tokens in enumerate(token_batches):
        with_ce = ce_batches is None or i < ce_batches
        ids = torch.arange(row, row + len(tokens)) if ce_context_ids is None else None
        ids = ce_context_ids[row : row + len(tokens)].long() if ids is None else ids
        row += len(tokens)
        resid = residual_stream(model, tokens)  # (layer, batch, pos, d)
        if vectors is None:
            keep = ~special_mask(tokens.to(resid.device), specials)
            add(resid[layers][:, keep], ids[:, None].expand(keep.shape)[keep.cpu()])
        if with_ce:
            rows = stride_rows(ids, ce_stride) if ce_stride > 1 else None
            res = delta_ce_kl(model, tokens, reconstruct, layers, resid, ce_bf16, rows)
            ce_rows += list(res["delta_ce_rows"][layers].T)
            kl_rows += list(res["kl_rows"][layers].T)
            n_rows += list(res["n_rows"])
            n_pairs += list(res["n_layer_rows"][layers].T)
            ce_ids += ids.tolist()

    per_layer = stats.compute()
    if raw_stats is not None:
        raw = raw_stats.compute()
        per_layer["fvu_raw"], per_layer["fvu_paper_raw"] = raw["fvu"], raw["fvu_paper"]
    n_ce = float(sum(n_rows))
    counts = torch.stack(n_pairs) if n_pairs else torch.zeros(0, len(layers), dtype=torch.float64)
    if n_ce:
        per_layer["delta_ce"] = (torch.stack(ce_rows).sum(0) / counts.sum(0)).tolist()
        per_layer["kl"] = (torch.stack(kl_rows).sum(0) / counts.sum(0)).tolist()
    per_layer["dead_fraction_train"] = [sae.dead_fraction()] * len(layers)
    mean = {k: sum(v) / len(v) for k, v in per_layer.items()}
    # standard errors by bootstrap over contexts (mlsae.bootstrap), stratified by the design
    if len(n_rows) > 1:
        strata = bootstrap.design_strata(stride_mask(torch.tensor(ce_ids), layers, ce_stride))
        w = bootstrap.weights(len(n_rows), n_boot, strata=strata)
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
        "ce_design": {
            "stride": ce_stride,
            "contexts": len(n_rows),
            "pairs": int((counts > 0).sum()),
        },
        "uncertainty": f"standard errors: bootstrap over contexts, {n_boot} replicates",
        "space": "lens" if lens is not None else "raw",
        "fvu_denominator": {
            "space": _denominator(stats),
            "raw": _denominator(raw_stats if raw_stats is not None else stats),
        },
        "per_context": _per_context(ce_ids, counts, ce_rows, kl_rows, stats, raw_stats, layers),
    }


def _denominator(stats: ReconstructionStats) -> list[float]:
    r"""Per layer :math:`D = Q - \|S\|^2 / N = \sum_t \|x_t - \bar x\|^2` (FVU's denominator)."""
    return (stats.sum_x2 - stats.sum_x.pow(2).sum(-1) / stats.n).tolist()


def _per_context(ce_ids, counts, ce_rows, kl_rows, stats, raw_stats, layers) -> dict:
    """The per-(context, layer) sums of `evaluate` on the union of its CE and FVU contexts."""
    fvu_ids = torch.unique(torch.cat([g[0] for g in stats.groups])) if stats.groups else None
    fvu_ids = torch.zeros(0, dtype=torch.long) if fvu_ids is None else fvu_ids.long()
    ids = torch.unique(torch.cat([torch.tensor(ce_ids, dtype=torch.long), fvu_ids]))
    where = {c: i for i, c in enumerate(ids.tolist())}
    shape = (len(ids), len(layers))
    out = {"context": ids.tolist(), "layers": list(layers)}
    ce_at = torch.tensor([where[c] for c in ce_ids], dtype=torch.long)
    for key, value in (("n_pred", counts), ("delta_ce_sum", ce_rows), ("kl_sum", kl_rows)):
        value = torch.stack(value) if isinstance(value, list) and value else value
        full = torch.zeros(shape, dtype=torch.float64)
        if len(ce_ids):
            full[ce_at] = torch.as_tensor(value, dtype=torch.float64)
        out[key] = full.tolist()
    fvu_at = torch.tensor([where[c] for c in fvu_ids.tolist()], dtype=torch.long)
    n_tokens = torch.zeros(len(ids), dtype=torch.float64)
    for key, acc in (("sse", stats), ("sse_raw", raw_stats)):
        sums = acc.group_sums() if acc is not None else None
        if sums is None:
            out[key] = None
            continue
        full = torch.full(shape, float("nan"), dtype=torch.float64)
        full[fvu_at] = sums[0]
        out[key] = full.tolist()
        n_tokens[fvu_at] = sums[3]
    out["n_tokens"] = n_tokens.tolist()
    return out
