r"""The original code's delta CE for an MLSAE trained through a tuned lens (NOTES.md defect 9).

What tim-lawson/mlsae computes (``mlsae/model/lightning.py``, snapshot of 2024-10-02):
``MLSAETransformer.test_step`` (lines 379-416) runs
``inputs = self.forward_lens(self.transformer.forward(tokens))``, encodes and decodes ``inputs``,
``recons = self.inverse_lens(recons)``, then ``self.forward_at_layer(inputs, recons, tokens)``
(lines 342-359) sets ``loss_true[layer]`` to the CE of the model run on from ``inputs[layer]``
and ``loss_pred[layer]`` from ``recons[layer]``; ``LayerwiseLossDelta``
(``mlsae/metrics/layerwise_loss_delta.py``) reports ``loss_pred - loss_true``. ``forward_lens``
(lines 287-295) overwrites ``inputs[layer]`` in place with ``lens.transform_hidden(x, layer)`` =
x + W x + b, so ``loss_true`` is the model run on from the *lens-transformed* residuals, not the
clean model; ``inverse_lens`` (lines 297-305) uses ``create_untransform_hidden`` (lines 74-89),
``einsum(inv, h - bias, "n n, b p n -> b p n")``, which keeps only the diagonal of
:math:`(I + W)^{-1}` (defect 1). ``Transformer.forward_at_layer`` (``mlsae/model/transformer.py``)
runs the blocks after ``start_at_layer``, the final norm and the unembedding.

So, at layer l, with T the lens transform, R the SAE's reconstruction in lens space and D the
diagonal-only inverse :math:`D(y) = (y - b) \odot \mathrm{diag}((I + W)^{-1})`:

.. math::

    \Delta_{paper}(l) = CE(\text{run on from } D(R(T x_l))) - CE(\text{run on from } T x_l)

and the shift of its baseline, :math:`CE(\text{run on from } T x_l) - CE_{clean}`. With the exact
inverse (``diagonal=False``) :math:`\Delta_{paper} + \text{shift}` is our delta CE of
`mlsae.patching.delta_ce_kl` (tested). Conventions are ours otherwise: only non-special positions
are transformed and replaced, and the mean is over predictions made at them (the original zeroed
special positions at every layer, then transformed and replaced them too, and averaged over all
positions); the translator of block l's output is l + 1 (`mlsae.lens.TunedLens`; the original's
l is defect 2), the space the SAE was trained in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformer_lens import HookedTransformer

from mlsae.activations import special_mask
from mlsae.distributions import ROWS
from mlsae.lens import TunedLens
from mlsae.models import special_token_ids
from mlsae.patching import patched_logits, prepare, selected_rows


@torch.no_grad()
def diagonal_inverse(lens: TunedLens, y: torch.Tensor, layer: int) -> torch.Tensor:
    """The original's inverse of block ``layer``'s lens map: ``(y - b) * diag((I + W)^{-1})``."""
    i = lens.translator_index(layer)
    if i is None:
        return y
    t = lens.translators[i]
    eye = torch.eye(lens.d_model, dtype=torch.float64, device=y.device)
    diag = torch.linalg.inv(eye + t.weight.detach().double()).diagonal()
    return ((y.double() - t.bias.detach().double()) * diag).to(y.dtype)


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``(batch, pos - 1)`` float64 CE of ``tokens[:, 1:]`` under ``logits[:, :-1]``, by blocks."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = tokens[:, 1:].reshape(-1, 1).to(z.device)
    out = torch.empty(z.shape[0], dtype=torch.float64, device=z.device)
    for lo in range(0, z.shape[0], ROWS):
        block = z[lo : lo + ROWS].double()
        out[lo : lo + ROWS] = block.logsumexp(-1) - block.gather(-1, target[lo : lo + ROWS])[:, 0]
    return out.view(tokens.shape[0], -1)


@torch.no_grad()
def delta_ce_paper(
    model: HookedTransformer,
    tokens: torch.Tensor,
    reconstruct_lens: Callable[[torch.Tensor, int], torch.Tensor],
    lens: TunedLens,
    layers: Iterable[int] | None = None,
    resid: torch.Tensor | None = None,
    rows: Callable[[int], torch.Tensor] | None = None,
    diagonal: bool = True,
    bf16: bool = False,
) -> dict[str, torch.Tensor]:
    r"""Per-layer sums of the original's lens delta CE (module docstring) over one token batch.

    Args:
        model: the language model.
        tokens: ``(batch, pos)`` token ids.
        reconstruct_lens: ``(token, d)`` lens-space vectors of one layer -> their lens-space
            reconstruction (e.g. ``lambda y, layer: sae(y).recons``).
        lens: the lens the SAE was trained through.
        layers: layers to patch (default all).
        resid: ``(layer, batch, pos, d)`` residuals of ``tokens`` if already computed.
        rows: batch rows to patch at a layer (as `mlsae.patching.delta_ce_kl`); None: all.
        diagonal: the original's diagonal-only inverse (False: the exact inverse).
        bf16: run the forwards under bfloat16 autocast.

    Returns:
        float64 sums over scored predictions: ``"delta_ce"`` ``(layer,)`` (of
        :math:`\Delta_{paper}`), ``"baseline_shift"`` ``(layer,)`` (of CE from T x minus clean
        CE), ``"n_layer"`` ``(layer,)`` (predictions counted per layer), ``"n"``; per context
        ``"delta_ce_rows"``, ``"baseline_shift_rows"``, ``"n_layer_rows"`` ``(layer, batch)`` and
        ``"n_rows"`` ``(batch,)``.
    """
    n_layers = model.cfg.n_layers
    layers, tokens, resid, autocast = prepare(model, tokens, layers, resid, bf16)
    with autocast:
        clean_ce = next_token_ce(patched_logits(model, resid[-1], n_layers - 1), tokens)
    keep = ~special_mask(tokens, special_token_ids(model))
    scored = keep[:, :-1]
    batch = tokens.shape[0]
    n_rows = scored.sum(-1).double().cpu()
    sums = {k: torch.zeros(n_layers, batch, dtype=torch.float64) for k in ("d", "shift", "n")}
    for layer in layers:
        sel, dev = selected_rows(rows, layer, batch, tokens.device)
        if not len(sel):
            continue
        k = keep[dev]
        x = resid[layer][dev]
        y = lens.transform(x[k], layer)
        rec = reconstruct_lens(y, layer)
        back = diagonal_inverse(lens, rec, layer) if diagonal else lens.invert(rec, layer)
        base, patched = x.clone(), x.clone()
        base[k], patched[k] = y.to(x.dtype), back.to(x.dtype)
        with autocast:
            ce_base = next_token_ce(patched_logits(model, base, layer), tokens[dev])
            ce_patched = next_token_ce(patched_logits(model, patched, layer), tokens[dev])
        mask = scored[dev]
        sums["d"][layer, sel] = torch.where(mask, ce_patched - ce_base, 0).sum(-1).cpu()
        sums["shift"][layer, sel] = torch.where(mask, ce_base - clean_ce[dev], 0).sum(-1).cpu()
        sums["n"][layer, sel] = n_rows[sel]
    return {
        "delta_ce": sums["d"].sum(1),
        "baseline_shift": sums["shift"].sum(1),
        "n_layer": sums["n"].sum(1),
        "n": n_rows.sum(),
        "delta_ce_rows": sums["d"],
        "baseline_shift_rows": sums["shift"],
        "n_layer_rows": sums["n"],
        "n_rows": n_rows,
    }
