import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_cache

from mlsae import config
from mlsae.activations import residual_stream
from mlsae.lens import TunedLens, random_lens
from mlsae.lens_kl import lens_kl_per_layer
from mlsae.lens_training import train_lens
from mlsae.metrics import evaluate
from mlsae.train import TrainConfig, train


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_inverse_round_trip_at_every_layer(scale):
    d, n_layers = 64, 6
    lens = random_lens(d, n_layers, scale=scale, seed=1)
    x = torch.randn(100, d) * 5
    for layer in range(n_layers):
        y = lens.transform(x, layer)
        back = lens.invert(y, layer)
        rel = (back - x).norm() / x.norm()
        assert rel < 1e-5, (layer, rel.item())
        if layer < n_layers - 1:
            assert (y - x).norm() / x.norm() > 0.1  # the translator is not near the identity


def test_diagonal_only_inverse_fails_the_round_trip():
    """The original code kept only diag((I + W)^-1); that is far from exact."""
    lens = random_lens(64, 4, scale=0.3, seed=1)
    x = torch.randn(100, 64)
    t = lens.translators[1]
    y = lens.transform(x, 0)
    inv = torch.linalg.inv(torch.eye(64) + t.weight.detach())
    diag_only = (y - t.bias.detach()) * torch.diagonal(inv)
    assert (diag_only - x).norm() / x.norm() > 1e-2
    exact = lens.invert(y, 0)
    assert (exact - x).norm() / x.norm() < 1e-5


def test_index_convention_block_output_takes_next_translator():
    lens = TunedLens(8, 4)
    with torch.no_grad():
        lens.translators[2].bias.fill_(1.0)  # acts on blocks.2.hook_resid_pre = output of block 1
    x = torch.zeros(3, 8)
    assert torch.equal(lens.transform(x, 1), torch.ones(3, 8))
    for layer in (0, 2, 3):
        assert torch.equal(lens.transform(x, layer), x)
    assert lens.translator_index(3) is None  # last block: identity
    with pytest.raises(IndexError):
        lens.translator_index(4)


def test_index_convention_on_a_tiny_model(tiny_model):
    """Translator i acts on blocks.i.hook_resid_pre, which is block (i-1)'s output."""
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    resid = residual_stream(tiny_model, tokens)
    _, cache = tiny_model.run_with_cache(tokens)
    lens = random_lens(32, 3, seed=2)
    for layer in range(2):
        pre_next = cache[f"blocks.{layer + 1}.hook_resid_pre"]
        t = lens.translators[layer + 1]
        torch.testing.assert_close(lens.transform(resid[layer], layer), pre_next + t(pre_next))
    torch.testing.assert_close(lens.transform(resid[2], 2), resid[2])


def test_singular_translator_is_a_clear_error():
    lens = TunedLens(4, 3)
    with torch.no_grad():
        lens.translators[1].weight.copy_(-torch.eye(4))  # I + W = 0
    with pytest.raises(ValueError, match="translator 1 .*singular or badly conditioned"):
        lens.invert(torch.zeros(2, 4), 0)


def test_save_load_round_trip_and_missing_lens(tmp_path, monkeypatch):
    lens = random_lens(16, 3, seed=3)
    lens.save(tmp_path / "lens" / "tiny-model")
    again = TunedLens.load("tiny-model", lens_dir=tmp_path)
    x = torch.randn(4, 16)
    torch.testing.assert_close(again.transform(x, 0), lens.transform(x, 0))
    params = torch.load(tmp_path / "lens" / "tiny-model" / "params.pt")
    assert set(params) == {f"{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="No tuned lens for 'no-such-model'"):
        TunedLens.load("no-such-model", lens_dir=tmp_path)


def _tiny_cache(model, path, docs_repeat=30):
    docs = ["the cat sat on the mat and the dog went to the store", "a man gave a drink to her"]
    return build_cache(path, model, docs * docs_repeat, 16, 4)


def test_trained_lens_beats_logit_lens_on_a_tiny_model(tiny_model, tmp_path):
    cache = _tiny_cache(tiny_model, tmp_path / "c")
    settings = config.Lens(steps=60, batch_tokens=64, lr=1e-2, lr_decay="cosine", init="identity")
    lens, history = train_lens(tiny_model, cache, settings, progress=False)
    assert history[-1] < history[0]
    tuned = lens_kl_per_layer(tiny_model, lens, cache, 10_000)
    logit = lens_kl_per_layer(tiny_model, None, cache, 10_000)
    assert all(t < g for t, g in zip(tuned[:-1], logit[:-1], strict=True)), (tuned, logit)
    assert tuned[-1] == pytest.approx(0, abs=1e-6) and logit[-1] == pytest.approx(0, abs=1e-6)


def test_mlsae_in_lens_space_reports_both_fvus(tiny_model, tmp_path):
    cache = _tiny_cache(tiny_model, tmp_path / "c")
    lens = random_lens(32, 3, scale=0.5, seed=4)
    cfg = TrainConfig.of(expansion_factor=2, k=4, lr=3e-3, batch_tokens=32, dead_tokens=10**6)
    sae = train(cfg, cache, tmp_path / "run", lens=lens, progress=False)
    tokens = [torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])]
    res = evaluate(sae, tiny_model, tokens, lens=lens)
    assert res["space"] == "lens"
    assert "fvu_raw" in res["per_layer"] and "fvu" in res["per_layer"]
    # by hand: raw-space FVU at layer 0 from the inverted reconstruction
    x = residual_stream(tiny_model, tokens[0])[0, 0, 1:]
    recons = lens.invert(sae(lens.transform(x, 0)).recons, 0)
    ref = (x - recons).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert res["per_layer"]["fvu_raw"][0] == pytest.approx(ref.item(), rel=1e-4)
    assert res["per_layer"]["fvu_raw"][0] != pytest.approx(res["per_layer"]["fvu"][0], rel=1e-3)


