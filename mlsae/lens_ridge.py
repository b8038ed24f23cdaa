r"""The ``ridge`` lens: per layer, the closed-form ridge map towards the identity.

For the output of block l (translator l + 1, `mlsae.lens.TunedLens`), X holds its rows at the
fitting tokens and Y the last block's output at the same tokens (what the model unembeds, as in
`mlsae.lens_training.regression_lens`). The map x -> x M + b minimises

.. math::  \|X M + \mathbf{1} b - Y\|_F^2 + \lambda \|M - I\|_F^2

(the bias unpenalised). With centred :math:`X_c = X - \mathbf{1}\bar x`,
:math:`Y_c = Y - \mathbf{1}\bar y`:

.. math::  M = (X_c^T X_c + \lambda I)^{-1} (X_c^T Y_c + \lambda I), \qquad b = \bar y - \bar x M

so the translator is W = (M - I)^T with bias b. As :math:`\lambda \to \infty`, M -> I (b -> the
mean shift :math:`\bar y - \bar x`); as :math:`\lambda \to 0`, the least-squares map. Per layer
:math:`\lambda = c\, \mathrm{tr}(X_c^T X_c) / d` for each c of ``lens.ridge_lambdas`` (units of the
Gram matrix's mean eigenvalue); the c with the lowest exact held-out KL (float64 logits, full
vocabulary, ``lens.heldout_tokens`` tokens of the training cache left out of the fit,
`mlsae.lens_training.heldout_split`) is kept, among those with cond(M) at most
``lens.ridge_max_condition`` (and below `mlsae.lens.MAX_CONDITION`, the inverse's limit): the SAE's
reconstruction errors come back through :math:`M^{-1}`, amplified by up to cond(M). Unconstrained,
held-out KL always prefers the smallest lambda (SmolLM2 / Brown: c = 0.001 at 24 of 29 layers,
cond(M) up to 1.3e5). Fitted on ``lens.ridge_tokens`` training tokens. Translator 0 (the
embeddings) stays the identity; the last block's output takes none.
"""

from __future__ import annotations

import math
import time

import torch
from transformer_lens import HookedTransformer

from mlsae import config
from mlsae.distributions import NextTokenDistribution
from mlsae.lens import MAX_CONDITION, TunedLens
from mlsae.lens_kl import Unembedder
from mlsae.lens_training import gather_tokens, heldout_split


def ridge_map(sxx: torch.Tensor, sxy: torch.Tensor, lam: float) -> torch.Tensor:
    """``M = (Sxx + lam I)^{-1} (Sxy + lam I)``, in float64 (``Sxx``, ``Sxy``: centred sums)."""
    eye = torch.eye(sxx.shape[-1], dtype=torch.float64, device=sxx.device)
    return torch.linalg.solve(sxx.double() + lam * eye, sxy.double() + lam * eye)


@torch.no_grad()
def ridge_stats(cache, idx: torch.Tensor, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """Centred sums of blocks 0 .. L-2's outputs (X) against the last block's output (Y).

    Over the tokens ``idx`` of ``cache``. Returns float64 ``{"n", "mx" (L-1, d), "my" (d,),
    "sxx" (L-1, d, d) = X_c^T X_c, "sxy" (L-1, d, d) = X_c^T Y_c}``. Products are taken in
    float32 on data shifted by the first chunk's means (so nothing large cancels) and summed in
    float64.
    """
    shift_x = shift_y = None
    n, s1x, s1y, sxx, sxy = 0, 0.0, 0.0, 0.0, 0.0
    for lo in range(0, len(idx), chunk):
        acts = gather_tokens(cache, idx[lo : lo + chunk])[0]
        x, y = acts[:-1], acts[-1]
        if shift_x is None:
            shift_x, shift_y = x.mean(1, keepdim=True), y.mean(0, keepdim=True)
        x, y = x - shift_x, y - shift_y
        n += y.shape[0]
        s1x = s1x + x.sum(1).double()
        s1y = s1y + y.sum(0).double()
        sxx = sxx + (x.transpose(1, 2) @ x).double()
        sxy = sxy + (x.transpose(1, 2) @ y).double()
    mx, my = s1x / n, s1y / n
    return {
        "n": torch.tensor(n),
        "mx": mx + shift_x[:, 0].double(),
        "my": my + shift_y[0].double(),
        "sxx": sxx - n * mx[:, :, None] * mx[:, None, :],
        "sxy": sxy - n * mx[:, :, None] * my[None, None, :],
    }


@torch.no_grad()
def ridge_lens(
    model: HookedTransformer, cache, settings: config.Lens | None = None, *, seed: int = 0
) -> tuple[TunedLens, dict]:
    """Fit the ``ridge`` lens (module docstring) on training cache ``cache``.

    Returns:
        ``(lens, record)``: the lens (eval mode) and ``{"lambda"`` (chosen c per block output
        0 .. L-2), ``"grid"`` (the c tried), ``"heldout_kl"`` (per block output, per c; NaN where
        cond(M) was too large, and not computed), ``"cond"`` (cond(M) chosen), ``"cond_grid"``
        (per c), ``"n_fit"``, ``"n_heldout"``, ``"seconds"}``.
    """
    s = config.Lens() if settings is None else settings
    start = time.time()
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    heldout, rest = heldout_split(cache.n_tokens, s.heldout_tokens, seed)
    fit = rest[: s.ridge_tokens]
    if len(fit) < 2 * d:
        raise ValueError(f"ridge_lens needs at least {2 * d} fitting tokens, has {len(fit)}.")
    st = ridge_stats(cache, fit)
    held = gather_tokens(cache, heldout)[0].to(model.cfg.device)
    unembed = Unembedder(model, out_dtype=torch.float64)
    final = NextTokenDistribution(unembed(held[-1]), rows=None)
    lens = TunedLens(d, n_layers, model.cfg.model_name).to(model.cfg.device)
    record = {"lambda": [], "grid": list(s.ridge_lambdas), "heldout_kl": [], "cond": []}
    record["cond_grid"] = []
    cap = min(MAX_CONDITION, s.ridge_max_condition or MAX_CONDITION)
    for layer in range(n_layers - 1):
        scale = (st["sxx"][layer].diagonal().sum() / d).item()
        best, kls, conds = None, [], []
        for c in s.ridge_lambdas:
            m = ridge_map(st["sxx"][layer], st["sxy"][layer], c * scale)
            sv = torch.linalg.svdvals(m)
            conds.append((sv[0] / sv[-1]).item())
            if not conds[-1] <= cap:  # also NaN/inf
                kls.append(math.nan)
                continue
            b = st["my"] - st["mx"][layer] @ m
            h = (held[layer].double() @ m.to(held.device) + b.to(held.device)).float()
            kls.append(final.kl(unembed(h)).mean().item())
            if best is None or kls[-1] < best[0]:
                best = (kls[-1], c, m, b)
        if best is None:
            raise ValueError(
                f"ridge_lens: at block {layer} every lambda gives cond(M) > {cap:.3g} "
                f"({[f'{x:.3g}' for x in conds]}); add larger lens.ridge_lambdas."
            )
        _, c, m, b = best
        t = lens.translators[layer + 1]
        t.weight.copy_((m - torch.eye(d, dtype=torch.float64)).T.float())
        t.bias.copy_(b.float())
        record["lambda"].append(c)
        record["heldout_kl"].append(kls)
        record["cond"].append(conds[s.ridge_lambdas.index(c)])
        record["cond_grid"].append(conds)
    record |= {"n_fit": len(fit), "n_heldout": len(heldout), "seconds": time.time() - start}
    lens.clear_cache()
    return lens.eval(), record
