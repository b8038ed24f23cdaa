"""The latent explorer: the one-pass data against dense references, and the page in Chromium."""

import numpy as np
import pytest
import torch
from conftest import CHROMIUM, build_cache, chromium_dom

from mlsae import explorer, explorer_scan, explorer_site
from mlsae.latents import collect as latent_stats
from mlsae.sae import MLSAE

DOCS = [
    "the cat sat on the mat and the dog went to the store while it rained",
    "John gave a drink to Mary in Paris, and she thanked him for it twice",
    "In 1963 the committee reported that the new tax would fall on farms",
]


def test_top_per_group_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    n = 400
    group = torch.randint(0, 7, (n,), generator=gen)
    item = torch.randint(0, 15, (n,), generator=gen)
    value = torch.rand(n, generator=gen)
    payload = torch.arange(n)
    g, i, v, p = explorer_scan.top_per_group(group, item, value, payload, 3)
    for grp in range(7):
        best = {}
        for j in range(n):
            if group[j] == grp and (
                item[j].item() not in best or value[j] > best[item[j].item()][0]
            ):
                best[item[j].item()] = (value[j].item(), j)
        expected = sorted(best.values(), reverse=True)[:3]
        got = [(v[k].item(), p[k].item()) for k in range(len(g)) if g[k] == grp]
        assert got == expected, grp  # the same float32 values, the payload of the maximum


@pytest.fixture
def run(tiny_model, tmp_path):
    cache = build_cache(tmp_path / "c", tiny_model, DOCS * 4, 16, 4)
    torch.manual_seed(0)
    sae = MLSAE(tiny_model.cfg.d_model, 48, 4).eval()
    return sae, cache


@torch.no_grad()
def dense(sae, cache, lens=None):
    """``(layer, token, latent)`` activations of the whole cache, by brute force."""
    x = torch.cat(
        [torch.from_numpy(cache.shard(i)[:].astype("float32")) for i in range(len(cache))], 1
    )
    if lens is not None:
        x = lens.transform_layers(x, list(range(x.shape[0])))
    values, indices = sae.encode(x)
    out = torch.zeros(*x.shape[:2], sae.n_latents)
    out.scatter_(-1, indices, values)
    return out


def test_one_pass_statistics_and_top_contexts_match_a_dense_reference(run):
    sae, cache = run
    acts = dense(sae, cache)  # (layer, token, latent)
    col = explorer_scan.collect(sae, cache, 10_000, n_top=3, n_top_layer=2, batch_tokens=20)
    torch.testing.assert_close(col.counts, (acts > 0).sum(1).double())
    torch.testing.assert_close(col.totals, acts.sum(1).double(), rtol=1e-5, atol=1e-5)
    assert col.hist.sum().item() == (acts > 0).sum().item()
    ctx = torch.as_tensor(cache.context_ids()).long()
    g, c, v, payload = col.top
    for lat in range(sae.n_latents):
        per_ctx = {}
        for cid in ctx.unique().tolist():
            a = acts[:, ctx == cid, lat]
            if a.max() > 0:
                per_ctx[cid] = a.max().item()
        expected = sorted(per_ctx.values(), reverse=True)[:3]
        got = v[g == lat].tolist()
        assert got == pytest.approx(expected, rel=1e-5), lat
        for k in torch.nonzero(g == lat)[:, 0].tolist():  # payload: the peak token and layer
            tok, layer = divmod(payload[k].item(), cache.n_layers)
            assert acts[layer, tok, lat].item() == pytest.approx(v[k].item(), rel=1e-5)
    gl, _, vl, _ = col.top_layer
    for lat in range(sae.n_latents):
        for layer in range(cache.n_layers):
            per_ctx = {}
            for cid in ctx.unique().tolist():
                a = acts[layer, ctx == cid, lat]
                if a.max() > 0:
                    per_ctx[cid] = a.max().item()
            expected = sorted(per_ctx.values(), reverse=True)[:2]
            got = vl[gl == lat * cache.n_layers + layer].tolist()
            assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("with_lens", [False, True])
