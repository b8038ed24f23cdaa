import math

import pytest
import torch

from mlsae.latents import (
    LayerStats,
    collect,
    decoder_cosine_histogram,
    layer_distribution,
    sort_by_mean_layer,
)
from mlsae.sae import MLSAE

L, T = 4, 8  # layers, tokens


def constructed():
    """Latent 0: layer 2 only. Latent 1: every layer equally. Latent 2: one layer per token,
    cycling through the layers. Latent 3: never active."""
    indices = torch.tensor([0, 1, 2]).expand(L, T, 3).clone()
    values = torch.zeros(L, T, 3)
    values[2, :, 0] = 1.0
    values[:, :, 1] = 2.0
    for t in range(T):
        values[t % L, t, 2] = 3.0
    return values, indices


def test_statistics_on_constructed_activations():
    stats = LayerStats(L, 5)
    values, indices = constructed()
    stats.update(values[:, :5], indices[:, :5])  # two batches: streaming must not matter
    stats.update(values[:, 5:], indices[:, 5:])
    out = stats.compute(min_tokens=1)
    uniform_var = (L**2 - 1) / 12
    # latent 0: one layer
    assert out["distribution"][:, 0].tolist() == [0, 0, 1, 0]
    assert out["mean_layer"][0] == 2 and out["std_layer"][0] == 0 and out["entropy"][0] == 0
    assert out["per_token_variance"][0] == 0
    # latent 1: uniform over layers, for the aggregate and for every token
    assert out["distribution"][:, 1].tolist() == pytest.approx([0.25] * 4)
    assert out["mean_layer"][1].item() == pytest.approx(1.5)
    assert out["entropy"][1].item() == pytest.approx(math.log(L))
    assert out["aggregated_variance"][1].item() == pytest.approx(uniform_var)
    assert out["per_token_variance"][1].item() == pytest.approx(uniform_var)
    # latent 2: one layer per token but all layers in aggregate -> per-token variance 0
    assert out["aggregated_variance"][2].item() == pytest.approx(uniform_var)
    assert out["per_token_variance"][2].item() == pytest.approx(0)
    # latent 3: never active
    assert math.isnan(out["mean_layer"][3].item())
    # counts and thresholds: latent 0 fires 8 times at one layer; latent 2 twice at each layer
    assert stats.counts[:, 0].tolist() == [0, 0, 8, 0]
    assert stats.totals[:, 1].tolist() == [16.0] * 4
    th = out["thresholds"]
    assert out["n_layers_above"][th.index(1)].tolist()[:4] == [1, 4, 4, 0]
    assert out["n_layers_above"][th.index(10)].tolist()[:4] == [0, 0, 0, 0]
    s = out["summary"]
    assert s["n_tokens"] == T and s["n_latents_active"] == 3
    # mean aggregated variance (0 + v + v) / 3 over mean per-token variance (0 + v + 0) / 3
    assert s["variance_ratio"] == pytest.approx(2.0)


def test_layer_distribution_by_hand_and_as_compute_reports_it():
    """Latent 0: layers 0 and 2 in a 1:3 ratio; latent 1: one layer; latent 2: never fired."""
    totals = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    d = layer_distribution(totals)
    assert d["distribution"][:, 0].tolist() == [0.25, 0, 0.75] and d["mass"].tolist() == [4, 5, 0]
    assert d["mean_layer"].tolist() == [1.5, 1.0, 0.0]
    assert d["variance"][0].item() == pytest.approx(0.25 * 1.5**2 + 0.75 * 0.5**2)
    assert d["entropy"][0].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert d["entropy"][1:].tolist() == [0, 0]  # one layer; never fired: zeros, not NaN
    stats = LayerStats(3, 3)
    stats.totals = totals
    out = stats.compute()
    for key in ("mean_layer", "entropy"):
        assert torch.equal(out[key][:2], d[key][:2]) and math.isnan(out[key][2])
    assert torch.equal(out["aggregated_variance"][:2], d["variance"][:2])