def test_lens_kl_equals_the_explicit_definition(tiny_model):
    from mlsae.distributions import NextTokenDistribution
    from mlsae.lens_kl import Unembedder

    torch.manual_seed(0)
    final_resid, resid = torch.randn(5, 32) * 3, torch.randn(5, 32) * 3
    # reference through TransformerLens's own modules
    logp = tiny_model.unembed(tiny_model.ln_final(final_resid)).log_softmax(-1)
    logq = tiny_model.unembed(tiny_model.ln_final(resid)).log_softmax(-1)
    explicit = (logp.exp() * (logp - logq)).sum(-1)
    unembed = Unembedder(tiny_model)
    final = NextTokenDistribution(unembed(final_resid), dtype=torch.float32, rows=None)
    got = final.kl(unembed(resid))
    torch.testing.assert_close(got, explicit, rtol=1e-4, atol=1e-5)
    assert (got > 0).all()


def test_lens_kl_evaluation_is_exactly_zero_at_the_last_layer(tiny_model, tmp_path):
    cache = _tiny_cache(tiny_model, tmp_path / "c")
    lens = random_lens(32, 3, seed=5)
    with torch.no_grad():  # large logits make float32 cancellation visible
        tiny_model.unembed.W_U.mul_(30)
    kl = lens_kl_per_layer(tiny_model, lens, cache, 10_000)
    assert abs(kl[-1]) < 1e-9 and min(kl[:-1]) > 0  # the last: float64 rounding of 0


def test_cap_condition_clips_singular_values_to_the_cap():
    from mlsae.lens_training import cap_condition

    lens = random_lens(16, 3, scale=2.0, seed=2)
    eye = torch.eye(16)
    before = [torch.linalg.svdvals(eye + t.weight.detach()) for t in lens.translators]
    assert max((s[0] / s[-1]).item() for s in before) > 10
    cap_condition(lens, 10.0)
    for s0, t in zip(before, lens.translators, strict=True):
        s = torch.linalg.svdvals(eye + t.weight.detach())
        assert (s[0] / s[-1]).item() == pytest.approx(min(10.0, (s0[0] / s0[-1]).item()), rel=1e-4)
        # singular values above s_max / 10 are untouched; the rest are raised to it
        expected = s0.clamp_min(s0[0] / 10)
        assert torch.allclose(s, expected, rtol=1e-4, atol=1e-5)


def test_regression_lens_is_the_least_squares_map_to_the_last_block(tiny_model, tmp_path):
    """Against torch.linalg.lstsq on the same (input of block i, last block output) pairs."""
    from mlsae.lens_training import regression_lens

    cache = _tiny_cache(tiny_model, tmp_path / "c", docs_repeat=60)
    lens = regression_lens(tiny_model, cache, max_tokens=10_000, ridge=0.0, max_condition=1e12)
    acts = torch.cat(
        [torch.from_numpy(cache.shard(i)[:].astype("float32")) for i in range(len(cache))], 1
    )
    toks = torch.cat([torch.from_numpy(cache.tokens(i)) for i in range(len(cache))])
    inputs = torch.cat([tiny_model.embed(toks.long())[None].detach(), acts[:-1]]).double()
    y = acts[-1].double()
    for i in (1, 2):  # block inputs that vary (block 0's input is the embedding: few distinct rows)
        x1 = torch.cat([inputs[i], torch.ones(len(y), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(x1, y).solution  # (d + 1, d)
        t = lens.translators[i]
        pred = inputs[i] + inputs[i] @ t.weight.double().T + t.bias.double()
        ref = x1 @ sol
        assert torch.allclose(pred, ref, atol=1e-3 * y.abs().max()), (pred - ref).abs().max()


def test_regression_start_beats_identity_start_at_equal_steps(tiny_model, tmp_path):
    cache = _tiny_cache(tiny_model, tmp_path / "c")
    kl = {}
    for init in ("identity", "regression"):
        settings = config.Lens(steps=3, batch_tokens=64, lr_decay="cosine", init=init)
        lens, _ = train_lens(tiny_model, cache, settings, progress=False)
        kl[init] = sum(lens_kl_per_layer(tiny_model, lens, cache, 10_000)[:-1])
        for t in lens.translators:
            s = torch.linalg.svdvals(torch.eye(32) + t.weight.detach())
            assert (s[0] / s[-1]).item() <= 100.0 * (1 + 1e-4)
    assert kl["regression"] < kl["identity"], kl


def test_train_lens_defaults_are_the_params_defaults(tiny_model, tmp_path):
    """No settings means `config.Lens()`: train_lens has no defaults of its own."""
    import inspect

    cache = _tiny_cache(tiny_model, tmp_path / "c")
    own = set(inspect.signature(train_lens).parameters)
    assert not own & {f.name for f in dataclasses.fields(config.Lens)}, own
    default, history = train_lens(tiny_model, cache, progress=False)
    explicit, again = train_lens(tiny_model, cache, config.Lens(), progress=False)
    assert len(history) == config.Lens().steps and history == again
    for a, b in zip(default.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lens_modules_import_no_sae_evaluation():
    """The lens (used by SAE training) and its training import neither metrics nor bootstrap."""
    code = (
        "import sys, mlsae.lens, mlsae.lens_kl, mlsae.lens_training; "
        "print(sorted(m for m in sys.modules if m.startswith('mlsae.')))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    loaded = set(ast.literal_eval(out.stdout))
    assert not loaded & {"mlsae.metrics", "mlsae.bootstrap", "mlsae.reconstruction"}, loaded
