r"""Standard errors by bootstrap over held-out contexts.

Tokens of one context are correlated, so the unit of resampling is the context: every metric is
accumulated as per-context sums, and one bootstrap replicate draws the contexts with replacement
(multinomial counts :math:`w_c`, ``n_boot`` replicates, seeded) and recomputes the metric from
the weighted sums. The standard error is the standard deviation of the replicates (ddof = 1).

* A mean over predictions (delta CE, KL) at layer l: :math:`\sum_c w_c s_{cl} / \sum_c w_c
  n_{cl}`, with :math:`n_{cl}` the predictions of context c patched at layer l (0 where the
  stride design, `mlsae.patching.stride_mask`, leaves the pair out).
* Under a design that patches different contexts at different layers the resampling is
  stratified (`weights` with ``strata``, `design_strata`): the contexts of each pattern of
  patched layers are resampled among themselves, so every replicate has as many contexts at
  each layer as the design (no replicate leaves a layer empty); one stratum is the plain
  bootstrap above.
* FVU at a layer: :math:`\sum_c w_c E_c / (\sum_c w_c Q_c - \|\sum_c w_c S_c\|^2 / \sum_c w_c
  N_c)` with, per context, :math:`E_c` the summed squared error, :math:`Q_c = \sum_t \|x_t\|^2`,
  :math:`S_c = \sum_t x_t` and :math:`N_c` its token count: the per-dimension mean is
  re-estimated in each replicate, so the replicate is exactly the FVU of the resampled set:
  `mlsae.reconstruction.fvu_from_sums` of the weighted sums, the evaluation's own definition.

The mean over layers is resampled jointly (the same contexts at every layer), so its standard
error accounts for the correlation between layers.
"""

from __future__ import annotations

import torch

from mlsae.reconstruction import fvu_from_sums

N_BOOT = 1000


def weights(
    n_units: int, n_boot: int = N_BOOT, seed: int = 0, strata: torch.Tensor | None = None
) -> torch.Tensor:
    """``(n_boot, n_units)`` float64 multinomial counts: each row resamples the units.

    ``strata`` ``(unit,)``: resample within each stratum (its units drawn with replacement as
    many times as it has units), in increasing stratum order from one generator. None: one
    stratum, the plain bootstrap (the same draws as before strata existed).
    """
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(n_boot, n_units, dtype=torch.float64)
    groups = [torch.arange(n_units)] if strata is None else _groups(strata)
    for members in groups:
        draws = members[torch.randint(len(members), (n_boot, len(members)), generator=generator)]
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return counts


def _groups(strata: torch.Tensor) -> list[torch.Tensor]:
    strata = torch.as_tensor(strata).long()
    return [torch.nonzero(strata == s).flatten() for s in torch.unique(strata)]


def design_strata(patched: torch.Tensor) -> torch.Tensor:
    """``(unit,)`` stratum of each unit: which distinct row of ``patched`` it has.

    ``patched`` ``(unit, layer)`` bool: the layers each unit was measured at.
    """
    return torch.unique(patched.bool(), dim=0, return_inverse=True)[1]


def mean_replicates(sums: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Replicates ``(n_boot, layer)`` of ``sum sums / sum counts`` at each layer.

    Args:
        sums: ``(unit, layer)`` per-context sums of the quantity.
        counts: ``(unit,)`` per-context numbers of terms (the same at every layer), or
            ``(unit, layer)`` per (context, layer) (0 where the pair was not measured).
        w: `weights` ``(n_boot, unit)``.
    """
    w, counts = w.double(), counts.double()
    denom = w @ counts
    return (w @ sums.double()) / (denom[:, None] if counts.ndim == 1 else denom)


def fvu_replicates(
    sse: torch.Tensor, sq: torch.Tensor, sum_x: torch.Tensor, n: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Replicates ``(n_boot, layer)`` of the FVU (module docstring).

    The arguments are `mlsae.reconstruction.ReconstructionStats.group_sums`.

    Args:
        sse: ``(unit, layer)`` summed squared reconstruction errors.
        sq: ``(unit, layer)`` summed squared norms of the inputs.
        sum_x: ``(unit, layer, d)`` summed inputs.
        n: ``(unit,)`` tokens per unit.
        w: `weights` ``(n_boot, unit)``.
    """
    w = w.double()
    total_n = w @ n.double()  # (boot,)
    s = torch.einsum("bu,uld->bld", w, sum_x.double())  # (boot, layer, d)
    return fvu_from_sums(w @ sse.double(), w @ sq.double(), s, total_n[:, None])


def standard_errors(replicates: torch.Tensor) -> tuple[list[float], float]:
    """``(per-layer SE, SE of the mean over layers)`` of ``(n_boot, layer)`` replicates."""
    return replicates.std(0).tolist(), replicates.mean(1).std().item()
