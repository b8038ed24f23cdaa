import pytest
import torch

from mlsae.activations import residual_stream
from mlsae.metrics import evaluate
from mlsae.patching import delta_ce_kl, stride_mask
from mlsae.reconstruction import ReconstructionStats
from mlsae.sae import MLSAE
from mlsae.similarity import mmcs


def test_reconstruction_stats_hand_computed():
    stats = ReconstructionStats(n_layers=1, d_model=2, n_latents=4)
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])
    recons = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    values = torch.tensor([[[2.0, 0.0], [1.0, 0.5]]])
    indices = torch.tensor([[[0, 1], [2, 0]]])
    # split into two batches to check the streaming accumulation
    stats.update(x[:, :1], recons[:, :1], values[:, :1], indices[:, :1])
    stats.update(x[:, 1:], recons[:, 1:], values[:, 1:], indices[:, 1:])
    out = stats.compute()
    assert out["fvu"] == pytest.approx([0.5])  # 2 / 4
    assert out["l0"] == pytest.approx([1.5])  # (1 + 2) / 2
    assert out["l1"] == pytest.approx([1.75])  # (2 + 1.5) / 2
    assert out["inactive_fraction"] == pytest.approx([0.5])  # latents 0 and 2 fired


def test_mmcs_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert mmcs(a, b) == pytest.approx(2**-0.5)
    # self-comparison excludes self-pairs and looks at every other latent, both directions
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mmcs(c) == pytest.approx(2**-0.5)


def next_token_ce(logits, tokens):
    """Reference: the cross-entropy of predicting ``tokens[:, 1:]`` by an explicit log-softmax."""
    logp = logits[:, :-1].double().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _naive_patched_ce(model, tokens, layer, replace):
    def hook(act, hook):
        out = act.clone()
        out[:, 1:] = replace(act[:, 1:])  # every position but BOS
        return out

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)])
    return logits


def test_delta_ce_equals_naive_full_forward_with_replacement_hook(tiny_model):
    torch.manual_seed(1)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])
    noise = torch.randn(32) * 0.5

    def reconstruct(x, layer):
        return x * 0.7 + noise

    res = delta_ce_kl(tiny_model, tokens, reconstruct)
    clean = tiny_model(tokens)
    clean_ce = next_token_ce(clean, tokens)
    for layer in range(3):
        logits = _naive_patched_ce(tiny_model, tokens, layer, lambda a: a * 0.7 + noise)
        expected = (next_token_ce(logits, tokens) - clean_ce)[:, 1:].mean()  # not from BOS
        assert (res["delta_ce"][layer] / res["n"]).item() == pytest.approx(expected.item(), 1e-5)
        p = clean[:, :-1].double().log_softmax(-1)
        q = logits[:, :-1].double().log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1)[:, 1:].mean()
        assert (res["kl"][layer] / res["n"]).item() == pytest.approx(kl.item(), rel=1e-5)
    assert res["n"].item() == 12  # mean per predicted token, not a sum over positions


