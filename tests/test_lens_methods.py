"""The three lens methods (belrose, ridge, regression), their loss and data, and the paper's
lens delta CE, against hand computations and independent implementations."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import build_cache

from mlsae import config, paths
from mlsae.activations import special_mask
from mlsae.lens import TunedLens, random_lens
from mlsae.lens_belrose import convergence, eval_steps, step_loss, train_belrose
from mlsae.lens_kl import Unembedder, kl_per_token, sampled_kl
from mlsae.lens_ridge import ridge_lens, ridge_map, ridge_stats
from mlsae.lens_training import gather_tokens, heldout_split
from mlsae.models import special_token_ids
from mlsae.paper_lens_ce import delta_ce_paper, diagonal_inverse
from mlsae.patching import delta_ce_kl
from mlsae.stages.runs import run_lens_method


def _cache(model, path, repeat=30):
    docs = ["the cat sat on the mat and the dog went to the store", "a man gave a drink to her"]
    return build_cache(path, model, docs * repeat, 16, 4)


def _exact_kl(p_logits, z):
    logp, logq = p_logits.log_softmax(-1), z.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


# -- the training loss ----------------------------------------------------------------------------
def _parts(p_logits, z, support, sample):
    logp = p_logits.log_softmax(-1)
    p = logp.exp()
    neg_h = (p * logp).sum(-1)
    return neg_h, p[:, support], z[:, support], p[:, sample], z[:, sample]


def test_sampled_kl_is_exact_with_the_whole_tail_or_the_whole_vocabulary():
    torch.manual_seed(0)
    p_logits, z = torch.randn(6, 50, dtype=torch.float64) * 2, torch.randn(6, 50).double() * 2
    exact = _exact_kl(p_logits, z)
    support, tail = torch.arange(10), torch.arange(10, 50)
    got = sampled_kl(*_parts(p_logits, z, support, tail), n_tail=40)
    torch.testing.assert_close(got, exact)
    everything = sampled_kl(*_parts(p_logits, z, torch.arange(50), tail[:0]), n_tail=0)
    torch.testing.assert_close(everything, exact)


def test_sampled_kl_is_nearly_unbiased_over_tail_draws():
    """Linear terms unbiased, the log term biased low (Jensen): the mean sits just below."""
    torch.manual_seed(1)
    p_logits, z = torch.randn(4, 400).double(), torch.randn(4, 400).double()
    exact = _exact_kl(p_logits, z)
    support, tail = torch.arange(100), torch.arange(100, 400)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            sampled_kl(
                *_parts(p_logits, z, support, tail[torch.randperm(300, generator=gen)[:30]]), 300
            )
            for _ in range(3000)
        ]
    )
    mean = draws.mean(0)
    assert (mean <= exact + 3 * draws.std(0) / math.sqrt(3000)).all()
    torch.testing.assert_close(mean, exact, atol=0.02, rtol=0)
    assert (draws.std(0) > 1e-3).all()  # the estimate does vary with the draw


def test_step_loss_exact_mode_is_the_kl_of_lens_kl(tiny_model, tmp_path):
    cache = _cache(tiny_model, tmp_path / "c")
    acts = gather_tokens(cache, torch.arange(40))[0]
    lens = random_lens(32, 3, seed=3)
    u = Unembedder(tiny_model)
    got = step_loss(u, u, lens, acts, None, 0, torch.Generator())
    h = torch.stack([lens.transform(acts[i], i) for i in range(2)])
    ref = kl_per_token(Unembedder(tiny_model, out_dtype=torch.float64), acts[-1], h).mean(1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    # with a support smaller than the vocabulary: close to the exact value on this small vocab
    approx = step_loss(u, u, lens, acts, 20, 40, torch.Generator().manual_seed(0))
    torch.testing.assert_close(approx.double(), ref, rtol=0.1, atol=0.05)


# -- data and convergence ------------------------------------------------------------------------
def test_heldout_split_and_gather_tokens(tiny_model, tmp_path):
    cache = _cache(tiny_model, tmp_path / "c")
    held, rest = heldout_split(cache.n_tokens, 10, seed=4)
    assert len(held) == 10 and torch.equal(held, held.sort().values)
    assert sorted(torch.cat([held, rest]).tolist()) == list(range(cache.n_tokens))
    assert torch.equal(heldout_split(cache.n_tokens, 10, seed=4)[1], rest)
    every = torch.cat(
        [torch.from_numpy(cache.shard(i)[:].astype("float32")) for i in range(len(cache))], 1
    )
    toks = torch.cat([torch.from_numpy(cache.tokens(i)).long() for i in range(len(cache))])
    idx = rest[:25]  # unsorted, across shards
    acts, ids = gather_tokens(cache, idx)
    assert torch.equal(acts, every[:, idx]) and torch.equal(ids, toks[idx])


def test_eval_steps_include_80_percent():
    assert eval_steps(100, 5) == [0, 20, 40, 60, 80, 100]
    assert eval_steps(80, 4) == [0, 20, 40, 60, 64, 80]


def test_convergence_test_by_hand():
    before = torch.tensor([1.0, 2.0, 3.0, 4.0])
    falling = convergence(before, before - torch.tensor([0.1, 0.3, 0.2, 0.2]))
    se = math.sqrt(0.02 / 3) / 2  # sd of (0.1, 0.3, 0.2, 0.2) over sqrt(4)
    assert falling["decrease"] == pytest.approx(0.2) and falling["se"] == pytest.approx(se)
    assert not falling["converged"] and falling["relative_decrease"] == pytest.approx(0.2 / 2.5)
    flat = convergence(
        before.double(), before.double() - torch.tensor([0.1, -0.1, 0.05, -0.04]).double()
    )
    assert flat["converged"] and flat["decrease"] == pytest.approx(0.0025)


# -- belrose ---------------------------------------------------------------------------------------
def _settings(**kw):
    base = dict(heldout_tokens=16, belrose_batch_tokens=32, belrose_loss_vocab=None)
    return config.Lens(**(base | kw))


def test_belrose_first_step_is_nesterov_sgd_with_clipping_from_the_identity(tiny_model, tmp_path):
    """One step from W = b = 0: p1 = -lr (1 + beta) clip(g), lr = s (1 - beta) (decay factor 1).

    In float32 (``bf16=False``): the reference gradient below is float32, and ``auto`` takes the
    bf16 loss on a CPU with native bf16 (AVX512-BF16, AMX), about 0.3% off it.
    """
    cache = _cache(tiny_model, tmp_path / "c")
    s = _settings(belrose_steps=1, belrose_evals=1, belrose_clip=0.5, belrose_lr_scale=2.0)
    lens, record = train_belrose(tiny_model, cache, s, seed=7, progress=False, bf16=False)
    _, rest = heldout_split(cache.n_tokens, 16, seed=7)
    acts = gather_tokens(cache, rest[:32])[0]
    fresh = TunedLens(32, 3)
    u = Unembedder(tiny_model)
    loss = step_loss(u, u, fresh, acts, None, 0, torch.Generator()).sum()
    params = [p for t in fresh.translators[1:] for p in t.parameters()]
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    lr = 2.0 * (1 - 0.9)
    for got, g in zip(
        [p for t in lens.translators[1:] for p in t.parameters()], grads, strict=True
    ):
        torch.testing.assert_close(got, -lr * 1.9 * g * min(1.0, 0.5 / norm), rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(lens.translators[0].weight) == 0  # translator 0 stays the identity
    assert record["history"][0] == pytest.approx(loss.item() / 2, rel=1e-5)


def test_belrose_lowers_the_heldout_kl_from_the_logit_lens(tiny_model, tmp_path):
    cache = _cache(tiny_model, tmp_path / "c")
    s = _settings(belrose_steps=30, belrose_evals=3, belrose_loss_vocab=30, belrose_tail_samples=20)
    lens, record = train_belrose(tiny_model, cache, s, progress=False)
    curve = record["heldout"]
    assert curve["steps"] == eval_steps(30, 3)
    held, _ = heldout_split(cache.n_tokens, 16, seed=0)
    acts = gather_tokens(cache, held)[0]
    logit = kl_per_token(Unembedder(tiny_model, out_dtype=torch.float64), acts[-1], acts[:-1])
    assert curve["kl"][0] == pytest.approx(logit.mean().item(), rel=1e-6)  # step 0: identity
    assert curve["kl"][-1] < 0.8 * curve["kl"][0]
    assert set(record["convergence"]) == {"decrease", "se", "relative_decrease", "converged"}
    assert len(record["history"]) == 30


# -- ridge -----------------------------------------------------------------------------------------
def test_ridge_map_is_the_augmented_least_squares_solution_and_tends_to_identity():
    torch.manual_seed(2)
    n, d, lam = 200, 6, 3.0
    x = torch.randn(n, d, dtype=torch.float64) * 2 + 1
    y = x @ torch.randn(d, d, dtype=torch.float64) + torch.randn(n, d).double() * 0.3 + 5
    xc, yc = x - x.mean(0), y - y.mean(0)
    m = ridge_map(xc.T @ xc, xc.T @ yc, lam)
    b = y.mean(0) - x.mean(0) @ m
    # min ||X M + 1 b - Y||^2 + lam ||M - I||^2 as one least-squares problem in (M, b)
    eye = torch.eye(d, dtype=torch.float64)
    a = torch.cat(
        [
            torch.cat([x, torch.ones(n, 1).double()], 1),
            torch.cat([math.sqrt(lam) * eye, torch.zeros(d, 1).double()], 1),
        ]
    )
    rhs = torch.cat([y, math.sqrt(lam) * eye])
    sol = torch.linalg.lstsq(a, rhs).solution
    torch.testing.assert_close(m, sol[:d])
    torch.testing.assert_close(b, sol[d])
    far = ridge_map(xc.T @ xc, xc.T @ yc, 1e12)
    assert (far - eye).abs().max() < 1e-8
    assert (m - eye).abs().max() > 0.1


def test_ridge_stats_are_the_centred_sums(tiny_model, tmp_path):
    cache = _cache(tiny_model, tmp_path / "c")
    idx = torch.randperm(cache.n_tokens, generator=torch.Generator().manual_seed(0))[:300]
    st = ridge_stats(cache, idx, chunk=128)
    acts = gather_tokens(cache, idx)[0].double()
    x, y = acts[:-1], acts[-1]
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(0)
    torch.testing.assert_close(st["sxx"], xc.transpose(1, 2) @ xc, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st["sxy"], xc.transpose(1, 2) @ yc, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st["mx"], x.mean(1), rtol=1e-5, atol=1e-5)


def test_ridge_lens_keeps_the_lambda_of_lowest_heldout_kl(tiny_model, tmp_path):
    cache = _cache(tiny_model, tmp_path / "c", repeat=60)
    s = config.Lens(
        heldout_tokens=32,
        ridge_lambdas=[1e-3, 1.0, 1e3],
        ridge_tokens=4000,
        ridge_max_condition=None,
    )
    lens, record = ridge_lens(tiny_model, cache, s, seed=1)
    held, rest = heldout_split(cache.n_tokens, 32, seed=1)
    acts = gather_tokens(cache, held)[0]
    u64 = Unembedder(tiny_model, out_dtype=torch.float64)
    st = ridge_stats(cache, rest[:4000])
    for layer in range(2):
        kls = record["heldout_kl"][layer]
        c = record["lambda"][layer]
        assert kls.index(min(kls)) == s.ridge_lambdas.index(c)
        scale = st["sxx"][layer].trace().item() / 32
        m = ridge_map(st["sxx"][layer], st["sxy"][layer], c * scale)
        b = st["my"] - st["mx"][layer] @ m
        h = (acts[layer].double() @ m + b).float()
        ref = kl_per_token(u64, acts[-1], h[None])[0].mean().item()
        assert min(kls) == pytest.approx(ref, rel=1e-4)
        torch.testing.assert_close(lens.transform(acts[layer], layer), h, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(lens.translators[0].weight) == 0


# -- config and paths ------------------------------------------------------------------------------
def test_lens_methods_in_params_and_paths():
    raw = yaml.safe_load((paths.repo_root() / "params.yaml").read_text())
    # the ridge lens run, as params.yaml's commented lens_sweep block adds it
    ridge = {"expansion_factor": 8, "k": 32, "lens_method": "ridge"}
    raw["lens_sweep"]["r8-k32-lens-ridge"] = ridge
    p = config.from_dict(raw)
    assert run_lens_method(p, "r8-k32-lens") == p.lens.method
    assert run_lens_method(p, "r8-k32-lens-ridge") == "ridge"
    assert run_lens_method(p, "r8-k32") is None
    assert paths.lens_path(p).parts[-2:] == (p.base.model, p.lens.method)
    assert paths.lens_path(p, ".", "ridge").name == "ridge"
    raw["lens"]["methods"] = ["belrose"]
    with pytest.raises(config.ConfigError, match="lens_method 'ridge': no such lens is made"):
        config.from_dict(raw)
    raw["lens"]["methods"] = ["ridge", "regression"]
    with pytest.raises(config.ConfigError, match="lens.method 'belrose' is not in lens.methods"):
        config.from_dict(raw)


# -- the paper's lens delta CE ---------------------------------------------------------------------
def _by_hooks(model, tokens, layer, replace):
    """CE per prediction with block ``layer``'s output replaced by ``replace(resid)`` via a hook."""

    def hook(act, hook):
        return replace(act)

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)])
    return F.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="none")


