r"""How MLSAE latents spread over layers (paper section 4.2, Figures 2-3), streamed over tokens.

Memory is O(layers x latents) for the totals, plus a ``(token, latent)`` scratch per batch; with
``groups``, O(units x layers x latents) and the stored tokens (below).

Definitions, for latent i, layer l, and activations :math:`a_{t,l,i} \ge 0`:

* counts :math:`c_{l,i} = \#\{t : a_{t,l,i} > 0\}`; totals :math:`s_{l,i} = \sum_t a_{t,l,i}`.
* aggregated distribution over layers :math:`p_{l,i} = s_{l,i} / \sum_{l'} s_{l',i}`; its
  mean layer :math:`\mu_i = \sum_l l\,p_{l,i}`, variance
  :math:`\sigma^2_i = \sum_l (l - \mu_i)^2 p_{l,i}`, entropy
  :math:`H_i = -\sum_l p_{l,i} \ln p_{l,i}` (nats; ln(n_layers) when uniform).
* per-token distribution :math:`p_{t,l,i} = a_{t,l,i} / \sum_{l'} a_{t,l',i}` for tokens where
  latent i is active at some layer; per-token variance :math:`v_{t,i}` likewise; the per-token
  variance of latent i is the mean of :math:`v_{t,i}` over those tokens.
* variance ratio: aggregated over per-token variance, per latent, and as the ratio of their means
  over latents active at least ``min_tokens`` times (the paper reports ~100).
* layers above threshold: for each count threshold c, the number of layers with :math:`c_{l,i}
  \ge c`.
* ``variance_ratio_paper``, the original analysis code's definition (tim-lawson/mlsae,
  ``mlsae/analysis/variances.py``), per evaluation batch of T tokens over all F latents, with
  :math:`p_{t,l,i}` as above but 0 where latent i is inactive at every layer for token t and
  :math:`\mathrm{var}(q) = \sum_l l^2 q_l - (\sum_l l q_l)^2` applied to any weights q:
  aggregated :math:`A_b = \mathrm{mean}_i \mathrm{var}(\mathrm{mean}_t p_{t,\cdot,i})` (inactive
  tokens included, so the weights sum to the latent's firing rate, not 1), per-token
  :math:`B_b = \mathrm{mean}_{t,i} \mathrm{var}(p_{t,\cdot,i})` (inactive pairs count as 0).
  The original records :math:`B_b / A_b` per batch and averages over batches; we report the
  reciprocal of that average, the "aggregated over per-token" ratio the paper quotes (~100).
  `mlsae.latent_measures` computes it per context (the original's batch is one context), with
  layers numbered from 0 and from 1, and explains why it differs from the ratio of variances.

With ``groups`` (each token's context id) `LayerStats.update` also keeps, per bootstrap unit (a
context; past ``max_units`` contexts, the j-th to arrive joins unit j mod ``max_units``), the sums
every measure of `mlsae.latent_measures` recomputes in a bootstrap replicate: totals, counts and
:math:`\sum_t p_{t,l,i}` per (layer, latent) (float32 / int32, U x L x F), summed per-token
variances and active-token counts per latent, tokens, and (token, latent) pairs active at >= 1
and at exactly 1 layer. It also stores the first ``store_tokens`` tokens' top-k indices (-1
where the value is 0) and values (bfloat16) in arrival order, for windows and the layer-shuffle
null. The cache yields a context's tokens contiguously and in order, which both rely on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from mlsae.latent_measures import layer_distribution

THRESHOLDS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
MAX_UNITS = 256
"""Bootstrap units kept per (layer, latent) (memory: units x layers x latents x 12 bytes)."""
UNIT_SUMS = (
    "unit_totals", "unit_share", "unit_counts", "unit_token_var", "unit_token_count",
    "unit_tokens", "unit_pairs", "unit_single",
)  # fmt: skip
"""The per-unit sums, each with the unit on axis 0."""
STORE_TOKENS = 16_384
"""Tokens whose top-k indices and values are kept (windows, the layer-shuffle null)."""


class LayerStats:
    """Streaming per-(layer, latent) statistics of an MLSAE's activations.

    Feed `update(values, indices, groups)` with top-k values and indices of shape ``(layer,
    token, k)`` (all layers of the same tokens) and, optionally, each token's context id; read
    `compute()` and, with groups, `mlsae.latent_measures.bootstrap_measures`.
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        max_units: int = MAX_UNITS,
        store_tokens: int = STORE_TOKENS,
    ):
        self.n_layers, self.n_latents = n_layers, n_latents
        f64 = torch.float64
        self.counts = torch.zeros(n_layers, n_latents, dtype=f64)
        self.totals = torch.zeros(n_layers, n_latents, dtype=f64)
        self.token_var_sum = torch.zeros(n_latents, dtype=f64)
        self.token_count = torch.zeros(n_latents, dtype=f64)
        self.n_tokens = 0
        self.paper_rel_var_t: list[float] = []  # the original's B_b / A_b, per batch
        # with groups (module docstring); old files lack these and load them empty
        self.max_units, self.store_tokens = max_units, store_tokens
        self.unit_context: list[int] = []  # context ids in order of arrival
        shape = (0, n_layers, n_latents)
        self.unit_totals, self.unit_share = torch.zeros(shape), torch.zeros(shape)
        self.unit_counts = torch.zeros(shape, dtype=torch.int32)
        self.unit_token_var = torch.zeros(0, n_latents, dtype=f64)
        self.unit_token_count = torch.zeros(0, n_latents, dtype=f64)
        self.unit_tokens, self.unit_pairs, self.unit_single = (
            torch.zeros(0, dtype=f64) for _ in range(3)
        )
        itype = torch.int16 if n_latents <= torch.iinfo(torch.int16).max else torch.int32
        self.token_indices = torch.zeros(n_layers, 0, 0, dtype=itype)
        self.token_values = torch.zeros(n_layers, 0, 0, dtype=torch.bfloat16)
        self.token_context = torch.zeros(0, dtype=torch.int64)

    @property
    def has_groups(self) -> bool:
        """Whether per-context sums were kept (``update`` was given ``groups``)."""
        return len(self.unit_tokens) > 0

    @torch.no_grad()
    def update(
        self, values: torch.Tensor, indices: torch.Tensor, groups: torch.Tensor | None = None
    ) -> None:
        """Add one batch: ``values``, ``indices`` of shape ``(layer, token, k)``.

        ``groups``: ``(token,)`` context id of each token (None: no per-context sums; the other
        statistics are the same either way).
        """
        n_layers, n_tok, _ = values.shape
        values, indices = values.double().cpu(), indices.cpu()
        active = values > 0
        flat = (torch.arange(n_layers)[:, None, None] * self.n_latents + indices)[active]
        size = n_layers * self.n_latents
        self.counts += torch.bincount(flat, minlength=size).view(n_layers, -1).double()
        self.totals += torch.bincount(flat, weights=values[active], minlength=size).view(
            n_layers, -1
        )
        # per-token moments over layers: sum a, sum a*l, sum a*l^2 for each (token, latent)
        layer_of = torch.arange(n_layers, dtype=torch.float64)[:, None, None].expand_as(values)
        tok_of = torch.arange(n_tok)[None, :, None].expand_as(indices)
        key = (tok_of * self.n_latents + indices)[active]
        moments = []
        for power in range(3):
            w = values[active] * layer_of[active] ** power
            moments.append(torch.bincount(key, weights=w, minlength=n_tok * self.n_latents))
        m0, m1, m2 = (m.view(n_tok, self.n_latents) for m in moments)
        seen = m0 > 0
        mean = torch.where(seen, m1 / m0.clamp_min(1e-300), 0)
        var = torch.where(seen, m2 / m0.clamp_min(1e-300) - mean**2, 0).clamp_min(0)
        self.token_var_sum += var.sum(0)
        self.token_count += seen.double().sum(0)
        self.n_tokens += n_tok
        # the original's definition: mean over tokens of p_{t,l,i} (inactive tokens as zeros)
        share = values[active] / m0.flatten()[key]  # p_{t,l,i} of each active entry
        lkey = (torch.arange(n_layers)[:, None, None] * self.n_latents + indices)[active]
        mean_p = torch.bincount(lkey, weights=share, minlength=size).view(n_layers, -1) / n_tok
        ell = torch.arange(n_layers, dtype=torch.float64)[:, None]
        aggregated = ((ell**2 * mean_p).sum(0) - (ell * mean_p).sum(0) ** 2).mean()
        per_token = var.sum() / (n_tok * self.n_latents)
        if aggregated > 0:
            self.paper_rel_var_t.append((per_token / aggregated).item())
        if groups is not None:
            layers_on = torch.bincount(key, minlength=n_tok * self.n_latents).view(n_tok, -1)
            self._update_groups(values, indices, active, groups.cpu(), var, seen, share, layers_on)

    def _unit_of(self, groups: torch.Tensor) -> torch.Tensor:
        """``(token,)`` bootstrap unit of each token; grows the per-unit sums for new contexts."""
        known = {c: i for i, c in enumerate(self.unit_context)}
        for c in torch.unique_consecutive(groups).tolist():
            if c not in known:
                known[c] = len(self.unit_context)
                self.unit_context.append(c)
        n_new = min(len(self.unit_context), self.max_units) - len(self.unit_tokens)
        for name in UNIT_SUMS:
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, old.new_zeros(n_new, *old.shape[1:])]))
        return torch.tensor([known[c] % self.max_units for c in groups.tolist()])

    def _update_groups(self, values, indices, active, groups, var, seen, share, layers_on):
        """Per-unit sums (module docstring) and the stored tokens; called by `update`."""
        n_layers, n_tok, _ = values.shape
        unit = self._unit_of(groups)
        present, local = torch.unique(unit, return_inverse=True)
        cell = torch.arange(n_layers)[:, None, None] * self.n_latents + indices
        key = ((local[None, :, None] * n_layers * self.n_latents) + cell)[active]
        size = len(present) * n_layers * self.n_latents
        sums_of = (("unit_totals", values[active]), ("unit_share", share), ("unit_counts", None))
        for name, w in sums_of:
            sums = torch.bincount(key, weights=w, minlength=size).view(len(present), n_layers, -1)
            getattr(self, name)[present] += sums.to(getattr(self, name).dtype)
        self.unit_token_var.index_add_(0, unit, var)
        self.unit_token_count.index_add_(0, unit, seen.double())
        self.unit_tokens.index_add_(0, unit, torch.ones(n_tok, dtype=torch.float64))
        self.unit_pairs.index_add_(0, unit, (layers_on > 0).sum(1).double())
        self.unit_single.index_add_(0, unit, (layers_on == 1).sum(1).double())
        keep = min(n_tok, self.store_tokens - len(self.token_context))
        if keep > 0:
            idx = torch.where(active, indices, -1)[:, :keep].to(self.token_indices.dtype)
            if self.token_indices.shape[1] == 0:  # the first stored batch sets k
                self.token_indices = self.token_indices.new_zeros(n_layers, 0, idx.shape[2])
                self.token_values = self.token_values.new_zeros(n_layers, 0, idx.shape[2])
            self.token_indices = torch.cat([self.token_indices, idx], 1)
            vals = values[:, :keep].to(torch.bfloat16)
            self.token_values = torch.cat([self.token_values, vals], 1)
            self.token_context = torch.cat([self.token_context, groups[:keep]])

    def save(self, path: str | Path) -> None:
        """Write the accumulated sums with `torch.save`.

        O(layers x latents) without groups (a few MB); with them also the per-unit sums (12 bytes
        per unit, layer and latent: 55 MB for 33 contexts x 30 layers x 4,608 latents) and the
        stored tokens (4 bytes per entry: 31 MB for 8,192 tokens x 30 layers x k = 32).
        """
        torch.save(dict(vars(self)), path)

    @classmethod
    def load(cls, path: str | Path) -> LayerStats:
        """Read statistics written by `save`."""
        try:
            state = torch.load(path, weights_only=True)
            stats = cls(state["n_layers"], state["n_latents"])
        except Exception as e:
            raise ValueError(f"Cannot read latent statistics from {path}: {e}") from e
        vars(stats).update(state)
        return stats

    def compute(self, min_tokens: int = 10) -> dict:
        """Per-latent statistics (tensors) and summary numbers."""
        dist = layer_distribution(self.totals)
        p, mean_layer, var = dist["distribution"], dist["mean_layer"], dist["variance"]
        alive = dist["mass"] > 0
        per_token_var = self.token_var_sum / self.token_count.clamp_min(1)
        n_layers_above = torch.stack([(self.counts >= c).sum(0) for c in THRESHOLDS])
        frequent = self.token_count >= min_tokens
        agg_mean = var[frequent].mean().item() if frequent.any() else float("nan")
        tok_mean = per_token_var[frequent].mean().item() if frequent.any() else float("nan")
        return {
            "distribution": p,
            "mean_layer": torch.where(alive, mean_layer, float("nan")),
            "std_layer": torch.where(alive, var.sqrt(), float("nan")),
            "entropy": torch.where(alive, dist["entropy"], float("nan")),
            "aggregated_variance": torch.where(alive, var, float("nan")),
            "per_token_variance": torch.where(alive, per_token_var, float("nan")),
            "n_layers_above": n_layers_above,
            "thresholds": list(THRESHOLDS),
            "summary": {
                "n_tokens": self.n_tokens,
                "n_latents_active": int(alive.sum()),
                "n_latents_frequent": int(frequent.sum()),
                "mean_aggregated_variance": agg_mean,
                "mean_per_token_variance": tok_mean,
                "variance_ratio": agg_mean / tok_mean if tok_mean > 0 else float("inf"),
                "variance_ratio_paper": (
                    len(self.paper_rel_var_t) / sum(self.paper_rel_var_t)
                    if sum(self.paper_rel_var_t) > 0
                    else float("inf")
                ),
                "mean_layers_active_ge1": n_layers_above[0][alive].double().mean().item(),
            },
        }


