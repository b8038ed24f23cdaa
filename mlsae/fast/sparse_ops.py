r"""The TopK SAE's sparse products as ``torch.library`` custom ops: decoder gather, segment sums.

With ``k`` latents chosen per vector, the forward decode and all three sparse gradients are
products over the *entries* ``(vector i, slot j)`` of the selection, each entry naming a latent
``n = idx[i, j]``, a value ``v = values[i, j]``, a row ``r`` of the upstream gradient ``G`` and a
row ``q`` of the encoder input ``X`` (``X = s(x) - b_pre``):

.. math::

    \text{decode:}\quad y_i = \sum_j v_{ij} W_{dec}[idx_{ij}]

    \text{value gradient:}\quad gv_e = \langle G_{r_e}, W_{dec}[n_e] \rangle \cdot [v_e > 0]

    \nabla W_{dec}[n] = \sum_{e: n_e = n} v_e G_{r_e}, \qquad
    \nabla W_{enc}[n] = \sum_{e: n_e = n} gv_e X_{q_e}, \qquad s_n = \sum_{e: n_e = n} gv_e

(the ``[v > 0]`` factor is the ReLU's gradient; ``s`` gives ``b_pre``'s encoder-side gradient as
``-(s @ W_enc)`` without forming the ``(vectors, d)`` input gradient). `sort_entries` sorts the
entries by latent once; `segment_grads` then walks each latent's run of entries and produces all
four outputs in one pass, with no atomics: one latent's run belongs to one program. Main and AuxK
entries go through the same sort (their ``r`` point into the stacked upstream gradients).

CPU tensors take the reference implementations here (``embedding_bag`` and ``index_add_``);
CUDA tensors take the Triton kernels of `mlsae.fast.kernels` (dispatch is by device, so a CPU
tensor never reaches a Triton kernel just because triton imports).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # Triton for CUDA tensors; without it CUDA tensors take the torch references too
    from mlsae.fast import kernels
except ImportError:
    kernels = None

CHUNK_ENTRIES = 1 << 16
"""Entries per block of the CPU reference (bounds its ``(entries, d)`` temporaries)."""


class SortedEntries(NamedTuple):
    """Selection entries sorted by latent (all int64, on the entries' device)."""

    latent: torch.Tensor
    """``(E,)`` latent of each entry, ascending."""
    offsets: torch.Tensor
    """``(n_latents + 1,)``: latent ``n``'s entries are ``offsets[n]:offsets[n + 1]``."""
    grad_row: torch.Tensor
    """``(E,)`` row of the upstream gradient ``G`` each entry reads."""
    input_row: torch.Tensor
    """``(E,)`` row of the encoder input ``X`` each entry reads."""
    order: torch.Tensor
    """``(E,)`` position of each sorted entry in the concatenated, unsorted entries."""


def sort_entries(index_sets: list[torch.Tensor], n_latents: int) -> SortedEntries:
    """Sort the entries of one or more ``(vectors, k_s)`` index sets by latent, once.

    Set ``s``'s entry ``(i, j)`` reads upstream-gradient row ``s * vectors + i`` (the sets'
    gradients stacked in order) and input row ``i``. No host synchronisation: the run
    boundaries come from ``searchsorted``, not from a count read back.
    """
    vectors = index_sets[0].shape[0]
    latent = torch.cat([idx.reshape(-1) for idx in index_sets])
    rows = torch.cat(
        [
            torch.arange(vectors, device=idx.device).repeat_interleave(idx.shape[1]) + s * vectors
            for s, idx in enumerate(index_sets)
        ]
    )
    latent, order = torch.sort(latent, stable=True)
    grad_row = rows[order]
    boundaries = torch.arange(n_latents + 1, device=latent.device, dtype=latent.dtype)
    offsets = torch.searchsorted(latent, boundaries)
    return SortedEntries(latent, offsets, grad_row, grad_row % vectors, order)


# -- decode --------------------------------------------------------------------------------------
@torch.library.custom_op("mlsae::decode", mutates_args=())
def decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(vectors, d)``: each vector's sum of ``values[i, j] * weight[indices[i, j]]``."""
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


@decode.register_fake
def _(indices, values, weight):
    return weight.new_empty(indices.shape[0], weight.shape[1])


if kernels is not None:

    @decode.register_kernel("cuda")
    def _(indices, values, weight):
        return kernels.decode(indices, values, weight)


# -- the three sparse gradients ------------------------------------------------------------------
@torch.library.custom_op("mlsae::segment_grads", mutates_args=())
def segment_grads(
    latent: torch.Tensor,
    offsets: torch.Tensor,
    grad_row: torch.Tensor,
    input_row: torch.Tensor,
    values: torch.Tensor,
    grad: torch.Tensor,
    inputs: torch.Tensor,
    w_dec: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad W_dec, grad W_enc, s, gv)`` from the sorted entries (see the module docstring).

    Args:
        latent: ``(E,)`` a `SortedEntries`' latents (ascending).
        offsets: ``(n_latents + 1,)`` its run boundaries.
        grad_row: ``(E,)`` its upstream-gradient rows.
        input_row: ``(E,)`` its input rows.
        values: ``(E,)`` each sorted entry's latent value (after the ReLU).
        grad: ``(rows, d)`` upstream gradients of the decoded vectors, sets stacked.
        inputs: ``(vectors, d)`` encoder inputs ``s(x) - b_pre``.
        w_dec: ``(n_latents, d)`` decoder rows.

    Returns:
        ``(n_latents, d)``, ``(n_latents, d)``, ``(n_latents,)`` and ``(E,)`` (in sorted order),
        float32.
    """
    n, d = w_dec.shape
    g_dec = torch.zeros(n, d, dtype=torch.float32, device=w_dec.device)
    g_enc = torch.zeros_like(g_dec)
    s = torch.zeros(n, dtype=torch.float32, device=w_dec.device)
    gv = torch.empty(latent.shape[0], dtype=torch.float32, device=w_dec.device)
    for a in range(0, latent.shape[0], CHUNK_ENTRIES):
        sl = slice(a, a + CHUNK_ENTRIES)
        lat, v = latent[sl], values[sl].float()
        g = grad[grad_row[sl]].float()
        dot = (g * w_dec[lat].float()).sum(-1) * (v > 0)
        gv[sl] = dot
        g_dec.index_add_(0, lat, v[:, None] * g)
        g_enc.index_add_(0, lat, dot[:, None] * inputs[input_row[sl]].float())
        s.index_add_(0, lat, dot)
    return g_dec, g_enc, s, gv


@segment_grads.register_fake
def _(latent, offsets, grad_row, input_row, values, grad, inputs, w_dec):
    n, d = w_dec.shape
    f32 = dict(dtype=torch.float32, device=w_dec.device)
    return (
        torch.empty(n, d, **f32),
        torch.empty(n, d, **f32),
        torch.empty(n, **f32),
        torch.empty(latent.shape[0], **f32),
    )


if kernels is not None:

    @segment_grads.register_kernel("cuda")
    def _(latent, offsets, grad_row, input_row, values, grad, inputs, w_dec):
        return kernels.segment_grads(
            latent, offsets, grad_row, input_row, values, grad, inputs, w_dec
        )


def sorted_values(entries: SortedEntries, value_sets: list[torch.Tensor]) -> torch.Tensor:
    """``(E,)`` the values of the concatenated sets, in ``entries``' sorted order."""
    return torch.cat([v.reshape(-1) for v in value_sets])[entries.order]