def test_delta_ce_paper_by_hand(tiny_model):
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 10, 11, 12]])  # BOS ... EOS ...
    lens = random_lens(32, 3, scale=0.3, seed=6)
    shrink = lambda y, layer: 0.8 * y + 0.1  # noqa: E731  a stand-in SAE in lens space
    res = delta_ce_paper(tiny_model, tokens, shrink, lens)
    keep = ~special_mask(tokens, special_token_ids(tiny_model))[0]
    scored = keep[:-1]
    clean = F.cross_entropy(tiny_model(tokens)[0, :-1].double(), tokens[0, 1:], reduction="none")
    for layer in range(3):
        t = lens.translators[layer + 1] if layer < 2 else None

        def lensed(a, t=t):
            out = a.clone()
            if t is not None:
                out[0, keep] = a[0, keep] + a[0, keep] @ t.weight.T + t.bias
            return out

        def recon(a, t=t):
            out = a.clone()
            y = lensed(a)[0, keep]
            r = 0.8 * y + 0.1
            if t is not None:
                inv = torch.linalg.inv(torch.eye(32) + t.weight.double()).diagonal()
                r = ((r.double() - t.bias.double()) * inv).float()
            out[0, keep] = r
            return out

        base = _by_hooks(tiny_model, tokens, layer, lensed)
        patched = _by_hooks(tiny_model, tokens, layer, recon)
        want = (patched - base)[scored].sum().item()
        shift = (base - clean)[scored].sum().item()
        assert res["delta_ce"][layer].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert res["baseline_shift"][layer].item() == pytest.approx(shift, rel=1e-4, abs=1e-5)
    assert res["n"].item() == scored.sum().item()
    assert abs(res["baseline_shift"][0].item()) > 1e-3  # the lens moves the baseline


