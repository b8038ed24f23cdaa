"""Similarity of SAE dictionaries: the mean max cosine similarity (MMCS).

For dictionaries A and B, the mean over latents of A of the max cosine similarity with any latent
of B (every latent of B, not only lower-index ones as in the original code, tim-lawson/mlsae:
NOTES.md defect 7). With B = A, self-pairs are excluded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mmcs(dict_a: torch.Tensor, dict_b: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """Mean max cosine similarity of the rows of ``dict_a`` ``(n_a, d)`` with those of ``dict_b``.

    With ``dict_b`` None, ``dict_a`` is compared with itself, excluding each latent's self-pair.
    """
    a = F.normalize(dict_a.detach().float(), dim=-1)
    b = a if dict_b is None else F.normalize(dict_b.detach().float(), dim=-1)
    maxes = []
    for start in range(0, a.shape[0], chunk):
        sims = a[start : start + chunk] @ b.T
        if dict_b is None:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = float("-inf")
        maxes.append(sims.max(-1).values)
    return torch.cat(maxes).mean().item()