@torch.no_grad()
def collect(sae, batches: Iterable[torch.Tensor], lens=None, layers=None) -> LayerStats:
    """`LayerStats` of ``sae`` over residual batches ``(layer, token, d)`` (lens applied if given).

    With a lens, vectors are transformed first: the SAE was trained on lens-space vectors, and an
    analysis that skipped the lens would describe another input (NOTES.md defect 8).
    """
    stats = None
    sae.eval()
    for x in batches:
        if lens is not None:
            idx = list(range(x.shape[0])) if layers is None else layers
            x = lens.transform_layers(x, idx)
        values, indices = sae.encode(x)
        if stats is None:
            stats = LayerStats(x.shape[0], sae.n_latents)
        stats.update(values, indices)
    if stats is None:
        raise ValueError("No batches to collect statistics from.")
    return stats


def sort_by_mean_layer(matrix: torch.Tensor, mean_layer: torch.Tensor) -> torch.Tensor:
    """Columns of ``(layer, latent)`` ``matrix`` for active latents, sorted by mean layer."""
    keep = ~torch.isnan(mean_layer)
    order = torch.argsort(mean_layer[keep], stable=True)
    return matrix[:, keep][:, order]


def decoder_cosine_histogram(w_dec: torch.Tensor, bins: int = 100, max_rows: int = 4096):
    """Histogram of pairwise cosine similarities between (a sample of) decoder rows."""
    w = torch.nn.functional.normalize(w_dec.detach().float(), dim=-1)
    if w.shape[0] > max_rows:
        w = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]]
    sims = w @ w.T
    iu = torch.triu_indices(*sims.shape, offset=1)
    return torch.histogram(sims[iu[0], iu[1]], bins=bins, range=(-1.0, 1.0))
