r"""Reconstruction metrics of an SAE: the two FVU definitions, L0 and L1, accumulated in float64.

* FVU at layer l (``fvu``, ours, Gao et al.'s normalised MSE):
  :math:`\sum_t \|x_t - \hat x_t\|^2 / \sum_t \|x_t - \bar x\|^2`, with :math:`\bar x` the
  per-dimension mean over the evaluation tokens. As a function of sums over the tokens
  (`fvu_from_sums`): :math:`E / (Q - \|S\|^2 / N)` with :math:`E` the summed squared error,
  :math:`Q = \sum_t \|x_t\|^2`, :math:`S = \sum_t x_t` and :math:`N` the token count, so the
  evaluation and its bootstrap (`mlsae.bootstrap`, weighted sums) share one definition.
* ``fvu_paper``, the original code's FVU (tim-lawson/mlsae, ``mlsae/metrics/layerwise_fvu.py``,
  ``LayerwiseFVU``): per evaluation batch b, the mean squared error over every entry of the
  layer's ``(token, d)`` block, :math:`m_b = \mathrm{mean}_{t,j} (x_{tj} - \hat x_{tj})^2`, and
  the unbiased variance of all those entries around *one scalar* mean,
  :math:`v_b = \mathrm{var}_{t,j}(x_{tj})` (`paper_batch_terms`); FVU = :math:`\sum_b m_b /
  \sum_b v_b` (`fvu_paper_from_sums`). Where the residual stream has large per-dimension offsets
  the scalar-mean variance is much larger than ours, so ``fvu_paper`` < ``fvu``.
* L0: mean number of nonzero latents per vector. L1: mean sum of latent activations per vector
  (the paper's Table 1 "L1 norm").

The SAE's training loss (`mlsae.sae.fvu`) is our definition fused for one batch; it stays in the
training code, which imports no evaluation module (a test holds the two equal).
"""

from __future__ import annotations

import torch


def fvu_from_sums(
    sse: torch.Tensor, sum_sq: torch.Tensor, sum_x: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    r"""Our FVU from sums over a token set: :math:`E / (Q - \|S\|^2 / N)` (module docstring).

    Args:
        sse: ``(..., layer)`` summed squared reconstruction errors :math:`E`.
        sum_sq: ``(..., layer)`` summed squared norms of the inputs :math:`Q`.
        sum_x: ``(..., layer, d)`` summed inputs :math:`S`.
        n: token counts :math:`N`, broadcastable to ``(..., layer)``.

    Returns:
        ``(..., layer)`` FVU.
    """
    total = sum_sq - sum_x.pow(2).sum(-1) / n
    return sse / total


def paper_batch_terms(sq_err: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's per-batch terms ``(m_b, v_b)``, each ``(layer,)`` (module docstring).

    Args:
        sq_err: ``(layer, token, d)`` squared reconstruction errors.
        x: ``(layer, token, d)`` inputs.
    """
    return sq_err.mean((1, 2)), x.flatten(1).var(1)


def fvu_paper_from_sums(sum_mse: torch.Tensor, sum_var: torch.Tensor) -> torch.Tensor:
    r"""The original's FVU :math:`\sum_b m_b / \sum_b v_b` from the sums of `paper_batch_terms`."""
    return sum_mse / sum_var


class ReconstructionStats:
    """Streaming per-layer FVU, L0, L1 and latent-firing statistics, in float64.

    Feed batches with `update(x, recons, values)`, shapes ``(layer, token, d)`` and
    ``(layer, token, k)``; read the results with `compute()`.
    """

    def __init__(self, n_layers: int, d_model: int, n_latents: int):
        f64 = torch.float64
        self.batch_mse = torch.zeros(n_layers, dtype=f64)  # sum over batches (fvu_paper)
        self.batch_var = torch.zeros(n_layers, dtype=f64)
        self.groups: list[tuple[torch.Tensor, ...]] = []  # per-context sums (bootstrap)
        self.n = torch.zeros(n_layers, dtype=f64)
        self.sum_x = torch.zeros(n_layers, d_model, dtype=f64)
        self.sum_x2 = torch.zeros(n_layers, dtype=f64)
        self.sse = torch.zeros(n_layers, dtype=f64)
        self.l0 = torch.zeros(n_layers, dtype=f64)
        self.l1 = torch.zeros(n_layers, dtype=f64)
        self.fired = torch.zeros(n_layers, n_latents, dtype=torch.bool)

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        recons: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: x and recons `(layer, token, d)`, values and indices `(layer, token, k)`.

        ``groups`` ``(token,)``: each token's context, for `group_sums`.
        """
        x, recons, values = x.double().cpu(), recons.double().cpu(), values.double().cpu()
        err = (x - recons).pow(2)
        self.n += x.shape[1]
        self.sum_x += x.sum(1)
        self.sum_x2 += x.pow(2).sum((1, 2))
        self.sse += err.sum((1, 2))
        batch_mse, batch_var = paper_batch_terms(err, x)
        self.batch_mse += batch_mse
        self.batch_var += batch_var
        if groups is not None:
            ids, inverse = torch.unique(groups.cpu(), return_inverse=True)
            per = [
                torch.zeros(len(ids), *shape, dtype=torch.float64).index_add_(0, inverse, v)
                for shape, v in (
                    ((x.shape[0],), err.sum(2).T),
                    ((x.shape[0],), x.pow(2).sum(2).T),
                    ((x.shape[0], x.shape[2]), x.transpose(0, 1)),
                    ((), torch.ones(x.shape[1], dtype=torch.float64)),
                )
            ]
            self.groups.append((ids, *per))
        self.l0 += (values > 0).sum((1, 2)).double()
        self.l1 += values.sum((1, 2))
        if indices is not None:
            active = (values > 0).cpu()
            for layer in range(x.shape[0]):
                self.fired[layer, indices[layer].cpu()[active[layer]]] = True

    def compute(self) -> dict[str, list[float]]:
        """Per-layer ``fvu``, ``fvu_paper``, ``l0``, ``l1`` and ``inactive_fraction``.

        ``inactive_fraction``: latents that never fired at a layer.
        """
        return {
            "fvu": fvu_from_sums(self.sse, self.sum_x2, self.sum_x, self.n).tolist(),
            "fvu_paper": fvu_paper_from_sums(self.batch_mse, self.batch_var).tolist(),
            "l0": (self.l0 / self.n).tolist(),
            "l1": (self.l1 / self.n).tolist(),
            "inactive_fraction": (1 - self.fired.double().mean(-1)).tolist(),
        }

    def group_sums(self) -> tuple[torch.Tensor, ...] | None:
        """Per-context ``(sse, sum ||x||^2, sum x, n)`` for `mlsae.bootstrap.fvu_replicates`.

        Shapes ``(context, layer)``, ``(context, layer)``, ``(context, layer, d)``,
        ``(context,)``, contexts in increasing id order; None when no batch had ``groups``.
        """
        if not self.groups:
            return None
        ids = torch.cat([g[0] for g in self.groups])
        uniq, inverse = torch.unique(ids, return_inverse=True)
        out = []
        for j in range(1, 5):
            parts = torch.cat([g[j] for g in self.groups])
            out.append(
                torch.zeros(len(uniq), *parts.shape[1:], dtype=torch.float64).index_add_(
                    0, inverse, parts
                )
            )
        return tuple(out)