def test_paper_delta_plus_shift_is_ours_with_the_exact_inverse(tiny_model):
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 5, 6, 2, 7, 8]])
    lens = random_lens(32, 3, scale=0.3, seed=8)
    shrink = lambda y, layer: 0.7 * y  # noqa: E731
    paper = delta_ce_paper(tiny_model, tokens, shrink, lens, diagonal=False)
    ours = delta_ce_kl(
        tiny_model, tokens, lambda x, ly: lens.invert(shrink(lens.transform(x, ly), ly), ly)
    )
    torch.testing.assert_close(
        paper["delta_ce"] + paper["baseline_shift"], ours["delta_ce"], rtol=1e-5, atol=1e-6
    )
    diag = delta_ce_paper(tiny_model, tokens, shrink, lens)
    assert not torch.allclose(diag["delta_ce"][:2], paper["delta_ce"][:2], atol=1e-3)
    y = torch.randn(4, 32)
    assert not torch.allclose(diagonal_inverse(lens, y, 0), lens.invert(y, 0), atol=1e-3)
    # row selection: only row 1 at every layer gives that row's sums and counts
    one = delta_ce_paper(tiny_model, tokens, shrink, lens, rows=lambda layer: torch.tensor([1]))
    torch.testing.assert_close(
        one["delta_ce_rows"][:, 1], diag["delta_ce_rows"][:, 1], rtol=1e-5, atol=1e-6
    )
    assert (one["delta_ce_rows"][:, 0] == 0).all()
    assert one["n_layer"].tolist() == [diag["n_rows"][1].item()] * 3


