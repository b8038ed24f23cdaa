import pytest
import torch
from conftest import build_cache

from mlsae.activations import residual_stream
from mlsae.baselines import delta_ce_matrix, fvu_matrix, fvu_sums, paired_at_layers
from mlsae.patching import delta_ce_kl
from mlsae.sae import MLSAE


def test_matrices_match_direct_computation(tiny_model, tmp_path):
    docs = ["the cat sat on the mat and the dog went to the store", "a man gave a drink"] * 8
    cache = build_cache(tmp_path / "c", tiny_model, docs, 16, 4)
    torch.manual_seed(0)
    saes = {0: MLSAE(32, 64, 4).eval(), 2: MLSAE(32, 64, 8).eval()}
    layers = [0, 2]
    fvu = fvu_matrix(saes, cache, layers, max_tokens=10_000)
    x = torch.cat(list(cache.iter_batches(10_000)), dim=1)
    for i, sae in enumerate(saes.values()):
        for j, layer in enumerate(layers):
            xl = x[layer]
            err = (xl - sae(xl).recons).pow(2).sum()
            total = (xl - xl.mean(0)).pow(2).sum()
            assert fvu[i, j].item() == pytest.approx((err / total).item(), rel=1e-4)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])
    res = delta_ce_matrix(saes, tiny_model, tokens, layers)
    d_ce, kl = res["delta_ce"], res["kl"]
    resid = residual_stream(tiny_model, tokens)
    ref = delta_ce_kl(tiny_model, tokens, lambda v, ly: saes[2](v).recons, [2], resid)
    assert d_ce[1, 1].item() == pytest.approx((ref["delta_ce"][2] / ref["n"]).item(), rel=1e-6)
    assert kl[1, 1].item() == pytest.approx((ref["kl"][2] / ref["n"]).item(), rel=1e-6)
    assert d_ce[0, 1].item() != pytest.approx(d_ce[1, 1].item())


def test_off_diagonal_entries_use_the_first_contexts_and_the_rest_all(tiny_model, tmp_path):
    docs = ["the cat sat on the mat and the dog went to the store", "a man gave a drink"] * 8
    cache = build_cache(tmp_path / "c", tiny_model, docs, 8, 4)
    torch.manual_seed(1)
    saes = {0: MLSAE(32, 64, 4).eval(), 2: MLSAE(32, 64, 4).eval(), "mlsae": MLSAE(32, 64, 4)}
    layers = [0, 2]
    tokens = cache.contexts()[:5]
    res = delta_ce_matrix(
        saes, tiny_model, tokens, layers, off_diagonal_contexts=2, batch_contexts=2
    )
    n = res["n_pred"]  # (sae, context, eval layer)
    patched = (n > 0).tolist()
    assert patched[0] == [[True, True]] * 2 + [[True, False]] * 3  # SAE 0: layer 2 on 2 contexts
    assert patched[1] == [[True, True]] * 2 + [[False, True]] * 3
    assert all(all(row) for row in patched[2])  # the MLSAE: every context
    # each entry is the mean over its own contexts, batches of 2 as one batch of 5
    for i, (key, sae) in enumerate(saes.items()):
        for j, layer in enumerate(layers):
            used = tokens[: 5 if key in (layer, "mlsae") else 2]
            ref = delta_ce_kl(tiny_model, used, lambda v, ly, s=sae: s(v).recons, [layer])
            expected = (ref["delta_ce"][layer] / ref["n"]).item()
            assert res["delta_ce"][i, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    fvu = fvu_sums(saes, cache, layers, 10_000)
    assert fvu["sse"].shape == (3, len(fvu["n_tokens"]), 2) and len(fvu["n_tokens"]) > 1
    # per-context SSEs over D recover each FVU: FVU = sum_c SSE_c / D
    torch.testing.assert_close(fvu["sse"].sum(1) / fvu["denominator"], fvu["fvu"].double())
    rows = paired_at_layers(list(saes), layers, fvu, res, n_boot=100)
    assert [(r["layer"], r["metric"]) for r in rows] == [
        (0, "fvu"), (0, "delta_ce"), (2, "fvu"), (2, "delta_ce"),
    ]  # fmt: skip
    for r in rows:  # a = the single-layer SAE at its layer, b = the MLSAE
        j, a = layers.index(r["layer"]), list(saes).index(r["layer"])
        table = fvu["fvu"] if r["metric"] == "fvu" else res["delta_ce"]
        assert r["a"] == pytest.approx(table[a, j].item(), rel=1e-5)
        assert r["b"] == pytest.approx(table[2, j].item(), rel=1e-5)
        assert r["verdict"] in ("b lower", "b higher", "no detectable difference")
