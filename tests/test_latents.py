import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import pytest
import torch

import mlsae.stages.latents as stage
from mlsae import config, paths
from mlsae.analysis import (
    entropy_null,
    flat_findings,
    latent_findings,
    layer_permutations,
    percentile_of,
    stored_totals,
    summary,
    window_distribution,
    window_layers,
    window_starts,
)
from mlsae.latent_measures import (
    activations_per_latent,
    bootstrap_measures,
    matched_units,
    paper_terms,
    sum_measures,
    sweep_measures,
)
from mlsae.latents import (
    LayerStats,
    collect,
    decoder_cosine_histogram,
    layer_distribution,
    sort_by_mean_layer,
)
from mlsae.sae import MLSAE
from mlsae.stages.latents import by_training_length, sweep_tokens

ROOT = Path(__file__).resolve().parents[1]
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


def random_topk(n_layers, n_tok, n_latents, k, seed=0, sparsity=0.3, skew=0.0):
    """Random top-k codes; ``skew`` > 0 ties each latent to a preferred layer."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_layers, n_tok, n_latents, generator=gen)
    if skew:
        pref = torch.arange(n_latents) % n_layers
        dist = (torch.arange(n_layers)[:, None] - pref[None]).abs().double()
        scores = scores + skew * torch.exp(-dist)[:, None, :].float()
    indices = scores.topk(k, dim=-1).indices
    values = torch.rand(n_layers, n_tok, k, generator=gen)
    values = values * (torch.rand(n_layers, n_tok, k, generator=gen) > sparsity)
    return values, indices


def feed(values, indices, n_latents, contexts, cuts, **kw):
    """LayerStats fed in batches split at ``cuts`` (token positions), with context ids."""
    stats = LayerStats(values.shape[0], n_latents, **kw)
    bounds = [0, *cuts, values.shape[1]]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        stats.update(values[:, lo:hi], indices[:, lo:hi], contexts[lo:hi])
    return stats


def test_groups_none_keeps_the_old_numbers_exactly():
    values, indices = random_topk(5, 60, 12, 3, seed=1)
    contexts = torch.arange(60) // 7
    plain = LayerStats(5, 12)
    plain.update(values[:, :25], indices[:, :25])
    plain.update(values[:, 25:], indices[:, 25:])
    grouped = feed(values, indices, 12, contexts, [25])
    a, b = plain.compute(), grouped.compute()
    assert a["summary"] == b["summary"]
    for key in ("distribution", "n_layers_above", "per_token_variance"):
        assert torch.equal(a[key].nan_to_num(-1), b[key].nan_to_num(-1))
    assert not plain.has_groups and grouped.has_groups
    assert len(plain.unit_tokens) == 0 and plain.token_indices.shape[1] == 0


def test_per_context_sums_equal_a_dense_reimplementation_whatever_the_batches():
    n_layers, n_tok, n_latents = 4, 50, 10
    values, indices = random_topk(n_layers, n_tok, n_latents, 3, seed=2)
    contexts = torch.tensor([7] * 12 + [3] * 20 + [9] * 18)  # ids in any order
    one = feed(values, indices, n_latents, contexts, [5, 30, 31])
    two = feed(values, indices, n_latents, contexts, [12, 40])
    assert one.unit_context == [7, 3, 9]
    dense = dense_latents(values, indices, n_latents)  # (layer, token, latent)
    for u, c in enumerate(one.unit_context):
        d = dense[:, contexts == c]
        assert torch.allclose(one.unit_totals[u].double(), d.sum(1), atol=1e-6)
        assert torch.equal(one.unit_counts[u], (d > 0).sum(1).int())
        mass = d.sum(0)  # (token, latent)
        p = torch.where(mass > 0, d / mass.clamp_min(1e-300), 0)
        assert torch.allclose(one.unit_share[u].double(), p.sum(1), atol=1e-6)
        ell = torch.arange(n_layers, dtype=torch.float64)[:, None, None]
        mu = (ell * p).sum(0)
        var = ((ell - mu) ** 2 * p).sum(0)
        assert torch.allclose(one.unit_token_var[u], var.sum(0), atol=1e-9)
        assert torch.equal(one.unit_token_count[u], (mass > 0).sum(0).double())
        n_on = (d > 0).sum(0)
        assert one.unit_pairs[u] == (n_on > 0).sum() and one.unit_single[u] == (n_on == 1).sum()
        assert one.unit_tokens[u] == (contexts == c).sum()
    for name in ("unit_totals", "unit_counts", "unit_share", "unit_token_var", "unit_single"):
        assert torch.allclose(getattr(one, name).double(), getattr(two, name).double())
    stored = torch.where(values > 0, indices, -1)
    assert torch.equal(one.token_indices.long(), stored)
    assert torch.equal(one.token_context, contexts)


def test_units_wrap_past_max_units_and_tokens_stop_at_store_tokens():
    values, indices = random_topk(3, 40, 6, 2, seed=3)
    contexts = torch.arange(40) // 5  # 8 contexts
    stats = feed(values, indices, 6, contexts, [17], max_units=3, store_tokens=21)
    assert len(stats.unit_tokens) == 3 and stats.unit_tokens.tolist() == [15.0, 15.0, 10.0]
    assert stats.token_indices.shape[1] == 21 and len(stats.token_context) == 21
    assert torch.allclose(stats.unit_totals.double().sum(0), stats.totals, atol=1e-6)


def test_relative_thresholds_and_effective_layers_by_hand():
    """One latent with mass shares (0.5, 0.45, 0.04, 0.009, 0.001) over 5 layers."""
    shares = torch.tensor([0.5, 0.45, 0.04, 0.009, 0.001], dtype=torch.float64)
    totals = torch.stack([shares * 10, torch.tensor([0, 0, 3.0, 0, 0], dtype=torch.float64)], 1)
    m = sum_measures(totals[None], torch.zeros(1, 2), torch.zeros(1, 2))
    assert m["layers_ge1pct_mean"].item() == pytest.approx((3 + 1) / 2)
    assert m["layers_ge5pct_mean"].item() == pytest.approx((2 + 1) / 2)
    h = -(shares * shares.log()).sum()
    assert m["exp_entropy_mean"].item() == pytest.approx((h.exp().item() + 1) / 2)
    mu = (torch.arange(5) * shares).sum()
    sd = ((torch.arange(5) - mu) ** 2 * shares).sum().sqrt()
    assert m["layer_std_mean"].item() == pytest.approx((sd.item() + 0) / 2)  # one-layer std 0
    stats = LayerStats(5, 3)  # latent 2 never fires: left out of the means, as NaN in the original
    stats.totals = torch.cat([totals, torch.zeros(5, 1, dtype=torch.float64)], 1)
    f = latent_findings(stats, window_tokens=4, n_boot=10)
    assert f["relative_layers"]["ge1pct"]["hist"] == [0, 1, 0, 1, 0, 0]
    assert f["relative_layers"]["ge5pct"]["mean"] == pytest.approx(1.5)
    assert f["bootstrap"]["layer_std_mean"]["value"] == pytest.approx(sd.item() / 2)
    assert f["bootstrap"]["layer_std_mean"]["ci"] is None and f["windows"] is None


def test_the_original_ratio_and_its_decomposition_by_hand():
    """3 layers, 4 tokens of one context, one latent: token 0 at layer 0; token 1 at layers 1, 2
    equally; tokens 2, 3 inactive. q = mean_t p = (1/4, 1/8, 1/8), f = 1/2; q / f = (1/2, 1/4,
    1/4): mu = 3/4, sigma^2 = 5/4 - 9/16 = 11/16. var_0(q) = 5/8 - (3/8)^2 = 31/64 = f sigma^2 +
    f (1 - f) mu^2 = 11/32 + 9/64; 1-based: 15/8 - (7/8)^2 = 71/64 = 11/32 + (1/4)(49/16).
    B = (0 + 1/4) / (4 tokens x 1 latent) = 1/16: ratios 31/4 and 71/4."""
    values = torch.zeros(3, 4, 1)
    values[0, 0, 0] = 1.0
    values[1:, 1, 0] = 2.0
    indices = torch.zeros(3, 4, 1, dtype=torch.long)
    stats = LayerStats(3, 1)
    stats.update(values, indices, torch.zeros(4, dtype=torch.long))
    t = paper_terms(stats.unit_share, stats.unit_tokens, stats.unit_token_var)
    assert t["A0"].item() == pytest.approx(31 / 64) and t["A1"].item() == pytest.approx(71 / 64)
    assert t["B"].item() == pytest.approx(1 / 16) and t["firing_rate"].item() == 0.5
    assert t["spread"].item() == pytest.approx(11 / 32)
    assert t["location0"].item() == pytest.approx(9 / 64)
    assert t["location1"].item() == pytest.approx(49 / 64)
    assert (t["spread"] + t["location0"]).item() == pytest.approx(t["A0"].item())
    b = bootstrap_measures(stats, n_boot=20)
    assert b["paper_0based"]["value"] == pytest.approx(31 / 4)
    assert b["paper_1based"]["value"] == pytest.approx(71 / 4)
    # one batch = one context: the streamed per-batch definition gives the same number
    assert stats.compute(min_tokens=1)["summary"]["variance_ratio_paper"] == pytest.approx(31 / 4)
    assert b["frac_single_layer"]["value"] == pytest.approx(0.5)  # token 0: 1 layer; token 1: 2


def test_per_context_paper_ratio_equals_the_original_with_one_context_per_batch():
    values, indices = random_topk(5, 90, 20, 4, seed=4)
    contexts = torch.arange(90) // 30
    stats = feed(values, indices, 20, contexts, [30, 60])  # one batch per context
    ratios = [
        paper_variance_ratio_transcribed(dense_latents(values[:, s], indices[:, s], 20))
        for s in (slice(0, 30), slice(30, 60), slice(60, 90))
    ]
    expected = 1 / torch.stack(ratios).mean().item()
    b = bootstrap_measures(stats, n_boot=20)
    assert b["paper_0based"]["value"] == pytest.approx(expected, rel=1e-6)
    assert stats.compute()["summary"]["variance_ratio_paper"] == pytest.approx(expected, rel=1e-9)
    # the ratio of variances is compute()'s variance_ratio
    summary = stats.compute()["summary"]
    assert b["ratio_of_variances"]["value"] == pytest.approx(summary["variance_ratio"], rel=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_contexts():
    widths = []
    for n_ctx in (8, 64):
        values, indices = random_topk(6, 20 * n_ctx, 24, 3, seed=5, skew=0.6)
        stats = feed(values, indices, 24, torch.arange(20 * n_ctx) // 20, [])
        b = bootstrap_measures(stats, n_boot=200)
        for key in ("layer_std_mean", "exp_entropy_mean", "ratio_of_variances", "paper_0based"):
            lo, hi = b[key]["ci"]
            assert lo < b[key]["value"] < hi and b[key]["se"] > 0
        widths.append(b["layer_std_mean"]["ci"][1] - b["layer_std_mean"]["ci"][0])
    assert widths[1] < 0.6 * widths[0]  # ~ 1 / sqrt(8) expected


def test_a_subset_of_units_is_the_statistics_of_those_contexts_alone():
    values, indices = random_topk(4, 100, 16, 3, seed=6, skew=0.6)
    contexts = torch.arange(100) // 10
    full = feed(values, indices, 16, contexts, [33])
    first = feed(values[:, :40], indices[:, :40], 16, contexts[:40], [])
    sub, alone = bootstrap_measures(full, 50, units=4), bootstrap_measures(first, 50)
    for key in ("layer_std_mean", "layers_ge1pct_mean", "paper_1based", "frac_single_layer"):
        assert sub[key]["value"] == pytest.approx(alone[key]["value"], rel=1e-5)
    assert sub["n_units"] == 4
    assert activations_per_latent(full, 4) == pytest.approx(activations_per_latent(first))


def test_matched_units_and_sweep_measures_match_the_fewest_activations_per_latent():
    values, indices = random_topk(4, 120, 32, 4, seed=7, sparsity=0.0)
    contexts = torch.arange(120) // 10  # 12 contexts of 10 tokens, 160 activations each
    big = feed(values, indices, 32, contexts, [])  # 120 x 4 x 4 / 32 = 60 per latent
    small_values, small_indices = random_topk(4, 120, 8, 4, seed=8, sparsity=0.0)
    small = feed(small_values, small_indices, 8, contexts, [])  # 240 per latent
    assert activations_per_latent(big) == pytest.approx(60)
    assert matched_units(small, 60) == 3  # 3 contexts x 160 / 8 = 60
    assert matched_units(small, 61) == 4 and matched_units(big, 1e9) == 12
    out = sweep_measures({"r2": small, "r8": big}, n_boot=20)
    assert out["r2"]["reference_run"] == "r8" and out["r2"]["matched"]["n_units"] == 3
    assert out["r2"]["matched"]["activations_per_latent"] == pytest.approx(60)
    assert out["r8"]["matched"]["n_units"] == 12
    assert out["r8"]["matched"]["layer_std_mean"]["value"] == pytest.approx(
        out["r8"]["raw"]["layer_std_mean"]["value"], rel=1e-6
    )


def dense_window_layers(values, indices, n_latents):
    d = dense_latents(values, indices, n_latents) > 0  # (layer, token, latent)
    layers = d.any(1).sum(0)  # layers per latent
    per_pair = d.sum(0)  # (token, latent)
    mean = layers[layers > 0].double().mean().item()
    return mean, ((per_pair == 1).sum() / (per_pair > 0).sum()).item()


def test_window_measures_equal_a_dense_count_and_the_prompt_path():
    values, indices = random_topk(5, 14, 30, 4, seed=9)
    ours = window_layers(torch.where(values > 0, indices, -1), 30)
    assert ours == pytest.approx(dense_window_layers(values, indices, 30))
    stats = LayerStats(5, 30)
    stats.update(values, indices)  # the prompt's LayerStats: its mean layers per active latent
    summary = stats.compute(min_tokens=1)["summary"]
    assert ours[0] == pytest.approx(summary["mean_layers_active_ge1"])


def test_windows_stay_in_one_context_and_do_not_depend_on_batches():
    contexts = torch.tensor([0] * 5 + [1] * 3 + [2] * 6)
    starts = window_starts(contexts, 4, 100)
    assert starts.tolist() == [0, 1, 8, 9, 10]  # context 1 is too short
    drawn = window_starts(contexts, 4, 3, seed=1)
    assert len(set(drawn.tolist())) == 3 and set(drawn.tolist()) <= set(starts.tolist())
    assert torch.equal(drawn, window_starts(contexts, 4, 3, seed=1))
    values, indices = random_topk(4, 60, 12, 3, seed=10)
    ctx = torch.arange(60) // 15
    a = window_distribution(feed(values, indices, 12, ctx, [7, 31]), 5, n_windows=20)
    b = window_distribution(feed(values, indices, 12, ctx, [50]), 5, n_windows=20)
    assert torch.equal(a["mean_layers"], b["mean_layers"]) and len(a["starts"]) == 20
    for s, m in zip(a["starts"].tolist(), a["mean_layers"].tolist(), strict=True):
        assert ctx[s] == ctx[s + 4]
        assert m == pytest.approx(
            dense_window_layers(values[:, s : s + 5], indices[:, s : s + 5], 12)[0]
        )
    assert percentile_of(torch.tensor([1.0, 2.0, 3.0, 4.0]), 3.0) == pytest.approx(62.5)


def test_layer_shuffle_null_permutes_each_tokens_layers():
    n_layers, n_tok, n_latents = 4, 200, 3
    values = torch.zeros(n_layers, n_tok, 2)
    indices = torch.zeros(n_layers, n_tok, 2, dtype=torch.long)
    indices[:, :, 1] = 1
    values[2, :, 0] = 1.0  # latent 0: layer 2 only
    values[:, :, 1] = 1.0  # latent 1: every layer of every token
    stats = feed(values, indices, n_latents, torch.arange(n_tok) // 50, [])
    perm = layer_permutations(n_tok, n_layers)
    assert torch.equal(perm.sort(1).values, torch.arange(n_layers).expand(n_tok, -1))
    # dense reimplementation: token t's vector at layer l moves to layer perm[t, l]
    dense = dense_latents(values, indices, n_latents)
    moved = torch.zeros_like(dense)
    for t in range(n_tok):
        moved[perm[t], t] = dense[:, t]
    assert torch.allclose(stored_totals(stats, perm), moved.sum(1))
    assert torch.allclose(stored_totals(stats), stats.totals)
    null = entropy_null(stats)
    assert null["observed"].tolist() == pytest.approx([1.0, 4.0])
    assert null["shuffled"][1].item() == pytest.approx(4.0)  # uniform stays uniform
    assert 3.9 < null["shuffled"][0].item() < 4.0  # 200 tokens at random layers: near uniform
    m = torch.tensor([0.2, 0.2, 0.4, 0.2])  # layer totals 200, 200, 400, 200
    assert null["marginal"] == pytest.approx(math.exp(-(m * m.log()).sum().item()))


def test_findings_and_their_flat_numbers():
    values, indices = random_topk(5, 120, 20, 3, seed=11, skew=0.6)
    stats = feed(values, indices, 20, torch.arange(120) // 30, [64])
    prompt = {"mean_layers": 2.0, "frac_single_layer": 0.5}
    f = latent_findings(stats, window_tokens=6, prompt=prompt, n_windows=50, n_boot=30)
    w = f["windows"]
    assert w["n_windows"] == 50 and len(w["mean_layers"]) == 50
    assert w["prompt_percentile"] == pytest.approx(percentile_of(torch.tensor(w["mean_layers"]), 2))
    assert w["test_set_mean_layers"] == stats.compute()["summary"]["mean_layers_active_ge1"]
    assert sum(f["effective_layers"]["null"]["hist"]["shuffled"]) == 20
    flat = flat_findings(f)
    assert flat["prompt_mean_layers"] == 2.0 and flat["layers_ge1pct_mean"] <= 5
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["variance_ratio_paper_1based"] > flat["variance_ratio_paper_0based"]  # A grows


def test_saved_grouped_statistics_round_trip_and_old_files_load(tmp_path):
    values, indices = random_topk(4, 40, 10, 3, seed=12)
    stats = feed(values, indices, 10, torch.arange(40) // 10, [13])
    stats.save(tmp_path / "s.pt")
    back = LayerStats.load(tmp_path / "s.pt")
    for name in ("unit_totals", "unit_counts", "unit_share", "token_indices", "token_values"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert back.unit_context == stats.unit_context
    assert bootstrap_measures(back, 30) == bootstrap_measures(stats, 30)
    new = {"max_units", "store_tokens", "token_indices", "token_values", "token_context"}
    old = {k: v for k, v in vars(stats).items() if not k.startswith("unit_") and k not in new}
    assert "token_var_sum" in old and "token_count" in old
    torch.save(old, tmp_path / "old.pt")
    legacy = LayerStats.load(tmp_path / "old.pt")
    assert not legacy.has_groups
    assert legacy.compute()["summary"] == stats.compute()["summary"]
    b = bootstrap_measures(legacy)
    assert b["paper_0based"]["value"] is None and b["layer_std_mean"]["ci"] is None
    assert latent_findings(legacy, 4, n_boot=5)["windows"] is None


def test_training_length_table_and_sweep_tokens_read_what_exists(tmp_path):
    params = config.load(ROOT / "params.yaml")
    run = params.analysis.baseline_run
    values, indices = random_topk(4, 60, 10, 3, seed=13)
    stats = feed(values, indices, 10, torch.arange(60) // 20, [])
    for tokens in (params.train.snapshot_tokens[0], None):
        path = paths.latent_stats_path(params, run, tmp_path, tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    rows = by_training_length(params, tmp_path, window_tokens=5, n_boot=10)
    assert [r["final"] for r in rows] == [False, True]
    assert rows[0]["tokens"] == params.train.snapshot_tokens[0]
    assert rows[0]["layer_std_mean"] == rows[1]["layer_std_mean"] > 0
    assert sweep_tokens(params, run, tmp_path) is None  # no snapshot at the comparison length
    at = params.analysis.compare_tokens
    stats.save(paths.latent_stats_path(params, run, tmp_path, at))
    budget = params.sweep[run].train_tokens or params.data.train_tokens
    snapshot = at < budget and at in params.train.snapshot_tokens
    assert sweep_tokens(params, run, tmp_path) == (at if snapshot else None)
    other = next(n for n in params.sweep if n != run)
    assert sweep_tokens(params, other, tmp_path) is None


def fake_stage_result(params, out_dir):
    """What `latents_over_layers` returns, built from constructed statistics (no model, no SAE)."""
    runs = [params.analysis.baseline_run, params.analysis.lens_run]
    n_layers, n_latents = 6, 24
    values, indices = random_topk(n_layers, 200, n_latents, 3, seed=14, skew=0.6)
    stats = feed(values, indices, n_latents, torch.arange(200) // 25, [90])
    prompt = {"mean_layers": 1.5, "frac_single_layer": 0.7}
    findings = latent_findings(stats, window_tokens=6, prompt=prompt, n_windows=40, n_boot=20)
    old = LayerStats(n_layers, n_latents)  # the lens run: statistics saved without context ids
    old.update(values, indices)
    results = {
        runs[0]: {"summary": summary(stats), "findings": findings},
        runs[1]: {"summary": summary(old), "findings": latent_findings(old, 6, n_boot=5)},
    }
    measured = sweep_measures({"r2": stats, "r8": old}, n_boot=10)
    sweep = {
        "R": [
            {"run": n, "R": r, "k": 4, "tokens": None} | measured[n]
            for n, r in (("r2", 2.0), ("r8", 8.0))
        ]
    }
    for tokens in (params.train.snapshot_tokens[0], None):
        path = paths.latent_stats_path(params, runs[0], out_dir, tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return {
        "runs": runs,
        "label": {runs[0]: "no lens", runs[1]: "with tuned lens"},
        "stats": {r: stats for r in runs},
        "computed": {r: stats.compute() for r in runs},
        "prompts": {r: [{"n_tokens": 6}] for r in runs},
        "results": results,
        "activity": {},
        "sweep": sweep,
        "by_tokens": by_training_length(params, out_dir, 6, n_boot=5),
        "metrics": {r: flat_findings(results[r]["findings"]) for r in runs},
        "n_layers": n_layers,
    }


def test_notebook_09_figure_cells_run_on_a_stage_result(tmp_path, monkeypatch):
    """The cells that draw the new measures, run on `fake_stage_result` (Agg backend)."""

    matplotlib.use("Agg")
    nb = json.loads((ROOT / "notebooks" / "09_latents_over_layers.ipynb").read_text())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    cells = {c["id"]: "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"}
    params = config.load(ROOT / "params.yaml")
    monkeypatch.setattr(stage, "latents_over_layers", lambda P, out: fake_stage_result(P, out))
    scope = {"params_path": ROOT / "params.yaml", "out_dir": tmp_path}
    exec(cells["c02"], scope)  # setup
    exec(cells["c03"], scope)  # imports and the (faked) stage
    scope["n_layers"] = scope["L"]["n_layers"]
    for name in ("c08b", "c08c", "c08d", "c08e", "c08f", "c08g"):
        exec(cells[name], scope)
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    for name in ("relative_thresholds", "effective_layers", "windows", "sweep_layer_std"):
        assert {f"latents_{name}.png", f"latents_{name}.pdf"} <= figures
    assert "latents_by_tokens.png" in figures and len(scope["by_tokens"]) == 2
    assert params.analysis.baseline_run == scope["base_run"]


def test_stage_writes_the_new_measures_from_statistics_files(tmp_path, monkeypatch):
    """`latents_over_layers` on statistics files in a tmp dir (model and SAEs stubbed)."""

    params = config.load(ROOT / "params.yaml")
    n_layers, n_latents = 5, 16
    for i, run in enumerate(params.sweep):
        # R = 2 runs get 1/4 of the latents' share of activations of R = 8 ones: fewer latents
        n = max(4, int(n_latents * params.sweep[run].expansion_factor / 8))
        values, indices = random_topk(n_layers, 160, n, 3, seed=20 + i, skew=0.6)
        stats = feed(values, indices, n, torch.arange(160) // 20, [70])
        for tokens in (None, params.train.snapshot_tokens[1]):
            path = paths.latent_stats_path(params, run, tmp_path, tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path)
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=n_layers))
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(stage, "load_run", lambda *a, **k: (MLSAE(8, 32, 4), None))

    def prompt(model, sae, text, lens):
        ones = LayerStats(n_layers, 32)
        ones.update(torch.ones(n_layers, 6, 1), torch.zeros(n_layers, 6, 1, dtype=torch.long))
        window = {"mean_layers": 5.0, "frac_single_layer": 0.0}
        return {"n_tokens": 6, "stats": ones.compute(1), "window": window, "totals": None}

    monkeypatch.setattr(stage, "prompt_activations", prompt)
    out = stage.latents_over_layers(params, tmp_path, n_boot=20)
    written = json.loads(paths.results(tmp_path, "latents.json").read_text())
    base = params.analysis.baseline_run
    f = written["runs"][base]["findings"]
    assert f["windows"]["n_tokens"] == 6 and f["windows"]["prompt"]["mean_layers"] == 5.0
    assert f["bootstrap"]["layer_std_mean"]["ci"] is not None
    r_group = written["sweep"]["R"]
    assert [p["R"] for p in r_group] == sorted(p["R"] for p in r_group)
    reference = max(r_group, key=lambda p: p["R"])["run"]
    assert all(p["reference_run"] == reference for p in r_group)
    smallest = min(r_group, key=lambda p: p["R"])
    assert smallest["matched"]["n_units"] < 8  # fewer contexts for the smaller SAE
    assert [row["tokens"] for row in written["by_tokens"]] == [
        params.train.snapshot_tokens[1],
        params.sweep[base].train_tokens or params.data.train_tokens,
    ]
    metrics = json.loads(paths.metrics(tmp_path, "latents.json").read_text())
    assert metrics[base]["prompt_mean_layers"] == 5.0 and "layer_std_mean" in metrics[base]
    assert set(metrics["sweep_layer_std"]["R"]) == {p["run"] for p in r_group}
    assert out["by_tokens"] == written["by_tokens"]
