r"""Paired comparisons of two runs on the held-out contexts they share.

Two runs evaluated on the same contexts have correlated errors (a hard context is hard for both),
so the noise of their difference is not :math:`\sqrt{se_a^2 + se_b^2}`: every replicate here
resamples the contexts once (`mlsae.bootstrap.weights`) and applies the SAME weights
:math:`w_c` to both runs, and the standard error is that of the replicated difference b - a.

* delta CE, KL (`compare_means`): on the (context, layer) pairs patched in both runs (under
  strides s and s' = m s the pairs of the coarser design), run x's value is the mean over the
  layers L with a common pair of its per-layer means, :math:`\bar m_x = \frac1{|L|} \sum_{l \in
  L} \sum_c M_{cl} s^x_{cl} / \sum_c M_{cl} n^x_{cl}` (M: the common pairs); the replicate
  weights each context's sums by :math:`w_c`, stratified by the pattern of common layers of
  each context (`mlsae.bootstrap.design_strata`).
* FVU (`compare_fvu`): both runs reconstruct the same raw test vectors, so with :math:`E^x_{cl}`
  run x's summed squared error of context c at layer l, :math:`N_c` its tokens and :math:`D_l =
  \sum_t \|x_t - \bar x\|^2` the layer's total variance over all N evaluation tokens,
  :math:`FVU^x_l = \sum_c E^x_{cl} / D_l`. The replicate is :math:`(\sum_c w_c E^x_{cl} / \sum_c
  w_c N_c) / (D_l / N)`: the resampled mean squared error per token over the per-token variance,
  with D held FIXED at its full-sample value (the denominator is common to both runs, so it
  scales the difference but adds no noise to it; the noise of a difference is in the numerator,
  :math:`\sum_c w_c (E^b_{cl} - E^a_{cl})`). At :math:`w_c = 1` it is exactly :math:`FVU^b_l -
  FVU^a_l`.

`summarize` turns the replicates into: ``difference`` (b - a), ``se`` (paired bootstrap SE,
ddof 1), ``se_unpaired`` (:math:`\sqrt{var(a^*) + var(b^*)}`, the same replicates taken as if
independent: for the record), a 95% percentile interval ``ci_low``/``ci_high``, a two-sided
bootstrap p-value :math:`p = \min(1, 2 (1 + \min(\#\{d^* \le 0\}, \#\{d^* \ge 0\})) / (B + 1))`,
the minimal detectable difference at 80% power ``mde80`` :math:`= (z_{0.975} + z_{0.80})\, se =
2.80\, se` (the true difference a two-sided 5% test detects with probability 0.8 when the
estimate is normal with sd ``se``), and the ``verdict``: "b lower" / "b higher" when the interval
excludes 0, else "no detectable difference".
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch

from mlsae.bootstrap import N_BOOT, design_strata, weights

MDE_FACTOR = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.80)
"""2.80: the minimal detectable difference at 80% power (two-sided 5%) in standard errors."""

CSV_COLUMNS = (
    "context", "layer", "patched", "n_pred", "delta_ce_sum", "kl_sum", "n_tokens", "sse", "sse_raw",
)  # fmt: skip
"""Columns of ``results/per_context/<name>.csv`` (`per_context_rows`)."""


def summarize(reps_a: torch.Tensor, reps_b: torch.Tensor, a: float, b: float) -> dict:
    """The comparison fields (module docstring) from paired ``(n_boot,)`` replicates of a and b.

    ``a``, ``b``: the full-sample values; replicates that are not finite are dropped.
    """
    ok = torch.isfinite(reps_a) & torch.isfinite(reps_b)
    reps_a, reps_b = reps_a[ok].double(), reps_b[ok].double()
    d = reps_b - reps_a
    n = len(d)
    se = d.std().item()
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    verdict = "b lower" if hi < 0 else "b higher" if lo > 0 else "no detectable difference"
    return {
        "a": a,
        "b": b,
        "difference": b - a,
        "se": se,
        "se_unpaired": (reps_a.var() + reps_b.var()).sqrt().item(),
        "ci_low": lo,
        "ci_high": hi,
        "p": min(1.0, 2 * (1 + tail) / (n + 1)),
        "mde80": MDE_FACTOR * se,
        "verdict": verdict,
        "n_boot": n,
    }


def _layer_means(sums: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(boot,)`` mean over layers of ``sum_c w_c sums / sum_c w_c counts``."""
    return ((w @ sums) / (w @ counts)).mean(-1)


