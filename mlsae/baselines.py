"""Single-layer SAE baselines: one SAE per layer, evaluated at every baseline layer.

Each baseline has the size (expansion factor, k) and token budget of one MLSAE sweep entry but
trains on one layer's vectors only (so on ``n_layers`` times fewer vectors). Entry ``[t, e]`` of
each matrix is the SAE trained at layer ``t`` evaluated on layer ``e``; the diagonal is the usual
single-layer SAE, to be compared with the MLSAE at the same layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer

from mlsae.activations import ActivationCache, residual_stream, take_tokens
from mlsae.patching import delta_ce_kl
from mlsae.reconstruction import ReconstructionStats
from mlsae.sae import MLSAE


@torch.no_grad()
def fvu_matrix(
    saes: dict[int, MLSAE], cache: ActivationCache, layers: list[int], max_tokens: int
) -> torch.Tensor:
    """``(train layer, eval layer)`` FVU of each SAE on cached held-out residuals."""
    stats = {t: ReconstructionStats(len(layers), cache.d_model, saes[t].n_latents) for t in saes}
    for batch in take_tokens(cache.iter_batches(1024, layers=layers), max_tokens):
        for t, sae in saes.items():  # batch: (eval layer, token, d)
            out = sae(batch)
            stats[t].update(batch, out.recons, out.values)
    return torch.tensor([stats[t].compute()["fvu"] for t in saes])


@torch.no_grad()
def delta_ce_matrix(
    saes: dict[int, MLSAE],
    model: HookedTransformer,
    tokens: torch.Tensor,
    layers: list[int],
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(train layer, eval layer)`` delta CE and KL (per predicted token) on ``tokens``.

    Returns ``(delta_ce, kl, n)``, ``n`` the predictions averaged over (positions whose input or
    target is a special token excluded, as in `mlsae.patching.delta_ce_kl`). ``bf16``: the
    forwards under bfloat16 autocast (`mlsae.patching.delta_ce_kl`).
    """
    resid = residual_stream(model, tokens)
    d_ce = torch.zeros(len(saes), len(layers), dtype=torch.float64)
    kl = torch.zeros_like(d_ce)
    n = 0
    for i, sae in enumerate(saes.values()):
        reconstruct: Callable = lambda x, layer, sae=sae: sae(x).recons  # noqa: E731
        res = delta_ce_kl(model, tokens, reconstruct, layers, resid, bf16=bf16)
        d_ce[i] = res["delta_ce"][layers] / res["n"]
        kl[i] = res["kl"][layers] / res["n"]
        n = int(res["n"])
    return d_ce, kl, n