def test_evaluate_identity_reconstruction_gives_zero(tiny_model):
    class Identity(MLSAE):
        def forward(self, x):
            out = super().forward(x)
            return out._replace(recons=x)

    sae = Identity(32, 64, 4)
    tokens = [torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])]
    res = evaluate(sae, tiny_model, tokens)
    assert res["mean"]["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert res["mean"]["delta_ce"] == pytest.approx(0.0, abs=1e-9)
    assert res["mean"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert len(res["per_layer"]["fvu"]) == 3 and res["n_tokens"] == 7


def test_evaluate_matches_direct_computation(tiny_model):
    torch.manual_seed(0)
    sae = MLSAE(32, 64, 4).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    res = evaluate(sae, tiny_model, [tokens])
    x = residual_stream(tiny_model, tokens)[:, 0, 1:]  # (layer, token, d) without BOS
    recons = sae(x).recons
    for layer in range(3):
        err = (x[layer] - recons[layer]).pow(2).sum()
        total = (x[layer] - x[layer].mean(0)).pow(2).sum()
        assert res["per_layer"]["fvu"][layer] == pytest.approx((err / total).item(), rel=1e-4)


def test_residual_drift_hand_computed(tmp_path):
    import json

    import numpy as np

    from mlsae.activations import ActivationCache
    from mlsae.drift import residual_drift

    # layer 0: e1 and e2; layer 1: the same (cos 1); layer 2: rotated by 90 degrees (cos 0)
    acts = np.array([[[1, 0], [0, 1]], [[2, 0], [0, 2]], [[0, 3], [-3, 0]]], dtype=np.float16)
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "s.npy", acts)
    np.save(tmp_path / "c" / "s.tokens.npy", np.zeros(2, dtype=np.int32))
    meta = {"shards": ["s"], "n_layers": 3, "d_model": 2, "n_tokens": 2}
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    out = residual_drift(ActivationCache(tmp_path / "c"), 10)
    assert out["cosine"] == pytest.approx([1.0, 0.0])
    assert out["norm"] == pytest.approx([1.0, 2.0, 3.0])
    # centring: layer means (0.5, 0.5), (1, 1), (-1.5, 1.5); centred pairs stay aligned/orthogonal
    assert out["cosine_centred"] == pytest.approx([1.0, 0.0], abs=1e-12)


def test_evaluate_on_given_vectors_equals_evaluate_on_model_residuals(tiny_model):
    from mlsae.latents import LayerStats

    torch.manual_seed(0)
    sae = MLSAE(32, 64, 4).eval()
    batches = [torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]]), torch.tensor([[1, 12, 13, 14, 15, 16]])]
    ref = evaluate(sae, tiny_model, batches, ce_batches=1)
    vectors = [residual_stream(tiny_model, t)[:, 0, 1:] for t in batches]  # BOS dropped
    stats = LayerStats(3, 64)
    got = evaluate(
        sae, tiny_model, iter(batches), ce_batches=1, vectors=vectors, latent_stats=stats
    )
    for key in ("fvu", "l0", "l1", "delta_ce", "kl"):
        assert got["per_layer"][key] == pytest.approx(ref["per_layer"][key], rel=1e-6), key
    assert got["n_tokens"] == ref["n_tokens"] == 12 and got["n_ce_tokens"] == ref["n_ce_tokens"]
    # the latent statistics are those of the same activations
    manual = LayerStats(3, 64)
    for x in vectors:
        manual.update(*sae.encode(x))
    assert stats.n_tokens == 12 and torch.equal(stats.counts, manual.counts)
    assert torch.allclose(stats.totals, manual.totals)


def test_evaluate_on_vectors_runs_the_model_only_on_the_delta_ce_batches(tiny_model):
    sae = MLSAE(32, 64, 4).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])

    def batches():
        yield tokens
        raise AssertionError("a batch past ce_batches was read")

    vectors = [torch.randn(3, 5, 32)]
    res = evaluate(sae, tiny_model, batches(), ce_batches=1, vectors=vectors)
    assert res["n_tokens"] == 5 and res["n_ce_tokens"] == 6  # 7 predictions, not from BOS


def test_fvu_and_fvu_paper_hand_computed():
    """Two tokens, two dims, one error of 1 (worked by hand in the comments)."""
    x = torch.tensor([[[1.0, 3.0], [3.0, 5.0]]])  # (layer, token, d)
    recons = torch.tensor([[[1.0, 3.0], [3.0, 4.0]]])
    stats = ReconstructionStats(1, 2, 4)
    stats.update(x, recons, torch.ones(1, 2, 1))
    out = stats.compute()
    # ours: SSE 1 / sum ||x - (2, 4)||^2 = 1 / 4
    assert out["fvu"] == pytest.approx([0.25])
    # paper: mean sq. error 1/4 over 4 entries / unbiased var of {1, 3, 3, 5} = 8/3 -> 3/32
    assert out["fvu_paper"] == pytest.approx([3 / 32])


def paper_fvu_transcribed(batches):
    """The original's LayerwiseFVU written out directly: sum_b mean(err^2) / sum_b var(x)."""
    mse = sum(torch.mean((r - x) ** 2, dim=(1, 2)) for x, r in batches)
    var = sum(torch.var(x, dim=(1, 2)) for x, _ in batches)
    return (mse / var).tolist()


def test_fvu_paper_equals_the_original_formula_on_several_batches():
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randn(3, 1, 8, generator=gen) * 5  # large per-dimension offsets
    batches = []
    stats = ReconstructionStats(3, 8, 4)
    for n in (5, 9, 7):
        x = (offsets + torch.randn(3, n, 8, generator=gen)).double()
        r = x + 0.3 * torch.randn(3, n, 8, generator=gen).double()
        batches.append((x, r))
        stats.update(x, r, torch.ones(3, n, 1))
    out = stats.compute()
    assert out["fvu_paper"] == pytest.approx(paper_fvu_transcribed(batches), rel=1e-12)
    assert all(p < f for p, f in zip(out["fvu_paper"], out["fvu"], strict=True))


