"""Single-layer SAE baselines: one SAE per layer, evaluated at every baseline layer.

Each baseline has the size (expansion factor, k) and token budget of one MLSAE sweep entry but
trains on one layer's vectors only (so on ``n_layers`` times fewer vectors). Entry ``[t, e]`` of
each matrix is the SAE trained at layer ``t`` evaluated on layer ``e``; the diagonal is the usual
single-layer SAE, to be compared with the MLSAE at the same layer (`mlsae.compare`, paired on
the same contexts: `paired_at_layers`).

delta CE: the diagonal and the MLSAE row on every given context; an off-diagonal entry (an SAE
at a layer it never saw) on the first ``off_diagonal_contexts`` only, to keep the cost down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer

from mlsae.activations import ActivationCache, residual_stream, take_tokens
from mlsae.bootstrap import N_BOOT
from mlsae.compare import compare_fvu, compare_means
from mlsae.patching import delta_ce_kl
from mlsae.reconstruction import ReconstructionStats


@torch.no_grad()
def fvu_sums(
    saes: dict, cache: ActivationCache, layers: list[int], max_tokens: int
) -> dict[str, torch.Tensor]:
    r"""FVU of each SAE at each layer, and its per-context squared errors for paired tests.

    Returns ``{"fvu": (sae, eval layer), "sse": (sae, context, eval layer), "n_tokens":
    (context,), "denominator": (eval layer,)}`` with :math:`D_l = \sum_t \|x_t - \bar x\|^2`
    over the tokens (the same for every SAE); ``sse`` and ``n_tokens`` are empty (0 contexts)
    when the cache does not record contexts.
    """
    stats = {t: ReconstructionStats(len(layers), cache.d_model, saes[t].n_latents) for t in saes}
    ctx, seen = cache.context_ids(), 0
    for batch in take_tokens(cache.iter_batches(1024, layers=layers), max_tokens):
        groups = None if ctx is None else ctx[seen : seen + batch.shape[1]]
        seen += batch.shape[1]
        for t, sae in saes.items():  # batch: (eval layer, token, d)
            out = sae(batch)
            stats[t].update(batch, out.recons, out.values, groups=groups)
    first = next(iter(stats.values()))
    sums = {t: s.group_sums() for t, s in stats.items()}
    empty = torch.zeros(len(saes), 0, len(layers), dtype=torch.float64)
    return {
        "fvu": torch.tensor([stats[t].compute()["fvu"] for t in saes]),
        "sse": empty if ctx is None else torch.stack([sums[t][0] for t in saes]),
        "n_tokens": torch.zeros(0) if ctx is None else sums[next(iter(saes))][3],
        "denominator": first.sum_x2 - first.sum_x.pow(2).sum(-1) / first.n,
    }


def fvu_matrix(saes: dict, cache: ActivationCache, layers: list[int], max_tokens: int):
    """``(train layer, eval layer)`` FVU of each SAE on cached held-out residuals."""
    return fvu_sums(saes, cache, layers, max_tokens)["fvu"]


@torch.no_grad()
def delta_ce_matrix(
    saes: dict,
    model: HookedTransformer,
    tokens: torch.Tensor,
    layers: list[int],
    bf16: bool = False,
    off_diagonal_contexts: int | None = None,
    batch_contexts: int | None = None,
) -> dict[str, torch.Tensor]:
    """``(sae, eval layer)`` delta CE and KL (per predicted token) on the contexts ``tokens``.

    SAE ``t`` (a key of ``saes`` that is one of ``layers``) at eval layer ``t``, and any other
    SAE (the MLSAE) at every layer, is patched on every context; SAE ``t`` at a layer ``e != t``
    on the first ``off_diagonal_contexts`` only (None: all). ``batch_contexts``: contexts per
    forward (None: all at once). ``bf16``: the forwards under bfloat16 autocast
    (`mlsae.patching.delta_ce_kl`).

    Returns:
        ``{"delta_ce", "kl": (sae, eval layer) means, "n": (sae, eval layer) predictions,
        "delta_ce_sum", "kl_sum", "n_pred": (sae, context, eval layer) sums}`` (positions whose
        input or target is a special token excluded, as in `mlsae.patching.delta_ce_kl`).
    """
    n_ctx = len(tokens)
    off = n_ctx if off_diagonal_contexts is None else min(off_diagonal_contexts, n_ctx)
    shape = (len(saes), n_ctx, len(layers))
    sums = {
        k: torch.zeros(shape, dtype=torch.float64) for k in ("delta_ce_sum", "kl_sum", "n_pred")
    }
    start = 0
    for batch in tokens.split(batch_contexts or n_ctx):
        resid = residual_stream(model, batch)
        ids = torch.arange(start, start + len(batch))
        for i, (key, sae) in enumerate(saes.items()):
            reconstruct: Callable = lambda x, layer, sae=sae: sae(x).recons  # noqa: E731

            def rows(layer: int, key=key, ids=ids) -> torch.Tensor:
                if key == layer or key not in layers:  # diagonal, MLSAE: every context
                    return torch.arange(len(ids))
                return torch.nonzero(ids < off).flatten()

            res = delta_ce_kl(model, batch, reconstruct, layers, resid, bf16, rows)
            at = slice(start, start + len(batch))
            sums["delta_ce_sum"][i, at] = res["delta_ce_rows"][layers].T
            sums["kl_sum"][i, at] = res["kl_rows"][layers].T
            sums["n_pred"][i, at] = res["n_layer_rows"][layers].T
        start += len(batch)
    n = sums["n_pred"].sum(1)
    return {
        "delta_ce": sums["delta_ce_sum"].sum(1) / n,
        "kl": sums["kl_sum"].sum(1) / n,
        "n": n,
        **sums,
    }


def paired_at_layers(
    keys: list, layers: list[int], fvu: dict, ce: dict, mlsae_key="mlsae", n_boot: int = N_BOOT
) -> list[dict]:
    """At each baseline layer t: the MLSAE (b) against the single-layer SAE t (a), paired.

    FVU (`mlsae.compare.compare_fvu`, on the per-context squared errors of `fvu_sums`, D
    fixed) and delta CE (`mlsae.compare.compare_means`, every context of `delta_ce_matrix`).
    ``keys``: the SAEs in the order of the matrices' rows. One row per (layer, metric) with
    ``layer``, ``metric`` and the comparison's fields; "b higher" means the MLSAE is worse.
    """
    b = keys.index(mlsae_key)
    rows = []
    for j, layer in enumerate(layers):
        a = keys.index(layer)
        col = slice(j, j + 1)
        if fvu["sse"].shape[1] > 1:
            res = compare_fvu(
                fvu["sse"][a][:, col],
                fvu["sse"][b][:, col],
                fvu["n_tokens"],
                fvu["denominator"][col],
                n_boot,
            )
            rows.append({"layer": layer, "metric": "fvu", **res})
        sums, counts = ce["delta_ce_sum"], ce["n_pred"]
        res = compare_means(
            sums[a][:, col], counts[a][:, col], sums[b][:, col], counts[b][:, col], n_boot
        )
        rows.append({"layer": layer, "metric": "delta_ce", **res})
    return rows
