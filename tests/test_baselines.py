import pytest
import torch
from conftest import build_cache

from mlsae.activations import residual_stream
from mlsae.baselines import delta_ce_matrix, fvu_matrix
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
    d_ce, kl, n = delta_ce_matrix(saes, tiny_model, tokens, layers)
    resid = residual_stream(tiny_model, tokens)
    ref = delta_ce_kl(tiny_model, tokens, lambda v, ly: saes[2](v).recons, [2], resid)
    assert d_ce[1, 1].item() == pytest.approx((ref["delta_ce"][2] / ref["n"]).item(), rel=1e-6)
    assert kl[1, 1].item() == pytest.approx((ref["kl"][2] / ref["n"]).item(), rel=1e-6)
    assert d_ce[0, 1].item() != pytest.approx(d_ce[1, 1].item())