def test_activations_at_reads_and_encodes_only_the_requested_vectors(run, with_lens):
    from mlsae.lens import random_lens

    sae, cache = run
    lens = random_lens(cache.shard(0).shape[-1], cache.n_layers, seed=3) if with_lens else None
    acts = dense(sae, cache, lens)
    gen = np.random.default_rng(0)
    n = 200
    latent = gen.integers(0, sae.n_latents, n)
    layer = gen.integers(0, cache.n_layers, n)
    token = gen.integers(0, acts.shape[1], n)
    got = explorer_scan.activations_at(sae, cache, latent, layer, token, lens=lens, chunk=17)
    np.testing.assert_allclose(got, acts[layer, token, latent].numpy(), rtol=1e-5, atol=1e-6)


def build_site(tiny_model, sae, cache, folder):
    data = explorer.build(sae, cache, tiny_model, 10_000, n_top=3)
    return data, explorer_site.write_explorer(
        folder, data, tiny_model.tokenizer, "Test explorer", "tiny-random-llama"
    )


def test_build_pages_trajectories_and_logit_effects(run, tiny_model, tmp_path):
    sae, cache = run
    data, size = build_site(tiny_model, sae, cache, tmp_path / "site")
    acts = dense(sae, cache)
    assert len(data["overview"]) == sae.n_latents and size["bytes"] > 0
    page = max(data["pages"], key=lambda p: len(p["top"]))
    lat = page["id"]
    for entry, traj in zip(page["top"], page["trajectory"], strict=True):
        start, length, layer, peak, value, codes = entry
        tok = start + peak
        assert traj == pytest.approx(
            acts[:, tok, lat].tolist(), abs=1e-3
        )  # every layer, same token
        assert traj[layer] == pytest.approx(value, abs=1e-3)
        assert len(codes) == length and codes[peak] != "0"
    # logit effects: the decoder direction through the final norm's gain and the unembedding
    w = (sae.W_dec[lat].detach() * tiny_model.ln_final.w.detach()) @ tiny_model.unembed.W_U.detach()
    assert [t for t, _ in page["logits_last"]["up"]] == w.topk(8).indices.tolist()
    sims = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    c = sims @ sims[lat]
    c[lat] = -2
    assert page["similar"][0][0] == c.argmax().item()


def test_overview_mean_layer_and_entropy_are_the_latent_analysis(tiny_model, tmp_path):
    """The overview's mean layer and entropy: `LayerStats` 's, from the same activations."""
    cache = build_cache(tmp_path / "c", tiny_model, DOCS * 4, 16, 4)
    torch.manual_seed(0)
    sae = MLSAE(tiny_model.cfg.d_model, 64, 2).eval()
    with torch.no_grad():
        sae.W_enc[:8] = 0  # never fire
    data = explorer.build(sae, cache, None, 10_000, n_top=1)
    stats = latent_stats(sae, cache.iter_batches(64)).compute()
    dead = 0
    for lat, mean, fired, entropy, *_ in data["overview"]:
        if torch.isnan(stats["mean_layer"][lat]):
            assert mean is None and fired == 0 and entropy == 0
            dead += 1
        else:
            assert mean == pytest.approx(stats["mean_layer"][lat].item(), abs=5e-3)
            assert entropy == pytest.approx(stats["entropy"][lat].item(), abs=1e-3)
    assert dead >= 8


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by `make test`")
def test_explorer_in_headless_chromium(run, tiny_model, tmp_path):
    sae, cache = run
    data, _ = build_site(tiny_model, sae, cache, tmp_path / "site")
    index = tmp_path / "site" / "index.html"

    def dom(fragment: str) -> str:
        return chromium_dom(f"file://{index}{fragment}", tmp_path / "profile")

    home = dom("")
    assert 'id="map"' in home and "latents shown" in home
    # a token that some latent peaks on, searched as the user types it
    token_id = int(next(iter(data["token_index"])))
    word = tiny_model.tokenizer.convert_tokens_to_string(
        [tiny_model.tokenizer.convert_ids_to_tokens(token_id)]
    )
    found = dom("#search=" + word.replace(" ", "%20"))
    assert 'id="search-results"' in found and "#latent=" in found
    lat = data["token_index"][token_id][0][0]
    page = dom(f"#latent={lat}")
    assert f'id="latent-title">Latent {lat}<' in page
    assert 'id="trajectory"' in page and "<polyline" in page
    assert 'id="top-contexts"' in page and 'class="tok peak"' in page
    assert 'id="logits"' in page
    text = dom("#text=" + DOCS[1].split()[3])
    assert "Top contexts containing" in text
