"""Residual-stream drift across layers (the paper's Figure 1), from an activation cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlsae.activations import take_tokens


@torch.no_grad()
def residual_drift(cache, max_tokens: int) -> dict[str, list[float]]:
    """Adjacent-layer similarity and norms of residual vectors (the paper's Figure 1).

    For each pair (l, l + 1) of block outputs: the mean over tokens of the cosine similarity of a
    token's two vectors, raw and after subtracting each layer's mean vector; and per layer the mean
    L2 norm. Computed over the first ``max_tokens`` tokens of ``cache`` (an
    `mlsae.activations.ActivationCache`, vectors ``(layer, token, d)``).

    Returns:
        ``{"cosine": (layer - 1), "cosine_centred": (layer - 1), "norm": (layer), "n_tokens":
        [tokens]}`` as lists.
    """
    batches = take_tokens(cache.iter_batches(1024), max_tokens)
    x = torch.cat([b.double() for b in batches], dim=1)  # (layer, token, d)
    centred = x - x.mean(dim=1, keepdim=True)
    cos = F.cosine_similarity(x[:-1], x[1:], dim=-1).mean(-1)
    cos_c = F.cosine_similarity(centred[:-1], centred[1:], dim=-1).mean(-1)
    return {
        "cosine": cos.tolist(),
        "cosine_centred": cos_c.tolist(),
        "norm": x.norm(dim=-1).mean(-1).tolist(),
        "n_tokens": [float(x.shape[1])],
    }
