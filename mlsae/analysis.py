r"""Latent analyses (Figures 2-3, variance ratio) and the power law of a training curve.

Every statistic is computed on held-out residuals from the test activation cache, through the
lens when the run has one.

* Figure 3 measured directly (`window_distribution`): a prompt of W tokens is compared with
  ``n_windows`` windows of W contiguous tokens of one test context, drawn without replacement,
  seeded, from every start at which such a window fits among the tokens `LayerStats` stored
  (`mlsae.latents.STORE_TOKENS`; in arrival order, so the draw does not depend on batch
  boundaries). Per window: the mean number of layers per active latent (the latents active at
  some (token, layer) of the window; for each, the layers at which it is active at some token)
  and the share of active (token, latent) pairs active at one layer (`window_layers`). A count
  of layers grows with the tokens counted, so a 14-token prompt is compared with 14-token
  windows, not with the whole test set.
* The null of the effective number of layers (`entropy_null`): for each stored token t, a seeded
  permutation :math:`\pi_t` of the L layers moves every activation at (t, l) to (t,
  :math:`\pi_t(l)`): each token keeps its L vectors' codes, which lose their layer. A latent's
  shuffled distribution is uniform in expectation and its exp(H) falls short of L only by the
  noise of its own activations, which the observed exp(H) on the same tokens shares; the
  observed-to-shuffled gap is layer specificity beyond that noise. ``marginal``:
  :math:`\exp H(m)` of the layer marginal of all activation mass, :math:`m_l = \sum_i s_{l,i}
  / \sum_{l,i} s_{l,i}`, what every latent would have with unlimited activations spread like
  all activations.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from mlsae.activations import residual_stream
from mlsae.latent_measures import SHARES, bootstrap_measures, layer_distribution
from mlsae.latents import LayerStats, decoder_cosine_histogram
from mlsae.sae import MLSAE
from mlsae.similarity import mmcs

WINDOWS = 400
"""Random windows of the prompt's length drawn from the test contexts (`window_distribution`)."""
PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is Paris, and the capital of Italy is",
    "In 1963, the committee reported that the new tax would",
)


@torch.no_grad()
def prompt_activations(model: HookedTransformer, sae: MLSAE, prompt: str, lens=None) -> dict:
    """Summed activations ``(layer, latent)`` over a prompt's tokens (BOS excluded).

    Returns ``{"totals", "stats", "n_tokens", "window"}``; ``window`` is `window_layers` of the
    prompt: ``{"mean_layers", "frac_single_layer"}``.
    """
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[model.tokenizer.bos_token_id, *ids]])
    x = residual_stream(model, tokens)[:, 0, 1:]  # (layer, token, d)
    if lens is not None:
        x = lens.transform_layers(x, list(range(x.shape[0])))
    values, indices = sae.encode(x)
    dense = torch.zeros(x.shape[0], x.shape[1], sae.n_latents).scatter_(-1, indices, values)
    stats = LayerStats(x.shape[0], sae.n_latents)
    stats.update(values, indices)
    mean_layers, single = window_layers(torch.where(values > 0, indices, -1), sae.n_latents)
    return {
        "totals": dense.sum(1),
        "stats": stats.compute(min_tokens=1),
        "n_tokens": len(ids),
        "window": {"mean_layers": mean_layers, "frac_single_layer": single},
    }


def window_layers(indices: torch.Tensor, n_latents: int) -> tuple[float, float]:
    """Mean layers per active latent and the single-layer share of pairs (module docstring).

    ``indices``: ``(layer, token, k)`` top-k indices of the window's tokens, -1 where inactive.
    """
    idx = indices.long()
    on = idx >= 0
    layer = torch.arange(idx.shape[0])[:, None, None].expand_as(idx)
    token = torch.arange(idx.shape[1])[None, :, None].expand_as(idx)
    cells = torch.unique((layer * n_latents + idx)[on])  # distinct active (layer, latent)
    per_latent = torch.bincount(cells % n_latents, minlength=n_latents)
    # a vector's top-k indices are distinct, so a (token, latent) pair's count is its layers
    pairs = torch.bincount((token * n_latents + idx)[on], minlength=idx.shape[1] * n_latents)
    mean_layers = per_latent[per_latent > 0].double().mean().item()
    return mean_layers, ((pairs == 1).sum() / (pairs > 0).sum()).item()


