import numpy as np
import torch
from conftest import build_cache

from mlsae.activations import (
    ActivationCache,
    iter_residuals,
    residual_stream,
    special_mask,
)


def test_residual_stream_is_each_block_output(tiny_model):
    tokens = torch.tensor([[1, 5, 6, 7, 2, 8]])
    resid = residual_stream(tiny_model, tokens)
    assert resid.shape == (3, 1, 6, 32)
    _, cache = tiny_model.run_with_cache(tokens)
    for layer in range(3):
        torch.testing.assert_close(resid[layer], cache[f"blocks.{layer}.hook_resid_post"])
    # Block l's output is block l+1's input; the embeddings are not included.
    torch.testing.assert_close(resid[0], cache["blocks.1.hook_resid_pre"])
    assert not torch.allclose(resid[0], cache["blocks.0.hook_resid_pre"])


def test_special_mask():
    tokens = torch.tensor([[1, 5, 2, 6], [1, 3, 3, 7]])
    mask = special_mask(tokens, [1, 2, 3])
    assert mask.tolist() == [[True, False, True, False], [True, True, True, False]]


def test_iter_residuals_drops_special_positions(tiny_model):
    docs = ["the cat sat on the mat", "a dog went to the store"] * 3
    chunks = list(iter_residuals(tiny_model, docs, 8, 2, progress=False))
    n_kept = sum(c.acts.shape[1] for c in chunks)
    assert all(c.acts.shape[0] == 3 and c.acts.shape[2] == 32 for c in chunks)
    ids = torch.cat([c.token_ids for c in chunks])
    assert n_kept == ids.numel()
    assert not set(ids.tolist()) & {1, 2, 3}


def test_activation_cache_round_trip(tiny_model, tmp_path):
    docs = ["the cat sat on the mat and the dog", "a man went to the store"] * 10
    chunks = list(iter_residuals(tiny_model, docs, 8, 3, progress=False))
    reference = torch.cat([c.acts for c in chunks], dim=1)
    cache = build_cache(tmp_path / "c", tiny_model, docs, 8, 3)
    assert cache.n_tokens == reference.shape[1] and cache.n_layers == 3
    again = ActivationCache(tmp_path / "c")
    batches = list(again.iter_batches(batch_tokens=5))
    assert [b.shape[1] for b in batches[:-1]] == [5] * (len(batches) - 1)
    got = torch.cat(batches, dim=1)
    torch.testing.assert_close(got, reference.half().float())
    # the contexts it was built from, special positions included (delta CE runs on them)
    contexts = again.contexts()
    assert contexts.shape == (again.meta["n_contexts"], 8) and (contexts[:, 0] == 1).all()
    only = torch.cat(list(again.iter_batches(5, layers=[2])), dim=1)
    torch.testing.assert_close(only, got[[2]])
    assert np.array_equal(
        np.concatenate([again.tokens(i) for i in range(len(again))]),
        torch.cat([c.token_ids for c in chunks]).numpy(),
    )
