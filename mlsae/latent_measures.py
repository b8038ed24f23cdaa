r"""Measures of multi-layer activity that do not saturate (section 4.2), with bootstrap CIs.

Notation of `mlsae.latents`: activations :math:`a_{t,l,i}`, totals :math:`s_{l,i}`, aggregated
distribution :math:`p_{l,i} = s_{l,i} / \sum_{l'} s_{l',i}`.

* Relative thresholds: :math:`n^{(x)}_i = \#\{l : p_{l,i} \ge x\}` for x = 1% and 5% of the
  latent's activation mass. Unlike a count threshold, it does not grow with the number of tokens
  once :math:`p_{\cdot,i}` is estimated.
* Effective number of layers :math:`\exp(H_i)`, 1 (one layer) to L (uniform).
* Mean layer standard deviation :math:`\mathrm{mean}_i \sigma_i`, the paper's sweep measure of
  multi-layer activity (tim-lawson/mlsae ``figures/dists_layer_std.py``: the mean over latents
  of ``Dists.layer_std`` of ``mlsae/analysis/dists.py``, the std of :math:`p_{\cdot,i}`).
* Ratio of variances: :math:`\mathrm{mean}_i \sigma^2_i / \mathrm{mean}_i v_i` over latents
  active on at least ``min_tokens`` tokens, :math:`v_i` the mean per-token variance.
* The original's variance ratio (``mlsae/analysis/variances.py``), with each context as one of
  its batches (its test loader's default ``batch_size`` is 1 context, ``mlsae/model/data.py``):
  :math:`A_c = \mathrm{mean}_i \mathrm{var}(q_{c,\cdot,i})`, :math:`q_{c,l,i} = \frac{1}{n_c}
  \sum_{t \in c} p_{t,l,i}`, :math:`B_c = \frac{1}{n_c F} \sum_{t \in c, i} v_{t,i}`, reported as
  :math:`1 / \mathrm{mean}_c (B_c / A_c)`. The weights :math:`q_{c,\cdot,i}` sum to the latent's
  firing rate :math:`f` (share of the context's tokens where it is active at some layer), not 1.
  With :math:`\mu, \sigma^2` the mean and variance of the normalised :math:`q / f` (a
  token-weighted aggregate) and layers numbered from b (0 in the original):

  .. math:: \mathrm{var}(q) = \sum_l (l + b)^2 q_l - (\sum_l (l + b) q_l)^2
            = f \sigma^2 + f (1 - f) (\mu + b)^2,

  so for a rare latent (f small) :math:`A_c` is about the second moment of the layer index about
  layer :math:`-b`: it depends on the depth of the model and on where numbering starts, while
  :math:`B_c` (variances of normalised per-token distributions) does not. We report b = 0 (the
  original) and b = 1.
* Single-layer pairs: of the (token, latent) pairs active at some layer, the share active at
  exactly one layer.

Bootstrap (`bootstrap_measures`): contexts (the units of `mlsae.latents.LayerStats`) are drawn
with replacement (`mlsae.bootstrap.weights`) and every measure is recomputed from the weighted
per-unit sums. The interval is the estimate +- 1.96 bootstrap standard errors, and ``bias`` is
the replicates' mean minus the estimate. Not the replicates' 2.5-97.5th percentiles: a replicate
repeats some contexts, so its latents see fewer distinct tokens, and plug-in measures of a
distribution (entropy, shares above a threshold, std) shift with the sample (on pure noise the
percentile interval of exp(H) misses the estimate altogether); ``bias`` shows the shift.
"""

from __future__ import annotations

import torch

from mlsae.bootstrap import weights as bootstrap_weights

Z95 = 1.959964
"""Standard normal 97.5th percentile."""
SHARES = (0.01, 0.05)
"""Shares of a latent's activation mass that make a layer count (relative thresholds)."""
MEASURES = (
    "layer_std_mean", "layers_ge1pct_mean", "layers_ge5pct_mean", "exp_entropy_mean",
    "ratio_of_variances", "paper_0based", "paper_1based", "frac_single_layer",
)  # fmt: skip
"""What `bootstrap_measures` returns, each ``{"value", "ci", "se", "bias"}``."""


