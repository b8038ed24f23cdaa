"""Sparse kernels of the TopK SAE (`mlsae.sae.MLSAE`): exact top-k and a sparse-gradient gather.

Both keep the SAE's cost proportional to the k selected latents where torch's dense versions are
not: `topk_rows` selects from ``parts`` column-block maxima first, `GatherDot` computes the chosen
pre-activations and sends their weight gradient only to the chosen encoder rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_rows(x: torch.Tensor, k: int, parts: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``x (rows, n)``, unsorted: ``(values, indices)``.

    On CPU, ``torch.topk`` over n = 4608 columns costs about a third of the selection matmul.
    Split the columns into ``n / parts`` strided groups ``{j, j + m, j + 2m, ...}`` (m = n / parts)
    and take each group's max with an elementwise max of the ``parts`` column blocks. Every
    element of the top-k lies in one of the k groups with the largest maxima (were its group not
    among them, k group maxima, k distinct elements, would all exceed it), so the top-k of the
    ``parts * k`` members of those groups is the top-k of the row. Ties at the k-th value may pick
    a different but equally valid index. Falls back to ``torch.topk`` where it would not pay.
    """
    rows, n = x.shape
    m = n // parts
    if x.device.type != "cpu" or n % parts or m < 4 * k:
        return x.topk(k, dim=-1, sorted=False)
    groups = x.reshape(rows, parts, m).amax(1).topk(k, dim=-1, sorted=False).indices  # (rows, k)
    offsets = torch.arange(0, n, m, device=x.device)[:, None]  # (parts, 1)
    members = (groups[:, None, :] + offsets).view(rows, parts * k)
    values, pos = x.gather(1, members).topk(k, dim=-1, sorted=False)
    return values, members.gather(1, pos)


CHUNK = 2048


class GatherDot(torch.autograd.Function):
    """``values[i, j] = <x[i], weight[indices[i, j]]>`` with sparse gradients.

    The encoder's top-k values as a function of the encoder rows actually selected: the weight
    gradient touches only those rows (a sparse ``(n_latents, vectors) @ (vectors, d)`` product)
    instead of back-propagating through a dense ``(vectors, n_latents)`` pre-activation matrix.
    """

    @staticmethod
    def forward(ctx, x, weight, indices, values=None):  # noqa: D102
        ctx.save_for_backward(x, weight, indices)
        if values is not None:  # already exact (selected in float32)
            return values
        out = x.new_empty(indices.shape)
        for s in range(0, x.shape[0], CHUNK):
            rows = weight[indices[s : s + CHUNK]]  # (chunk, k, d)
            out[s : s + CHUNK] = torch.bmm(rows, x[s : s + CHUNK, :, None]).squeeze(-1)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_w = None
        grad = grad.contiguous()
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
            sparse = torch.sparse_coo_tensor(
                torch.stack([indices.flatten(), rows]),
                grad.flatten(),
                (weight.shape[0], x.shape[0]),
                check_invariants=False,
            )
            grad_w = torch.sparse.mm(sparse, x)
        return grad_x, grad_w, None, None