def compare_means(
    sums_a: torch.Tensor,
    counts_a: torch.Tensor,
    sums_b: torch.Tensor,
    counts_b: torch.Tensor,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Paired comparison of a per-prediction mean (delta CE, KL): b - a (module docstring).

    Args:
        sums_a: ``(context, layer)`` summed values of run a.
        counts_a: ``(context, layer)`` predictions summed in ``sums_a`` (0 where not patched).
        sums_b: the same for run b, the same contexts in the same order.
        counts_b: the same for run b.
        n_boot: bootstrap replicates.
        seed: seed of the resampling (`mlsae.bootstrap.weights`).

    Returns:
        `summarize`'s fields with ``n_contexts`` (contexts with a common pair), ``n_pairs``
        (common (context, layer) pairs) and ``n_layers`` (layers with a common pair).
    """
    common = (counts_a > 0) & (counts_b > 0)
    if not common.any():
        raise ValueError("The two runs share no patched (context, layer) pair.")
    layers = common.any(0)
    units = common.any(1)
    m = common[units][:, layers].double()
    sa, na = sums_a[units][:, layers].double() * m, counts_a[units][:, layers].double() * m
    sb, nb = sums_b[units][:, layers].double() * m, counts_b[units][:, layers].double() * m
    one = torch.ones(1, int(units.sum()), dtype=torch.float64)
    w = weights(int(units.sum()), n_boot, seed, strata=design_strata(m.bool()))
    out = summarize(
        _layer_means(sa, na, w),
        _layer_means(sb, nb, w),
        _layer_means(sa, na, one).item(),
        _layer_means(sb, nb, one).item(),
    )
    n_pairs, n_layers = int(common.sum()), int(layers.sum())
    return out | {"n_contexts": int(units.sum()), "n_pairs": n_pairs, "n_layers": n_layers}


def compare_fvu(
    sse_a: torch.Tensor,
    sse_b: torch.Tensor,
    n_tokens: torch.Tensor,
    denominator: torch.Tensor,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict:
    """Paired comparison of FVU, mean over layers: b - a, D fixed (module docstring).

    Args:
        sse_a: ``(context, layer)`` summed squared errors of run a (rows with a NaN in either
            run are left out).
        sse_b: the same for run b, on the same raw vectors (contexts in the same order).
        n_tokens: ``(context,)`` tokens per context.
        denominator: ``(layer,)`` :math:`D_l` over all the evaluation tokens.
        n_boot: bootstrap replicates.
        seed: seed of the resampling (`mlsae.bootstrap.weights`).
    """
    ok = torch.isfinite(sse_a).all(1) & torch.isfinite(sse_b).all(1)
    sse_a, sse_b, n = sse_a[ok].double(), sse_b[ok].double(), n_tokens[ok].double()
    per_token = torch.as_tensor(denominator, dtype=torch.float64) / n.sum()

    def fvu(sse: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ((w @ sse) / (w @ n)[:, None] / per_token).mean(-1)

    w, one = weights(len(n), n_boot, seed), torch.ones(1, len(n), dtype=torch.float64)
    out = summarize(fvu(sse_a, w), fvu(sse_b, w), fvu(sse_a, one).item(), fvu(sse_b, one).item())
    return out | {"n_contexts": len(n), "n_layers": sse_a.shape[1]}


VERDICT_COLUMNS = (
    "metric", "a", "b", "difference", "se", "ci_low", "ci_high", "p", "mde80", "verdict",
    "se_unpaired",
)  # fmt: skip
"""The fields of a comparison shown in the notebooks' verdict tables (`verdict_table`)."""


def verdict_table(rows: list[dict], keys=("from", "to")) -> pd.DataFrame:
    """The comparison rows as a table: ``keys`` (those present) then `VERDICT_COLUMNS`."""
    df = pd.DataFrame(rows)
    return df[[c for c in (*keys, *VERDICT_COLUMNS) if c in df]] if len(df) else df


def per_context_rows(result: dict) -> list[dict]:
    """Rows of ``results/per_context/<name>.csv`` from `mlsae.metrics.evaluate`'s result.

    One row per (context, layer): ``patched`` (1 when delta CE was measured there), ``n_pred``,
    ``delta_ce_sum``, ``kl_sum``, the context's FVU ``n_tokens``, ``sse`` (the SAE's space) and
    ``sse_raw`` (raw space, empty for a run without a lens; empty ``sse``: no FVU token).
    """
    pc = result["per_context"]
    rows = []
    for i, context in enumerate(pc["context"]):
        for j, layer in enumerate(pc["layers"]):
            n_pred = pc["n_pred"][i][j]
            rows.append(
                {
                    "context": context,
                    "layer": layer,
                    "patched": int(n_pred > 0),
                    "n_pred": n_pred,
                    "delta_ce_sum": pc["delta_ce_sum"][i][j],
                    "kl_sum": pc["kl_sum"][i][j],
                    "n_tokens": pc["n_tokens"][i],
                    "sse": pc["sse"][i][j],
                    "sse_raw": None if pc["sse_raw"] is None else pc["sse_raw"][i][j],
                }
            )
    return rows


def read_per_context(path: str | Path) -> pd.DataFrame:
    """A per-context CSV (`per_context_rows`), its raw-space squared error as ``sse_raw_space``.

    That is ``sse_raw`` for a lens run and ``sse`` for a run without one.
    """
    df = pd.read_csv(path)
    lens = df["sse_raw"].notna().any()
    return df.assign(sse_raw_space=df["sse_raw"] if lens else df["sse"])


def _grid(df: pd.DataFrame, column: str, contexts, layers) -> torch.Tensor:
    table = df.pivot(index="context", columns="layer", values=column)
    return torch.tensor(table.reindex(index=contexts, columns=layers).to_numpy(np.float64))


def compare_runs(
    a: pd.DataFrame,
    b: pd.DataFrame,
    denominator_raw,
    metrics=("fvu_raw", "delta_ce", "kl"),
    n_boot: int = N_BOOT,
) -> dict:
    """``{metric: comparison}`` of run b against run a from their per-context tables.

    On the contexts and layers both tables have. ``fvu_raw``: `compare_fvu` of the raw-space
    squared errors with run a's raw ``denominator_raw`` (the same raw vectors for both runs;
    indexed by layer, as ``fvu_denominator["raw"]`` of a run over every layer);
    ``delta_ce``, ``kl``: `compare_means`. Each comparison has ``metric``.
    """
    contexts = sorted(set(a["context"]) & set(b["context"]))
    layers = sorted(set(a["layer"]) & set(b["layer"]))
    grid = {
        (name, col): _grid(df, col, contexts, layers)
        for name, df in (("a", a), ("b", b))
        for col in ("n_pred", "delta_ce_sum", "kl_sum", "sse_raw_space", "n_tokens")
    }
    out = {}
    for metric in metrics:
        if metric == "fvu_raw":
            n_tok = grid["a", "n_tokens"][:, 0]
            sse_a, sse_b = grid["a", "sse_raw_space"], grid["b", "sse_raw_space"]
            denom = torch.as_tensor(denominator_raw, dtype=torch.float64)
            res = compare_fvu(sse_a, sse_b, n_tok, denom[torch.tensor(layers)], n_boot)
        else:
            col = f"{metric}_sum"
            res = compare_means(
                grid["a", col], grid["a", "n_pred"], grid["b", col], grid["b", "n_pred"], n_boot
            )
        out[metric] = {"metric": metric, **res}
    return out