def test_bootstrap_fvu_replicates_are_the_fvu_of_the_resampled_contexts():
    from mlsae import bootstrap

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 3, generator=gen).double()
    r = x + 0.5 * torch.randn(2, 12, 3, generator=gen).double()
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    stats = ReconstructionStats(2, 3, 4)
    stats.update(x, r, torch.ones(2, 12, 1), groups=groups)
    sums = stats.group_sums()
    w = bootstrap.weights(4, n_boot=5, seed=3)
    reps = bootstrap.fvu_replicates(*sums, w)
    for b in range(5):  # resample contexts by hand: repeat each context's tokens w times
        idx = torch.cat(
            [torch.nonzero(groups == c).flatten().repeat(int(w[b, c])) for c in range(4)]
        )
        direct = ReconstructionStats(2, 3, 4)
        direct.update(x[:, idx], r[:, idx], torch.ones(2, len(idx), 1))
        assert reps[b].tolist() == pytest.approx(direct.compute()["fvu"], rel=1e-10)
    # with every weight 1 a replicate is the plain FVU
    ones = bootstrap.fvu_replicates(*sums, torch.ones(1, 4, dtype=torch.float64))
    assert ones[0].tolist() == pytest.approx(stats.compute()["fvu"], rel=1e-12)
    se, se_mean = bootstrap.standard_errors(bootstrap.fvu_replicates(*sums, bootstrap.weights(4)))
    assert len(se) == 2 and all(s > 0 for s in se) and se_mean > 0


def test_bootstrap_fvu_is_the_reconstruction_stats_fvu_on_the_same_data():
    """One FVU definition: the bootstrap's replicate of a token set is ReconstructionStats's FVU.

    Several batches, contexts split across batches, large per-dimension offsets.
    """
    from mlsae import bootstrap

    gen = torch.Generator().manual_seed(2)
    offsets = torch.randn(3, 1, 8, generator=gen) * 20
    stats = ReconstructionStats(3, 8, 4)
    xs, rs, gs, start = [], [], [], 0
    for n in (10, 7, 13):
        x = (offsets + torch.randn(3, n, 8, generator=gen)).double()
        r = x + 0.3 * torch.randn(3, n, 8, generator=gen).double()
        groups = torch.arange(start, start + n) // 6  # 5 contexts, 3 of them across batches
        stats.update(x, r, torch.ones(3, n, 1), groups=groups)
        xs, rs, gs, start = [*xs, x], [*rs, r], [*gs, groups], start + n
    sums = stats.group_sums()
    assert len(sums[3]) == 5 and sums[3].tolist() == [6, 6, 6, 6, 6]
    ones = bootstrap.fvu_replicates(*sums, torch.ones(1, 5, dtype=torch.float64))
    assert ones[0].tolist() == pytest.approx(stats.compute()["fvu"], rel=1e-12)
    # a replicate keeping contexts 0, 2 and 4 once each is the FVU of their tokens alone
    x, r, groups = torch.cat(xs, 1), torch.cat(rs, 1), torch.cat(gs)
    w = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    kept = torch.isin(groups, torch.tensor([0, 2, 4]))
    direct = ReconstructionStats(3, 8, 4)
    direct.update(x[:, kept], r[:, kept], torch.ones(3, int(kept.sum()), 1))
    reps = bootstrap.fvu_replicates(*sums, w)
    assert reps[0].tolist() == pytest.approx(direct.compute()["fvu"], rel=1e-10)


def test_bootstrap_weights_resample_each_unit_set_with_replacement():
    from mlsae import bootstrap

    w = bootstrap.weights(7, n_boot=50, seed=0)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w == 0).any()
    assert torch.equal(w, bootstrap.weights(7, n_boot=50, seed=0))
    reps = bootstrap.mean_replicates(
        torch.tensor([[2.0], [4.0]]),
        torch.tensor([1.0, 3.0]),
        torch.tensor([[1.0, 1.0], [2.0, 0.0]]),
    )
    assert reps[:, 0].tolist() == pytest.approx([6 / 4, 4 / 2])


def test_sweep_differences_compare_steps_with_their_noise():
    from mlsae.stages.sweeps import sweep_differences

    runs = {
        "a": {"mean": {"fvu": 0.30, "fvu_se": 0.01, "delta_ce": 0.80, "delta_ce_se": 0.05}},
        "b": {"mean": {"fvu": 0.25, "fvu_se": 0.01, "delta_ce": 0.78, "delta_ce_se": 0.05}},
    }
    rows = sweep_differences(runs, {"R": ["a", "b"]})["R"]
    fvu, ce = rows
    assert fvu["metric"] == "fvu" and fvu["difference"] == pytest.approx(-0.05)
    assert fvu["se"] == pytest.approx(0.01 * 2**0.5) and not fvu["within_noise"]
    assert ce["metric"] == "delta_ce" and ce["within_noise"]  # 0.02 < 2 x 0.0707


