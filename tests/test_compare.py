"""Paired comparisons (`mlsae.compare`), the stride design and the stratified bootstrap."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from mlsae import bootstrap
from mlsae.compare import (
    compare_fvu,
    compare_means,
    compare_runs,
    per_context_rows,
    read_per_context,
    summarize,
)
from mlsae.patching import delta_ce_kl, stride_mask, stride_rows
from mlsae.sae import MLSAE


def test_summarize_hand_computed():
    reps_a = torch.zeros(5, dtype=torch.float64)
    reps_b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    out = summarize(reps_a, reps_b, a=0.0, b=3.0)
    assert out["difference"] == 3.0
    assert out["se"] == pytest.approx(2.5**0.5)  # sd of 1..5, ddof 1
    assert out["se_unpaired"] == pytest.approx(2.5**0.5)  # var(a*) = 0
    assert out["ci_low"] == pytest.approx(1.1) and out["ci_high"] == pytest.approx(4.9)  # linear
    assert out["p"] == pytest.approx(2 * (1 + 0) / 6)  # no replicate <= 0
    assert out["mde80"] == pytest.approx((1.959964 + 0.841621) * 2.5**0.5, rel=1e-5)
    assert out["verdict"] == "b higher"
    flip = summarize(reps_b, reps_a, a=3.0, b=0.0)
    assert flip["verdict"] == "b lower" and flip["ci_high"] == pytest.approx(-1.1)
    mixed = summarize(reps_a, reps_b - 3, a=0.0, b=0.0)  # -2..2: the interval holds 0
    assert mixed["verdict"] == "no detectable difference"
    assert mixed["p"] == 1.0  # 3 replicates on each side of 0: 2 (1 + 3) / 6 > 1


def test_compare_means_and_fvu_hand_computed():
    # 2 contexts, 2 layers, every pair patched; a: per-layer means (1+3)/(1+1)=2, (2+2)/2=2
    sums_a = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    sums_b = torch.tensor([[2.0, 2.0], [6.0, 4.0]])
    counts = torch.ones(2, 2)
    out = compare_means(sums_a, counts, sums_b, counts, n_boot=50)
    assert out["a"] == pytest.approx(2.0) and out["b"] == pytest.approx((4 + 3) / 2)
    assert out["difference"] == pytest.approx(1.5) and out["n_pairs"] == 4
    # b only patched at layer 0 of context 0 and layer 1 of context 1: common pairs are those
    counts_b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = compare_means(sums_a, counts, sums_b, counts_b, n_boot=50)
    assert out["a"] == pytest.approx((1 / 1 + 2 / 1) / 2)  # layer 0: ctx 0; layer 1: ctx 1
    assert out["b"] == pytest.approx((2 / 2 + 4 / 1) / 2)
    assert out["n_pairs"] == 2 and out["n_contexts"] == 2 and out["n_layers"] == 2
    # FVU: SSE per context, D fixed: a = (1 + 3) / 8, b = (1 + 1) / 8
    fvu = compare_fvu(
        torch.tensor([[1.0], [3.0]]),
        torch.tensor([[1.0], [1.0]]),
        torch.tensor([2.0, 2.0]),
        torch.tensor([8.0]),
        n_boot=50,
    )
    assert fvu["a"] == pytest.approx(0.5) and fvu["b"] == pytest.approx(0.25)
    assert fvu["difference"] == pytest.approx(-0.25)


def brute_force_means(sums_a, counts_a, sums_b, counts_b, w):
    """Each replicate written out: repeat every context w_c times, then per-layer means."""
    common = (counts_a > 0) & (counts_b > 0)
    out = []
    for row in w:
        picked = [c for c in range(len(row)) for _ in range(int(row[c]))]
        diffs = []
        for layer in range(sums_a.shape[1]):
            used = [c for c in picked if common[c, layer]]
            if not common[:, layer].any():
                continue
            ma = sum(sums_a[c, layer] for c in used) / sum(counts_a[c, layer] for c in used)
            mb = sum(sums_b[c, layer] for c in used) / sum(counts_b[c, layer] for c in used)
            diffs.append(mb - ma)
        out.append(sum(diffs) / len(diffs))
    return torch.tensor(out, dtype=torch.float64)


def test_compare_means_is_the_plain_paired_bootstrap_under_a_stride_design():
    gen = torch.Generator().manual_seed(0)
    n_ctx, layers = 12, list(range(6))
    ids = torch.arange(n_ctx)
    counts_a = stride_mask(ids, layers, 3).double() * torch.randint(5, 9, (n_ctx, 1), generator=gen)
    counts_b = stride_mask(ids, layers, 6).double() * torch.randint(5, 9, (n_ctx, 1), generator=gen)
    sums_a = torch.randn(n_ctx, 6, generator=gen, dtype=torch.float64) * counts_a
    sums_b = torch.randn(n_ctx, 6, generator=gen, dtype=torch.float64) * counts_b
    out = compare_means(sums_a, counts_a, sums_b, counts_b, n_boot=200, seed=4)
    common = (counts_a > 0) & (counts_b > 0)
    w = bootstrap.weights(n_ctx, 200, 4, strata=bootstrap.design_strata(common))
    ref = brute_force_means(sums_a, counts_a, sums_b, counts_b, w)
    assert out["se"] == pytest.approx(ref.std().item(), rel=1e-9)
    lo, hi = torch.quantile(ref, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi), rel=1e-9)
    # the stratified weights resample each stride class among itself: 2 contexts per class
    for s in range(6):
        assert (w[:, ids % 6 == s].sum(1) == 2).all()
    assert not torch.equal(w, bootstrap.weights(n_ctx, 200, 4))


def test_compare_fvu_is_the_plain_paired_bootstrap_of_token_errors():
    gen = torch.Generator().manual_seed(1)
    n_ctx, per = 6, [3, 5, 4, 2, 6, 3]
    err_a = [torch.rand(n, 2, generator=gen, dtype=torch.float64) for n in per]  # (token, layer)
    err_b = [e * 0.8 + 0.1 * torch.rand(e.shape, generator=gen) for e in err_a]
    denom = torch.tensor([10.0, 7.0], dtype=torch.float64)
    sse_a = torch.stack([e.sum(0) for e in err_a])
    sse_b = torch.stack([e.sum(0) for e in err_b])
    n_tok = torch.tensor(per, dtype=torch.float64)
    out = compare_fvu(sse_a, sse_b, n_tok, denom, n_boot=100, seed=2)
    w = bootstrap.weights(n_ctx, 100, 2)
    total = sum(per)
    reps = []
    for row in w:  # concatenate the resampled contexts' tokens, D fixed per token
        pick = [c for c in range(n_ctx) for _ in range(int(row[c]))]
        ta, tb = torch.cat([err_a[c] for c in pick]), torch.cat([err_b[c] for c in pick])
        fa = (ta.mean(0) / (denom / total)).mean()
        fb = (tb.mean(0) / (denom / total)).mean()
        reps.append((fb - fa).item())
    assert out["se"] == pytest.approx(
        torch.tensor(reps, dtype=torch.float64).std().item(), rel=1e-9
    )
    direct = ((sse_b.sum(0) - sse_a.sum(0)) / denom).mean().item()  # (SSE_b - SSE_a) / D
    assert out["difference"] == pytest.approx(direct, rel=1e-12)


def test_paired_se_is_smaller_than_unpaired_when_runs_share_a_context_effect():
    gen = torch.Generator().manual_seed(3)
    n_ctx = 32
    effect = 2.0 * torch.randn(n_ctx, 1, generator=gen, dtype=torch.float64)  # hard contexts
    counts = torch.full((n_ctx, 4), 100.0, dtype=torch.float64)
    a = (effect + 0.05 * torch.randn(n_ctx, 4, generator=gen, dtype=torch.float64)) * counts
    b = (effect + 0.1 + 0.05 * torch.randn(n_ctx, 4, generator=gen, dtype=torch.float64)) * counts
    out = compare_means(a, counts, b, counts)
    assert out["se"] < 0.1 * out["se_unpaired"]
    assert out["verdict"] == "b higher" and out["difference"] == pytest.approx(0.1, abs=0.03)
    # the unpaired SE would not have detected the step
    assert abs(out["difference"]) < 2 * out["se_unpaired"]


def test_stride_design_pairs_and_subset():
    ids, layers = torch.arange(6), list(range(6))
    m3 = stride_mask(ids, layers, 3)
    expected = {(c, ly) for c in range(6) for ly in range(6) if ly % 3 == c % 3}
    assert {tuple(p) for p in torch.nonzero(m3).tolist()} == expected
    assert m3.any(0).all() and m3.any(1).all()  # every layer and every context measured
    m6 = stride_mask(ids, layers, 6)
    assert torch.equal(m6, torch.eye(6, dtype=torch.bool))
    assert not (m6 & ~m3).any() and m6.sum() < m3.sum()  # stride 6 is a subset of stride 3
    assert stride_mask(ids, layers, 1).all()
    # offset contexts (a later batch): the rows of a batch of contexts 4..7 at layer 1
    rows = stride_rows(torch.tensor([4, 5, 6, 7]), 3)
    assert rows(1).tolist() == [0, 3]  # contexts 4 and 7
    assert rows(2).tolist() == [1] and rows(3).tolist() == [2]  # context 5; context 6


def test_delta_ce_rows_runs_only_the_selected_rows(tiny_model):
    tokens = torch.tensor(
        [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18], [1, 7, 9, 11, 13, 5, 6, 8]]
    )

    def noisy(x, layer):
        return x * 0.8 + 0.1

    full = delta_ce_kl(tiny_model, tokens, noisy)
    sizes = []
    handle = tiny_model.blocks[2].register_forward_hook(lambda m, i, o: sizes.append(len(o)))
    part = delta_ce_kl(tiny_model, tokens, noisy, rows=stride_rows(torch.arange(3), 2))
    handle.remove()
    # layer 0 runs block 2 on rows 0, 2 only, layer 1 on row 1
    assert sizes == [3, 2, 1]  # the clean residuals (3 rows), then the patched rows
    mask = stride_mask(torch.arange(3), [0, 1, 2], 2).T  # (layer, row)
    # the same values as the full batch's at the patched pairs (float32 rounding of a smaller
    # batch aside), zero elsewhere
    close = {"atol": 1e-5, "rtol": 1e-5}
    ref = torch.where(mask, full["delta_ce_rows"], 0)
    torch.testing.assert_close(part["delta_ce_rows"], ref, **close)
    torch.testing.assert_close(part["kl_rows"], torch.where(mask, full["kl_rows"], 0), **close)
    assert (part["delta_ce_rows"][~mask] == 0).all() and (part["delta_ce_rows"][mask] != 0).all()
    assert torch.equal(part["n_layer_rows"], mask.double() * full["n_rows"])
    assert part["n_layer"].tolist() == [
        12.0,
        6.0,
        12.0,
    ]  # 6 predictions a row (not from BOS) and part["n"] == full["n"]


def test_per_context_csv_round_trip_and_compare_runs(tmp_path):
    def result(sse, sse_raw, ce):
        return {
            "per_context": {
                "context": [0, 1, 2],
                "layers": [0, 1],
                "n_pred": [[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]],
                "delta_ce_sum": ce,
                "kl_sum": ce,
                "n_tokens": [3.0, 3.0, 3.0],
                "sse": sse,
                "sse_raw": sse_raw,
            }
        }

    raw = result([[1.0, 2.0]] * 3, None, [[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]])
    lens = result([[9.0, 9.0]] * 3, [[0.5, 1.0]] * 3, [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    for name, res in (("raw", raw), ("lens", lens)):
        pd.DataFrame(per_context_rows(res)).to_csv(tmp_path / f"{name}.csv", index=False)
    a, b = read_per_context(tmp_path / "raw.csv"), read_per_context(tmp_path / "lens.csv")
    assert list(a.columns[:9]) == [
        "context", "layer", "patched", "n_pred", "delta_ce_sum", "kl_sum", "n_tokens", "sse",
        "sse_raw",
    ]  # fmt: skip
    assert a["sse_raw"].isna().all() and len(a) == 6 and a["patched"].tolist() == [1, 0, 0, 1, 1, 0]
    out = compare_runs(a, b, [6.0, 12.0], n_boot=50)
    # raw space: a uses sse, b (a lens run) sse_raw: a = (3/6 + 6/12)/2, b = (1.5/6 + 3/12)/2
    assert out["fvu_raw"]["a"] == pytest.approx(0.5) and out["fvu_raw"]["b"] == pytest.approx(0.25)
    # delta CE: layer 0 = contexts 0, 2; layer 1 = context 1
    assert out["delta_ce"]["a"] == pytest.approx(((1 + 2) / 4 + 3 / 2) / 2)
    assert out["delta_ce"]["b"] == pytest.approx(((0 + 1) / 4 + 1 / 2) / 2)
    assert math.isfinite(out["kl"]["se"]) and out["kl"]["metric"] == "kl"


def _tiny_params(tmp_path):
    from mlsae import config

    return config.from_dict(
        {
            "base": {"cache_dir": "cache", "device": "cpu"},
            "data": {"batch_contexts": 4, "train_tokens": 500},
            "train": {"snapshot_tokens": [100, 200, 2000]},
            "eval": {"eval_tokens": 10_000, "ce_contexts": 6, "ce_stride": 1, "sweep_ce_stride": 2},
            "analysis": {"baseline_run": "r2-k4", "compare_tokens": 200, "baseline_layers": [0]},
            "sweep": {
                "r2-k4": {"expansion_factor": 2, "k": 4, "train_tokens": 1000},
                "r1-k4": {"expansion_factor": 1, "k": 4},
            },
        }
    )


def test_snapshots_are_evaluated_and_the_baseline_compares_at_its_snapshot(tiny_model, tmp_path):
    from conftest import build_cache

    from mlsae import paths
    from mlsae.stages.evaluate import ce_stride, evaluate_snapshots
    from mlsae.stages.sweeps import compare_point, sweep_groups

    params = _tiny_params(tmp_path)
    docs = ["the cat sat on the mat and the dog went to the store", "a man gave a drink"] * 8
    build_cache(paths.cache_paths(params, tmp_path)["test"], tiny_model, docs, 16, 4)
    torch.manual_seed(0)
    for tokens in (100, 200, 2000):  # 2000 is past the run's budget: not evaluated
        sae = MLSAE(32, 64, 4)
        path = paths.snapshot_path(params, "r2-k4", tokens, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"sae": sae.state_dict(), "sae_config": sae.config(), "optimizer": None}
        torch.save(state | {"tokens_seen": tokens}, path)  # as mlsae.train writes snapshots
    out = evaluate_snapshots(params, "r2-k4", tmp_path, tiny_model)
    assert list(out) == ["r2-k4@100", "r2-k4@200"]
    assert "delta_ce" not in out["r2-k4@100"]["mean"]  # CE only at analysis.compare_tokens
    assert out["r2-k4@200"]["ce_design"]["stride"] == 2 and "delta_ce" in out["r2-k4@200"]["mean"]
    for name, tokens in (("r2-k4@100", 100), ("r2-k4@200", 200)):
        saved = json.loads(paths.run_result_path(tmp_path, name).read_text())
        assert saved["tokens_trained"] == tokens and "per_context" not in saved
        assert paths.results(tmp_path, "snapshots", f"{name}.json").exists()
        metrics = json.loads(paths.metrics(tmp_path, "snapshots.json").read_text())
        assert metrics[name]["tokens_trained"] == tokens
        assert paths.latent_stats_path(params, "r2-k4", tmp_path, tokens).exists()
        table = read_per_context(paths.per_context_path(tmp_path, name))
        assert table["sse"].notna().any() and table["sse_raw"].isna().all()
    table = read_per_context(paths.per_context_path(tmp_path, "r2-k4@200"))
    patched = table[table["patched"] == 1]
    assert ((patched["layer"] % 2) == (patched["context"] % 2)).all() and len(patched) == 9
    # the Table 1 SAE (final baseline) gets ce_stride, everything else sweep_ce_stride
    assert ce_stride(params, "r2-k4") == 1 and ce_stride(params, "r1-k4") == 2
    assert ce_stride(params, "r2-k4", snapshot=True) == 2
    assert (
        compare_point(params, "r2-k4") == "r2-k4@200" and compare_point(params, "r1-k4") == "r1-k4"
    )
    assert sweep_groups(params)["R"] == ["r1-k4", "r2-k4"]  # no longer dropped for its budget


def test_sweep_differences_are_paired_on_the_per_context_tables(tmp_path):
    from mlsae.stages.sweeps import sweep_differences

    gen = torch.Generator().manual_seed(5)
    n_ctx, n_layers = 24, 3
    effect = torch.randn(n_ctx, 1, generator=gen, dtype=torch.float64)
    tables, runs, sses = {}, {}, {}
    for name, shift, stride in (("a", 0.0, 1), ("b", 0.05, 3)):
        mask = stride_mask(torch.arange(n_ctx), list(range(n_layers)), stride).double()
        noise = 0.01 * torch.randn(n_ctx, n_layers, generator=gen, dtype=torch.float64)
        ce = (effect + shift + noise) * 10 * mask
        sse = sses[name] = (1.0 + effect.abs() + shift + noise) * 5
        result = {
            "per_context": {
                "context": list(range(n_ctx)),
                "layers": list(range(n_layers)),
                "n_pred": (10 * mask).tolist(),
                "delta_ce_sum": ce.tolist(),
                "kl_sum": ce.abs().tolist(),
                "n_tokens": [5.0] * n_ctx,
                "sse": sse.tolist(),
                "sse_raw": None,
            }
        }
        pd.DataFrame(per_context_rows(result)).to_csv(tmp_path / f"{name}.csv", index=False)
        tables[name] = read_per_context(tmp_path / f"{name}.csv")
        runs[name] = {
            "mean": {"fvu": 0.3, "fvu_se": 0.05, "delta_ce": 0.2, "delta_ce_se": 0.3},
            "fvu_denominator": {"raw": [200.0] * n_layers},
        }
    rows = sweep_differences(runs, {"R": ["a", "b"]}, tables, n_boot=300)["R"]
    assert [r["metric"] for r in rows] == ["fvu", "delta_ce", "kl"]
    for r in rows:
        assert r["paired"] and r["from"] == "a" and r["to"] == "b"
        assert r["within_noise"] == (r["verdict"] == "no detectable difference")
        assert r["mde80"] == pytest.approx(2.8016 * r["se"], rel=1e-4)
        assert r["se"] < r["se_unpaired"]
    fvu, ce = rows[0], rows[1]
    expected = ((sses["b"] - sses["a"]).sum(0) / 200.0).mean().item()  # (SSE_b - SSE_a) / D
    assert fvu["difference"] == pytest.approx(expected, rel=1e-9)
    assert fvu["verdict"] == "b higher" and ce["verdict"] == "b higher"
    assert ce["n_pairs"] == n_ctx and fvu["se_reported"] == pytest.approx(0.05 * 2**0.5)
    # without per-context tables: the unpaired comparison of the reported means
    old = sweep_differences(runs, {"R": ["a", "b"]})["R"]
    assert [r["paired"] for r in old] == [False, False] and old[0]["difference"] == 0.0


def test_table1_stride_goes_to_the_baseline_run_and_the_analysed_lens_run_only(tmp_path):
    from dataclasses import replace

    from mlsae.stages.evaluate import ce_stride

    params = _tiny_params(tmp_path)
    assert ce_stride(params, "r1-k4") == 2  # no lens run analysed: a sweep run
    params = replace(params, analysis=replace(params.analysis, lens_run="r1-k4"))
    assert ce_stride(params, "r1-k4") == 1 and ce_stride(params, "r1-k4", snapshot=True) == 2


def test_lens_sweep_groups_hold_the_default_lens_only():
    import yaml

    from mlsae import config
    from mlsae.stages.sweeps import sweep_groups

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["lens_sweep"] |= {  # the other lenses' runs, as params.yaml's comment adds them
        "r8-k32-lens-ridge": {"expansion_factor": 8, "k": 32, "lens_method": "ridge"},
        "r8-k32-lens-regression": {"expansion_factor": 8, "k": 32, "lens_method": "regression"},
    }
    groups = sweep_groups(config.from_dict(raw))
    # all three lens runs are at R = 8, k = 32: the other lenses' runs would be "R steps" of zero
    assert groups["R + lens"] == groups["k + lens"] == ["r8-k32-lens"]
    assert groups["R"] == ["r2-k32", "r4-k32", "r8-k32"]