def window_starts(context: torch.Tensor, length: int, n_windows: int, seed: int = 0):
    """Starts of ``n_windows`` windows of ``length`` tokens within one context (sorted).

    ``context``: ``(token,)`` context id of each stored token in order. Every start at which
    ``length`` consecutive tokens share one context is a candidate; the draw is without
    replacement (all of them when there are fewer), seeded.
    """
    n = len(context)
    if n < length:
        return torch.zeros(0, dtype=torch.long)
    run = torch.cat([torch.zeros(1, dtype=torch.long), (context[1:] != context[:-1]).long()])
    run = run.cumsum(0)  # index of the run of equal context ids each token is in
    valid = torch.nonzero(run[length - 1 :] == run[: n - length + 1]).flatten()
    g = torch.Generator().manual_seed(seed)
    return valid[torch.randperm(len(valid), generator=g)[:n_windows]].sort().values


def window_distribution(stats: LayerStats, length: int, n_windows: int = WINDOWS, seed: int = 0):
    """`window_layers` of random ``length``-token windows of the stored test tokens.

    Returns ``{"starts", "mean_layers", "frac_single_layer"}`` (tensors, one entry per window).
    """
    starts = window_starts(stats.token_context, length, n_windows, seed)
    rows = [window_layers(stats.token_indices[:, s : s + length], stats.n_latents) for s in starts]
    rows = torch.tensor(rows, dtype=torch.float64).view(-1, 2)
    return {"starts": starts, "mean_layers": rows[:, 0], "frac_single_layer": rows[:, 1]}


def percentile_of(values: torch.Tensor, x: float) -> float:
    """Percentile rank of ``x`` among ``values``: 100 x (share below + half the share equal)."""
    return 100 * ((values < x).double().mean() + 0.5 * (values == x).double().mean()).item()


def layer_permutations(n_tokens: int, n_layers: int, seed: int = 0) -> torch.Tensor:
    r"""``(token, layer)``: row t is the permutation :math:`\pi_t` (layer l moves to row[l])."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, n_layers, generator=g).argsort(1)


def stored_totals(stats: LayerStats, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``(layer, latent)`` totals of the stored tokens, layers permuted per token by ``perm``."""
    idx, values = stats.token_indices.long(), stats.token_values.double()
    on = idx >= 0
    layer = torch.arange(idx.shape[0])[:, None] if perm is None else perm.T
    key = (layer[:, :, None].expand_as(idx) * stats.n_latents + idx)[on]
    size = idx.shape[0] * stats.n_latents
    return torch.bincount(key, weights=values[on], minlength=size).view(idx.shape[0], -1)


def entropy_null(stats: LayerStats, seed: int = 0) -> dict:
    """exp(H) per latent of the stored tokens, observed and layer-shuffled (module docstring).

    Returns ``{"n_tokens", "observed", "shuffled"}`` (``(latent,)`` over latents active on the
    stored tokens) with their means and medians, and ``marginal``.
    """
    observed = stored_totals(stats)
    n_tokens = stats.token_indices.shape[1]
    shuffled = stored_totals(stats, layer_permutations(n_tokens, stats.n_layers, seed))
    alive = observed.sum(0) > 0
    obs = layer_distribution(observed)["entropy"][alive].exp()
    shf = layer_distribution(shuffled)["entropy"][alive].exp()
    marginal = layer_distribution(observed.sum(1, keepdim=True))["entropy"].exp().item()
    return {
        "n_tokens": n_tokens,
        "observed": obs,
        "shuffled": shf,
        "observed_mean": obs.mean().item(),
        "observed_median": obs.median().item(),
        "shuffled_mean": shf.mean().item(),
        "shuffled_median": shf.median().item(),
        "marginal": marginal,
    }


def summary(stats: LayerStats, min_tokens: int = 10) -> dict:
    """JSON-ready summary numbers of a scan."""
    out = stats.compute(min_tokens)
    n_above = out["n_layers_above"].double()
    active = ~torch.isnan(out["mean_layer"])
    return out["summary"] | {
        "frac_latents_multi_layer": (n_above[0][active] > 1).double().mean().item(),
        "mean_layers_active_ge10": n_above[1][active].mean().item(),
        "median_entropy_nats": out["entropy"][active].median().item(),
    }


