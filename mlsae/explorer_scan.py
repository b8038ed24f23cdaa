"""The explorer's reads of the held-out activation cache: one streamed pass, then targeted ones.

`collect` makes one pass over the cache and keeps, with memory bounded by top-k selections
(never latents x contexts):

* per (layer, latent): activation counts and sums (the layer profile, mean layer, entropy);
* per latent: a histogram of its nonzero activations over log-spaced bins (`HIST_EDGES`);
* per latent: its ``n_top`` contexts of largest activation (each context once, at its peak token
  and layer), and per (latent, layer) its ``n_top_layer`` best contexts at that layer.

`activations_at` then re-encodes only the residual vectors that the pages of those contexts need
(`mlsae.explorer.build` asks for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlsae.activations import ActivationCache, take_tokens
from mlsae.sae import MLSAE

HIST_EDGES = np.geomspace(1e-2, 1e2, 33)
"""Bin edges of the activation histograms (values outside are clipped into the end bins)."""


def top_per_group(
    group: torch.Tensor, item: torch.Tensor, value: torch.Tensor, payload: torch.Tensor, n: int
) -> tuple[torch.Tensor, ...]:
    """The ``n`` largest values per group, each item at most once (at its largest value).

    All arguments are 1-D and aligned; returns the kept ``(group, item, value, payload)`` sorted
    by group, then by value descending. Stable sorts make ties resolve the same way every run.
    """
    order = torch.argsort(value, descending=True, stable=True)
    group, item, value, payload = group[order], item[order], value[order], payload[order]
    key = group * (int(item.max()) + 1 if len(item) else 1) + item
    order = torch.argsort(key, stable=True)
    group, item, value, payload, key = (t[order] for t in (group, item, value, payload, key))
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    group, item, value, payload = group[first], item[first], value[first], payload[first]
    order = torch.argsort(value, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    group, item, value, payload = group[order], item[order], value[order], payload[order]
    _, counts = torch.unique_consecutive(group, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(group), device=group.device) - torch.repeat_interleave(starts, counts)
    keep = rank < n
    return group[keep], item[keep], value[keep], payload[keep]


@dataclass
class Collected:
    """What `collect` keeps: O(latents x (layers + bins + top)) numbers."""

    counts: torch.Tensor  # (layer, latent) activations
    totals: torch.Tensor  # (layer, latent) summed activations
    hist: torch.Tensor  # (latent, bins)
    top: tuple[torch.Tensor, ...]  # (latent, context, value, token * layers + layer)
    top_layer: tuple[torch.Tensor, ...]  # (latent * layers + layer, context, value, token)
    tokens: np.ndarray  # (token,) ids of the tokens read
    contexts: np.ndarray  # (token,) context id of each token
    n_tokens: int


@torch.no_grad()
def collect(
    sae: MLSAE,
    cache: ActivationCache,
    max_tokens: int,
    lens=None,
    n_top: int = 5,
    n_top_layer: int = 1,
    batch_tokens: int = 1024,
    device: str = "cpu",
) -> Collected:
    """One pass over ``cache`` (at most ``max_tokens`` tokens); see the module docstring."""
    n_layers, n_latents = cache.n_layers, sae.n_latents
    layers = list(range(n_layers))
    counts = torch.zeros(n_layers * n_latents, dtype=torch.float64, device=device)
    totals = torch.zeros_like(counts)
    bins = len(HIST_EDGES) - 1
    hist = torch.zeros(n_latents * bins, dtype=torch.float64, device=device)
    edges = torch.tensor(np.log(HIST_EDGES[1:-1]), dtype=torch.float32, device=device)
    context_ids = torch.as_tensor(cache.context_ids()).long()
    context_ids_device = context_ids.to(device)  # moved once, indexed every batch
    empty = tuple(torch.zeros(0, dtype=t, device=device) for t in (torch.long,) * 2)
    top = (*empty, torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device))
    top_layer = top
    seen = 0
    for x in take_tokens(cache.iter_batches(batch_tokens), max_tokens):
        x = x.to(device).float()
        if lens is not None:
            x = lens.transform_layers(x, layers)
        values, indices = sae.encode(x)  # (layer, token, k)
        n_tok = x.shape[1]
        layer = torch.arange(n_layers, device=device)[:, None, None].expand_as(indices)
        pos = (seen + torch.arange(n_tok, device=device))[None, :, None].expand_as(indices)
        live = values > 0
        v, lat, ly, p = values[live], indices[live], layer[live], pos[live]
        flat = ly * n_latents + lat
        counts.index_add_(0, flat, torch.ones_like(v, dtype=torch.float64))
        totals.index_add_(0, flat, v.double())
        b = torch.bucketize(v.log(), edges)
        hist.index_add_(0, lat * bins + b, torch.ones_like(v, dtype=torch.float64))
        ctx = context_ids_device[p]
        top = top_per_group(
            torch.cat([top[0], lat]),
            torch.cat([top[1], ctx]),
            torch.cat([top[2], v]),
            torch.cat([top[3], p * n_layers + ly]),
            n_top,
        )
        top_layer = top_per_group(
            torch.cat([top_layer[0], lat * n_layers + ly]),
            torch.cat([top_layer[1], ctx]),
            torch.cat([top_layer[2], v]),
            torch.cat([top_layer[3], p]),
            n_top_layer,
        )
        seen += n_tok
    tokens = np.concatenate([cache.tokens(i) for i in range(len(cache))])[:seen]
    return Collected(
        counts=counts.view(n_layers, n_latents).cpu(),
        totals=totals.view(n_layers, n_latents).cpu(),
        hist=hist.view(n_latents, bins).cpu(),
        top=tuple(t.cpu() for t in top),
        top_layer=tuple(t.cpu() for t in top_layer),
        tokens=tokens,
        contexts=context_ids.numpy()[:seen],
        n_tokens=seen,
    )


def _vectors(
    cache: ActivationCache, starts: np.ndarray, layer: np.ndarray, token: np.ndarray
) -> torch.Tensor:
    """Cached residuals at (layer, global token) pairs, ``(pairs, d)`` float32.

    ``starts``: the global position of each shard's first token (`_shard_starts`).
    """
    shard = np.searchsorted(starts, token, side="right") - 1
    out = np.zeros((len(token), cache.shard(0).shape[-1]), dtype=np.float32)
    for s in np.unique(shard):
        rows = np.flatnonzero(shard == s)
        out[rows] = cache.shard(int(s))[layer[rows], token[rows] - starts[s]]
    return torch.from_numpy(out)


def _shard_starts(cache: ActivationCache) -> np.ndarray:
    """Global position of the first token of each shard, and the total as the last entry."""
    return np.concatenate([[0], np.cumsum([cache.shard(i).shape[1] for i in range(len(cache))])])


@torch.no_grad()
def activations_at(
    sae: MLSAE,
    cache: ActivationCache,
    latent: np.ndarray,
    layer: np.ndarray,
    token: np.ndarray,
    lens=None,
    chunk: int = 4096,
    device: str = "cpu",
) -> np.ndarray:
    """The TopK activation of ``latent[i]`` at ``(layer[i], token[i])``, for every request i.

    Each distinct (layer, token) vector is read and encoded once (through the lens if given); a
    latent outside the vector's top k has activation 0.
    """
    pairs, where = np.unique(np.stack([layer, token], 1), axis=0, return_inverse=True)
    where = where.reshape(-1)
    # requests grouped by the chunk of their vector: one sort instead of a scan per chunk
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(0, len(pairs) + chunk, chunk))
    starts = _shard_starts(cache)
    out = np.zeros(len(latent), dtype=np.float32)
    for c, s in enumerate(range(0, len(pairs), chunk)):
        part = pairs[s : s + chunk]
        x = _vectors(cache, starts, part[:, 0], part[:, 1]).to(device)
        if lens is not None:  # the lens of each vector's layer, a layer at a time
            for ly in np.unique(part[:, 0]):
                rows = torch.from_numpy(np.flatnonzero(part[:, 0] == ly)).to(device)
                x[rows] = lens.transform(x[rows], int(ly))
        values, indices = sae.encode(x)  # (pairs, k)
        req = order[bounds[c] : bounds[c + 1]]
        rows = torch.from_numpy(where[req] - s).to(device)
        lat = torch.from_numpy(latent[req].astype(np.int64)).to(device)
        hit = indices[rows] == lat[:, None]
        out[req] = (values[rows] * hit).sum(-1).cpu().numpy()
    return out