# -- the stages ------------------------------------------------------------------------------------
def test_train_and_evaluate_lens_stages_write_every_method(tiny_model, tmp_path, monkeypatch):
    from mlsae.stages import evaluate_lens as ev_stage
    from mlsae.stages import train_lens as tr_stage

    raw = yaml.safe_load((paths.repo_root() / "params.yaml").read_text())
    raw["base"] |= {"cache_dir": str(tmp_path / "cache")}
    raw["lens"] |= dict(steps=2, batch_tokens=32, belrose_steps=5, belrose_batch_tokens=32)
    raw["lens"] |= dict(heldout_tokens=16, ridge_tokens=2000, eval_tokens=64, belrose_loss_vocab=30)
    p = config.from_dict(raw)
    where = paths.cache_paths(p, tmp_path)
    _cache(tiny_model, where["train"], repeat=40)
    _cache(tiny_model, where["test"], repeat=4)
    for stage in (tr_stage, ev_stage):
        monkeypatch.setattr(stage, "load_model", lambda *a, **k: tiny_model)
    trained = tr_stage.train_lens(p, tmp_path)
    assert sorted(trained) == sorted(p.lens.methods)
    assert len(trained["belrose"]["history"]) == 5 and trained["ridge"]["history"] == []
    res = ev_stage.evaluate_lens(p, tmp_path)
    saved = yaml.safe_load(paths.results(tmp_path, "lens_kl.json").read_text())
    assert saved["tuned_lens"] == res["methods"][p.lens.method]["kl"] == res["tuned"]
    assert set(saved["methods"]) == set(p.lens.methods)
    for r in res["methods"].values():
        assert r["cond"][-1] == 1.0 and r["w_norm"][-1] == 0.0 and min(r["cond"]) >= 1.0
    w = TunedLens.load(paths.lens_path(p, tmp_path, "ridge")).translators[2].weight
    assert res["methods"]["ridge"]["w_norm"][1] == pytest.approx(w.double().norm().item())
    metrics = yaml.safe_load(paths.metrics(tmp_path, "lens.json").read_text())
    assert metrics["belrose_converged"] in (0, 1) and "ridge_max_cond" in metrics