def test_sort_by_mean_layer():
    m = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.5, 0.0]])
    mean = torch.tensor([0.0, 1.0, 0.5, float("nan")])
    assert sort_by_mean_layer(m, mean).tolist() == [[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]


def test_collect_applies_the_lens():
    from mlsae.lens import random_lens

    torch.manual_seed(0)
    sae = MLSAE(8, 32, 4)
    lens = random_lens(8, 3, scale=1.0, seed=0)
    x = torch.randn(3, 20, 8)
    with_lens = collect(sae, [x], lens=lens)
    manual = LayerStats(3, 32)
    manual.update(*sae.encode(lens.transform_layers(x, [0, 1, 2])))
    assert torch.equal(with_lens.totals, manual.totals)
    assert not torch.equal(collect(sae, [x]).totals, manual.totals)


def test_decoder_cosine_histogram_counts_pairs():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    hist = decoder_cosine_histogram(w, bins=4)
    assert hist.hist.sum().item() == 3  # 3 pairs
    assert hist.hist.tolist() == [0, 0, 1, 2]  # cos 0 in [0, .5), two of 0.707 in [.5, 1]


def test_saved_statistics_load_to_the_same_results(tmp_path):
    stats = LayerStats(L, 5)
    stats.update(*constructed())
    stats.save(tmp_path / "s.pt")
    back = LayerStats.load(tmp_path / "s.pt")
    a, b = stats.compute(min_tokens=1), back.compute(min_tokens=1)
    assert back.n_tokens == T and torch.equal(back.counts, stats.counts)
    assert torch.allclose(a["per_token_variance"], b["per_token_variance"], equal_nan=True)
    for key in ("distribution", "n_layers_above"):
        assert torch.equal(a[key], b[key])
    assert a["summary"] == b["summary"]


def test_unreadable_statistics_file_is_a_clear_error(tmp_path):
    (tmp_path / "s.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="latent statistics"):
        LayerStats.load(tmp_path / "s.pt")


def dense_latents(values, indices, n_latents):
    """Top-k (layer, token, k) -> dense (layer, token, latent)."""
    dense = torch.zeros(*values.shape[:2], n_latents, dtype=torch.float64)
    return dense.scatter_(2, indices, values.double())


def paper_variance_ratio_transcribed(latents):
    """The original analysis formula written out on a dense (layer, token, latent) batch."""
    n_layers = latents.shape[0]
    ell = torch.arange(n_layers, dtype=torch.float64).view(n_layers, *[1] * (latents.ndim - 1))

    def var(q):
        w = ell.view(n_layers, *[1] * (q.ndim - 1))
        return (w**2 * q).sum(0) - ((w * q).sum(0)) ** 2

    probs = (latents / latents.sum(0)).nan_to_num(0.0)
    aggregated = var(probs.mean(1)).mean()
    per_token = var(probs).mean()
    return per_token / aggregated


def test_variance_ratio_hand_computed_in_both_definitions():
    """One latent over 2 layers and 4 tokens (second latent never fires).

    tokens: (1, 0), (0, 1), (0.5, 0.5) as activations at layers (0, 1); the fourth token never
    fires. Ours: aggregated p = (1/2, 1/2), variance 1/4; per-token variances 0, 0, 1/4 over the 3
    active tokens, mean 1/12; ratio 3. Paper: mean_t p = (1.5/4, 1.5/4), var = 0.375 - 0.375^2 =
    0.234375 (mean over both latents: 0.1171875); per-token mean over 4 tokens x 2 latents =
    0.25 / 8; ratio 0.1171875 / 0.03125 = 3.75.
    """
    values = torch.tensor([[[1.0], [0.0], [0.5], [0.0]], [[0.0], [1.0], [0.5], [0.0]]])
    indices = torch.zeros(2, 4, 1, dtype=torch.long)
    stats = LayerStats(2, 2)
    stats.update(values, indices)
    summary = stats.compute(min_tokens=1)["summary"]
    assert summary["variance_ratio"] == pytest.approx(3.0)
    assert summary["variance_ratio_paper"] == pytest.approx(3.75)


def test_variance_ratio_paper_equals_the_original_formula():
    gen = torch.Generator().manual_seed(0)
    stats, ratios = LayerStats(5, 40), []
    for _ in range(3):
        values = torch.rand(5, 30, 4, generator=gen) * (torch.rand(5, 30, 4, generator=gen) > 0.3)
        scores = torch.rand(5, 30, 40, generator=gen)
        indices = scores.topk(4, dim=-1).indices
        stats.update(values, indices)
        ratios.append(paper_variance_ratio_transcribed(dense_latents(values, indices, 40)))
    expected = 1 / torch.stack(ratios).mean().item()
    assert stats.compute()["summary"]["variance_ratio_paper"] == pytest.approx(expected, rel=1e-9)


def test_power_law_fit_recovers_an_exact_power_law():
    from mlsae.analysis import power_law_fit, tokens_to_reach

    tokens = [1e3, 2e3, 5e3, 1e4, 4e4]
    a, b = power_law_fit(tokens, [2.0 * t**-0.25 for t in tokens])
    assert a == pytest.approx(2.0) and b == pytest.approx(-0.25)
    assert tokens_to_reach(2.0, -0.25, 2.0 * 1e6**-0.25) == pytest.approx(1e6)
    assert tokens_to_reach(2.0, 0.1, 0.5) == float("inf")