def layer_distribution(totals: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Each latent's aggregated distribution over layers, and its mean, variance and entropy.

    The definitions of `mlsae.latents`: :math:`p_{l,i}`, :math:`\mu_i`, :math:`\sigma^2_i`,
    :math:`H_i` (nats). `LayerStats.compute` and the explorer both read them from here.

    Args:
        totals: ``(layer, latent)`` summed activations :math:`s_{l,i}`, float64.

    Returns:
        ``distribution`` ``(layer, latent)``; ``mass`` (:math:`\sum_l s_{l,i}`), ``mean_layer``,
        ``variance`` and ``entropy``, each ``(latent,)``. A latent that never fired (mass 0)
        gets zeros (not NaN: callers mask it, as `compute` does).
    """
    layers = torch.arange(totals.shape[0], dtype=torch.float64)[:, None]
    mass = totals.sum(0)
    p = totals / mass.clamp_min(1e-300)
    mean_layer = (layers * p).sum(0)
    return {
        "distribution": p,
        "mass": mass,
        "mean_layer": mean_layer,
        "variance": ((layers - mean_layer) ** 2 * p).sum(0),
        "entropy": -(p * torch.log(p.clamp_min(1e-300))).sum(0),
    }


def sum_measures(totals, token_var, token_count, min_tokens: int = 10) -> dict[str, torch.Tensor]:
    r"""Measures of replicated sums: ``totals`` ``(b, layer, latent)``, the others ``(b, latent)``.

    Returns ``(b,)`` tensors: ``layer_std_mean`` (:math:`\mathrm{mean}_i \sigma_i`),
    ``layers_ge{1,5}pct_mean`` (:math:`\mathrm{mean}_i n^{(x)}_i`), ``exp_entropy_mean``, means
    over latents with mass > 0, and ``ratio_of_variances`` (module docstring).
    """
    totals = totals.double()
    layers = torch.arange(totals.shape[1], dtype=torch.float64)[None, :, None]
    mass = totals.sum(1)
    alive = (mass > 0).double()
    p = totals / mass.clamp_min(1e-300)[:, None]
    mu = (layers * p).sum(1, keepdim=True)
    var = ((layers - mu) ** 2 * p).sum(1).clamp_min(0)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)

    def mean(x):
        return (x * alive).sum(1) / alive.sum(1)

    frequent = (token_count >= min_tokens).double()
    per_token = token_var / token_count.clamp_min(1)
    out = {"layer_std_mean": mean(var.sqrt()), "exp_entropy_mean": mean(entropy.exp())}
    for x in SHARES:
        out[f"layers_ge{x * 100:g}pct_mean"] = mean((p >= x).sum(1).double())
    out["ratio_of_variances"] = (var * frequent).sum(1) / (per_token * frequent).sum(1)
    return out


def paper_terms(share: torch.Tensor, tokens: torch.Tensor, token_var: torch.Tensor) -> dict:
    r"""Per-unit terms of the original's ratio (module docstring), each ``(unit,)``.

    Args:
        share: ``(unit, layer, latent)`` :math:`\sum_{t \in c} p_{t,l,i}`.
        tokens: ``(unit,)`` :math:`n_c`.
        token_var: ``(unit, latent)`` :math:`\sum_{t \in c} v_{t,i}`.

    Returns ``A0``, ``A1`` (:math:`A_c` with layers numbered from 0 and from 1), ``B``, and the
    decomposition's means over latents: ``spread`` (:math:`f\sigma^2`), ``location0`` and
    ``location1`` (:math:`f(1-f)(\mu+b)^2`), ``firing_rate`` (:math:`f`).
    """
    q = share.double() / tokens.clamp_min(1)[:, None, None]
    ell = torch.arange(q.shape[1], dtype=torch.float64)[None, :, None]
    f, m1, m2 = q.sum(1), (ell * q).sum(1), (ell**2 * q).sum(1)
    out = {"B": token_var.double().sum(1) / (tokens.clamp_min(1) * q.shape[2])}
    for b in (0, 1):
        out[f"A{b}"] = (m2 + 2 * b * m1 + b * b * f - (m1 + b * f) ** 2).mean(1)
    mu = m1 / f.clamp_min(1e-300)
    out["spread"] = (m2 - f * mu**2).mean(1)  # f sigma^2 = m2 - f mu^2
    for b in (0, 1):
        out[f"location{b}"] = (f * (1 - f) * (mu + b) ** 2).mean(1)
    out["firing_rate"] = f.mean(1)
    return out


def _paper_ratio(r: torch.Tensor, ok: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``1 / (weighted mean of B_c / A_c)`` over units with A_c > 0, per row of ``w``."""
    w = w * ok
    return w.sum(1) / (w @ r)


def _interval(values: torch.Tensor, point: float) -> dict:
    """``{"value", "ci", "se", "bias"}`` from bootstrap replicates (module docstring)."""
    v = values[torch.isfinite(values)].double()
    if len(v) < 2 or point is None:
        return {"value": point, "ci": None, "se": None, "bias": None}
    se = v.std().item()
    ci = [point - Z95 * se, point + Z95 * se]
    return {"value": point, "ci": ci, "se": se, "bias": v.mean().item() - point}


def activations_per_latent(stats, units: int | None = None) -> float:
    """Activations per latent over all tokens, or over the first ``units`` units."""
    if units is None:
        return stats.counts.sum().item() / stats.n_latents
    return stats.unit_counts[:units].double().sum().item() / stats.n_latents


def matched_units(stats, target: float) -> int:
    """The fewest first units whose activations per latent reach ``target`` (at least 1)."""
    per_unit = stats.unit_counts.double().sum((1, 2)) / stats.n_latents
    reached = torch.nonzero(per_unit.cumsum(0) >= target * (1 - 1e-9))
    return int(reached[0]) + 1 if len(reached) else len(per_unit)


@torch.no_grad()
def bootstrap_measures(
    stats,
    n_boot: int = 1000,
    seed: int = 0,
    units: int | None = None,
    min_tokens: int = 10,
    chunk: int = 20,
) -> dict[str, dict]:
    """`MEASURES` of ``stats`` (`mlsae.latents.LayerStats`), each ``{"value", "ci", "se", "bias"}``.

    Also ``decomposition`` (`paper_terms`, means over units) and ``n_units``. ``units`` None:
    every token; the point estimates of `sum_measures` come from the float64
    totals (as `LayerStats.compute`'s). An int: only the first ``units`` units (contexts), the
    replicates resampling those. Without per-unit sums (statistics saved without ``groups``),
    ``ci``, ``se`` and ``bias`` are None, and the per-context measures (the original's ratio,
    single-layer pairs) have value None too.
    """
    point = {}
    if units is None:
        point = sum_measures(stats.totals[None], stats.token_var_sum[None], stats.token_count[None])
        point = {k: v.item() for k, v in point.items()}
    if not stats.has_groups:
        return {k: _interval(torch.zeros(0), point.get(k)) for k in MEASURES}
    n = len(stats.unit_tokens) if units is None else min(units, len(stats.unit_tokens))
    sl = slice(0, n)
    totals, token_var = stats.unit_totals[sl].double(), stats.unit_token_var[sl]
    token_count = stats.unit_token_count[sl]
    terms = paper_terms(stats.unit_share[sl], stats.unit_tokens[sl], token_var)
    ok = {b: (terms[f"A{b}"] > 0).double() for b in (0, 1)}
    ratio = {b: torch.where(ok[b] > 0, terms["B"] / terms[f"A{b}"], 0.0) for b in (0, 1)}
    pairs, single = stats.unit_pairs[sl], stats.unit_single[sl]

    def measure(w: torch.Tensor) -> dict[str, torch.Tensor]:
        out = sum_measures(
            torch.einsum("bu,ulf->blf", w, totals), w @ token_var, w @ token_count, min_tokens
        )
        for b in (0, 1):
            out[f"paper_{b}based"] = _paper_ratio(ratio[b], ok[b], w)
        out["frac_single_layer"] = (w @ single) / (w @ pairs)
        return out

    ones = measure(torch.ones(1, n, dtype=torch.float64))
    point = {k: v.item() for k, v in ones.items()} | (point if units is None else {})
    w = bootstrap_weights(n, n_boot, seed)
    reps = [measure(w[i : i + chunk]) for i in range(0, n_boot, chunk)]
    out = {k: _interval(torch.cat([r[k] for r in reps]), point[k]) for k in MEASURES}
    out["decomposition"] = {k: v.mean().item() for k, v in terms.items()}  # means over units
    out["n_units"] = n
    return out


def sweep_measures(stats_by_run: dict, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """`bootstrap_measures` of each run of a sweep group, raw and at matched activation counts.

    A latent of an R = 2 SAE fires about 4x as often as one of R = 8 (the same tokens, k
    activations per vector, 4x fewer latents), and every measure of a latent's distribution
    moves with the number of its activations. ``matched``: each run's measures on its first n
    contexts, n the fewest whose activations per latent reach those of the reference run, the
    run with the fewest activations per latent over all tokens (the largest R; `matched_units`).

    Returns ``{run: {"activations_per_latent", "reference_run", "raw", "matched"}}``;
    ``matched`` (None without per-context sums) adds ``n_units`` and its own
    ``activations_per_latent`` to `bootstrap_measures`'s dict.
    """
    per_latent = {r: activations_per_latent(s) for r, s in stats_by_run.items()}
    ref = min(per_latent, key=per_latent.get)
    out = {}
    for r, s in stats_by_run.items():
        row = {"activations_per_latent": per_latent[r], "reference_run": ref, "matched": None}
        row["raw"] = bootstrap_measures(s, n_boot, seed)
        if s.has_groups:
            n = matched_units(s, per_latent[ref])
            row["matched"] = bootstrap_measures(s, n_boot, seed, units=n)
            row["matched"]["activations_per_latent"] = activations_per_latent(s, n)
        out[r] = row
    return out
