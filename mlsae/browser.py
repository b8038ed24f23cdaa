"""A static HTML latent browser: one self-contained page that opens from disk, no server.

For each chosen latent: its distribution over layers (a bar chart) and, at each layer where it
fires, its top-activating contexts with the token highlighted. A search box (and ``#latent=<id>``
in the address) selects a latent by id.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from mlsae.latents import TopContexts


def choose_latents(counts: torch.Tensor, n_frequent: int, n_random: int, seed: int = 0) -> list:
    """The ``n_frequent`` most frequent latents plus ``n_random`` other active ones, sorted."""
    total = counts.sum(0)
    order = torch.argsort(total, descending=True)
    frequent = [i for i in order[:n_frequent].tolist() if total[i] > 0]
    rest = torch.tensor([i for i in order[n_frequent:].tolist() if total[i] > 0], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    sample = rest[torch.randperm(len(rest), generator=gen)[:n_random]].tolist() if len(rest) else []
    return sorted(set(frequent) | set(sample))


def browser_data(
    latents: list[int],
    distribution: torch.Tensor,
    counts: torch.Tensor,
    top: TopContexts,
    token_ids: np.ndarray,
    tokenizer,
    window: int = 8,
) -> dict:
    """Everything the page shows, as JSON-ready data.

    Args:
        latents: latent ids to include.
        distribution: ``(layer, latent)`` distribution over layers.
        counts: ``(layer, latent)`` activation counts.
        top: top contexts, positions indexing ``token_ids``.
        token_ids: ``(token,)`` the token stream the positions refer to.
        tokenizer: to turn ids into strings.
        window: tokens shown on each side of the activating token.
    """
    used: set[int] = set()
    entries = []
    for i in latents:
        contexts = []
        for layer in range(top.n_layers):
            for r in range(top.n):
                pos = int(top.positions[layer, i, r])
                if pos < 0:
                    continue
                lo, hi = max(0, pos - window), min(len(token_ids), pos + window + 1)
                ids = [int(t) for t in token_ids[lo:hi]]
                used.update(ids)
                contexts.append(
                    {
                        "layer": layer,
                        "value": round(float(top.values[layer, i, r]), 3),
                        "ids": ids,
                        "at": pos - lo,
                    }
                )
        entries.append(
            {
                "id": i,
                "dist": [round(float(v), 4) for v in distribution[:, i]],
                "count": int(counts[:, i].sum()),
                "contexts": contexts,
            }
        )
    vocab = {str(t): tokenizer.decode([t]) for t in sorted(used)}
    return {"latents": entries, "vocab": vocab}


PAGE_FILE = Path(__file__).with_name("browser_page.html")


def write_browser(path: str | Path, data: dict, title: str, subtitle: str) -> Path:
    """Write the page; the data is embedded as JSON (``</`` escaped so it cannot end the tag)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    example = str(data["latents"][0]["id"]) if data["latents"] else "0"
    page = (
        PAGE_FILE.read_text(encoding="utf-8")
        .replace("__TITLE__", html.escape(title))
        .replace("__SUBTITLE__", html.escape(subtitle))
        .replace("__EXAMPLE__", example)
        .replace("__DATA__", payload)
    )
    path.write_text(page, encoding="utf-8")
    return path