def latent_findings(
    stats: LayerStats,
    window_tokens: int,
    prompt: dict | None = None,
    n_windows: int = WINDOWS,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """The measures of section 4.2 that do not saturate, JSON-ready (`flat_findings` flattens).

    ``bootstrap``: `mlsae.latent_measures.bootstrap_measures`. ``relative_layers``: per share x
    of `mlsae.latent_measures.SHARES`, the mean, 10/50/90th percentiles over active latents of
    the layers holding >= x of the latent's mass, and their histogram (index = layers).
    ``effective_layers``: the same of exp(H), with ``null`` (`entropy_null`'s numbers, and
    histograms of the observed and shuffled exp(H) on ``bins``). ``windows`` (None without
    stored tokens): `window_distribution` of ``window_tokens``-token windows, with the prompt's
    values (``prompt``: `prompt_activations`'s ``window``) and their percentiles among them.
    """
    dist = layer_distribution(stats.totals)
    alive = dist["mass"] > 0
    n_layers = stats.n_layers

    def spread(x: torch.Tensor) -> dict:
        if len(x) == 0:
            return dict.fromkeys(("mean", "q10", "q50", "q90"), float("nan"))
        q = torch.quantile(x.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        q10, q50, q90 = q.tolist()
        return {"mean": x.double().mean().item(), "q10": q10, "q50": q50, "q90": q90}

    out = {"bootstrap": bootstrap_measures(stats, n_boot, seed), "relative_layers": {}}
    for x in SHARES:
        n = (dist["distribution"] >= x).sum(0)[alive]
        hist = torch.bincount(n, minlength=n_layers + 1).tolist()
        out["relative_layers"][f"ge{x * 100:g}pct"] = spread(n) | {"hist": hist}
    out["effective_layers"] = spread(dist["entropy"][alive].exp())
    out["windows"] = None
    if stats.token_indices.shape[1] == 0:
        return out
    null = entropy_null(stats, seed)
    bins = torch.linspace(1, n_layers, 4 * (n_layers - 1) + 1, dtype=torch.float64)
    hists = {k: torch.histogram(null[k], bins).hist.tolist() for k in ("observed", "shuffled")}
    numbers = {k: v for k, v in null.items() if k not in ("observed", "shuffled")}
    out["effective_layers"]["null"] = numbers | {"bins": bins.tolist(), "hist": hists}
    win = window_distribution(stats, window_tokens, n_windows, seed)
    out["windows"] = {
        "n_tokens": window_tokens,
        "n_windows": len(win["starts"]),
        "mean_layers": win["mean_layers"].tolist(),
        "frac_single_layer": win["frac_single_layer"].tolist(),
        "mean_layers_spread": spread(win["mean_layers"]) if len(win["starts"]) else None,
        "test_set_mean_layers": stats.compute()["summary"]["mean_layers_active_ge1"],
        "prompt": prompt,
        "prompt_percentile": (
            percentile_of(win["mean_layers"], prompt["mean_layers"]) if prompt else None
        ),
        "prompt_single_percentile": (
            percentile_of(win["frac_single_layer"], prompt["frac_single_layer"]) if prompt else None
        ),
    }
    return out


def flat_findings(f: dict) -> dict[str, float]:
    """The headline numbers of `latent_findings` (numbers only; a missing one is left out)."""
    b, w = f["bootstrap"], f["windows"] or {}
    null = f["effective_layers"].get("null", {})
    flat = {
        "layers_ge1pct_mean": f["relative_layers"]["ge1pct"]["mean"],
        "layers_ge5pct_mean": f["relative_layers"]["ge5pct"]["mean"],
        "exp_entropy_mean": f["effective_layers"]["mean"],
        "exp_entropy_null_mean": null.get("shuffled_mean"),
        "exp_entropy_stored_mean": null.get("observed_mean"),
        "layer_std_mean": b["layer_std_mean"]["value"],
        "variance_ratio_paper_0based": b["paper_0based"]["value"],
        "variance_ratio_paper_1based": b["paper_1based"]["value"],
        "ratio_of_variances": b["ratio_of_variances"]["value"],
        "frac_single_layer": b["frac_single_layer"]["value"],
        "window_mean_layers": (w.get("mean_layers_spread") or {}).get("mean"),
        "prompt_mean_layers": (w.get("prompt") or {}).get("mean_layers"),
        "prompt_window_percentile": w.get("prompt_percentile"),
    }
    return {k: float(v) for k, v in flat.items() if v is not None}


def decoder_summary(sae: MLSAE) -> dict:
    """MMCS of the decoder with itself and the histogram of pairwise cosine similarities."""
    hist = decoder_cosine_histogram(sae.W_dec)
    return {
        "mmcs_self": mmcs(sae.W_dec),
        "cos_hist": hist.hist.tolist(),
        "cos_bins": hist.bin_edges.tolist(),
    }


def power_law_fit(tokens, fvu) -> tuple[float, float]:
    """Least-squares fit of ``fvu = a * tokens ** b`` in log-log space; returns ``(a, b)``."""
    x = torch.log(torch.as_tensor(tokens, dtype=torch.float64))
    y = torch.log(torch.as_tensor(fvu, dtype=torch.float64))
    b = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    a = torch.exp(y.mean() - b * x.mean())
    return a.item(), b.item()


def tokens_to_reach(a: float, b: float, target: float) -> float:
    """Tokens at which ``a * tokens ** b`` equals ``target`` (inf if the fit does not fall)."""
    return (target / a) ** (1 / b) if b < 0 else float("inf")