def test_delta_ce_in_bf16_is_close_to_fp32_and_really_bf16(tiny_model):
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])

    def noisy(x, layer):
        return x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(layer))

    a = delta_ce_kl(tiny_model, tokens, noisy)
    b = delta_ce_kl(tiny_model, tokens, noisy, bf16=True)
    assert not torch.equal(a["delta_ce"], b["delta_ce"])  # the autocast took effect
    torch.testing.assert_close(b["delta_ce"] / b["n"], a["delta_ce"] / a["n"], atol=0.05, rtol=0.05)


def test_mean_replicates_with_counts_per_unit_and_layer_hand_computed():
    from mlsae import bootstrap

    sums = torch.tensor([[2.0, 0.0], [4.0, 6.0]])
    counts = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # unit 0 not measured at layer 1
    w = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    reps = bootstrap.mean_replicates(sums, counts, w)
    assert reps[0].tolist() == pytest.approx([6 / 4, 6 / 2])
    assert reps[1, 0].item() == pytest.approx(2.0) and reps[1, 1].isnan()  # 0 / 0: no unit
    assert reps[2].tolist() == pytest.approx([8 / 6, 12 / 4])
    # stratified weights: each stratum keeps its size; one stratum is the plain bootstrap
    strata = torch.tensor([0, 1, 0, 1, 1])
    ws = bootstrap.weights(5, 40, 0, strata=strata)
    assert (ws[:, [0, 2]].sum(1) == 2).all() and (ws[:, [1, 3, 4]].sum(1) == 3).all()
    assert torch.equal(bootstrap.weights(5, 40, 0, strata=torch.zeros(5)), bootstrap.weights(5, 40))


class GroupsSpy:
    """Stands in for `mlsae.latents.LayerStats`: records the groups each update gets."""

    def __init__(self):
        self.groups = []

    def update(self, values, indices, groups=None):
        self.groups.append(groups)


def test_evaluate_under_a_stride_design_keeps_per_context_sums(tiny_model):
    torch.manual_seed(0)
    sae = MLSAE(32, 64, 4).eval()
    gen = torch.Generator().manual_seed(0)
    contexts = torch.cat(
        [torch.ones(5, 1, dtype=torch.long), torch.randint(4, 60, (5, 7), generator=gen)], 1
    )
    ids = torch.tensor([10, 11, 12, 13, 14])  # global context ids
    spy = GroupsSpy()
    res = evaluate(
        sae, tiny_model, contexts.split(2), ce_stride=3, ce_context_ids=ids, latent_stats=spy
    )
    # reference: every pair patched, then only the pairs l = c (mod 3) kept
    full = delta_ce_kl(tiny_model, contexts, lambda x, ly: sae(x).recons)
    mask = stride_mask(ids, [0, 1, 2], 3)  # (context, layer)
    pc = res["per_context"]
    assert pc["context"] == ids.tolist() and pc["layers"] == [0, 1, 2]
    n_pred = torch.tensor(pc["n_pred"], dtype=torch.float64)
    design = {"stride": 3, "contexts": 5, "pairs": 5}
    assert torch.equal(n_pred > 0, mask) and res["ce_design"] == design
    sums = torch.tensor(pc["delta_ce_sum"], dtype=torch.float64)
    torch.testing.assert_close(
        sums, torch.where(mask, full["delta_ce_rows"].T, 0), atol=1e-5, rtol=1e-5
    )
    for layer in range(3):  # per-layer mean over the contexts patched there
        expected = (sums[:, layer].sum() / n_pred[:, layer].sum()).item()
        assert res["per_layer"]["delta_ce"][layer] == pytest.approx(expected, rel=1e-12)
    assert res["mean"]["delta_ce"] == pytest.approx(sum(res["per_layer"]["delta_ce"]) / 3)
    assert len(res["per_layer"]["delta_ce_se"]) == 3 and res["mean"]["delta_ce_se"] > 0
    # FVU per context (from the model's residuals here): sum_c sse / D is the FVU
    sse = torch.tensor(pc["sse"], dtype=torch.float64)
    denom = torch.tensor(res["fvu_denominator"]["raw"], dtype=torch.float64)
    assert (
        res["fvu_denominator"]["space"] == res["fvu_denominator"]["raw"] and pc["sse_raw"] is None
    )
    assert (sse.sum(0) / denom).tolist() == pytest.approx(res["per_layer"]["fvu"], rel=1e-9)
    assert pc["n_tokens"] == [7.0] * 5  # BOS dropped
    # the latent statistics got each token's context id
    assert torch.cat(spy.groups).tolist() == ids.repeat_interleave(7).tolist()
