"""Latent analyses (Figures 2-3, variance ratio) and the power law of a training curve.

Every statistic is computed on held-out residuals from the test activation cache, through the
lens when the run has one.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from mlsae.activations import residual_stream
from mlsae.latents import LayerStats, decoder_cosine_histogram
from mlsae.sae import MLSAE
from mlsae.similarity import mmcs

PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is Paris, and the capital of Italy is",
    "In 1963, the committee reported that the new tax would",
)


@torch.no_grad()
def prompt_activations(model: HookedTransformer, sae: MLSAE, prompt: str, lens=None) -> dict:
    """Summed activations ``(layer, latent)`` over a prompt's tokens (BOS excluded)."""
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[model.tokenizer.bos_token_id, *ids]])
    x = residual_stream(model, tokens)[:, 0, 1:]  # (layer, token, d)
    if lens is not None:
        x = lens.transform_layers(x, list(range(x.shape[0])))
    values, indices = sae.encode(x)
    dense = torch.zeros(x.shape[0], x.shape[1], sae.n_latents).scatter_(-1, indices, values)
    stats = LayerStats(x.shape[0], sae.n_latents)
    stats.update(values, indices)
    return {"totals": dense.sum(1), "stats": stats.compute(min_tokens=1), "n_tokens": len(ids)}


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
