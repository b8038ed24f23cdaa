"""The authors' published MLSAE format (`mlsae.hub_import`), on files a fixture writes.

The fixture follows the original's key names and shapes (tim-lawson/mlsae ``MLSAE`` /
``MLSAETransformer`` saved by ``PyTorchModelHubMixin``; ``-dists`` rows of
``mlsae/analysis/dists.py``); the reference forward below transcribes their formulas
(``mlsae/model/autoencoder.py``) independently of `mlsae.sae`.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from mlsae import hub_import, imported
from mlsae.cli import main
from mlsae.latents import LayerStats
from mlsae.train import load_sae, save_checkpoint

D, N, K = 16, 64, 4


def original_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Encoder (n, d), decoder (d, n) with nearly (not exactly) unit-norm columns, bias (d,)."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(N, D, generator=g) / D**0.5
    dec = enc.T.contiguous().clone()
    dec /= dec.norm(dim=0)
    dec *= 1 + 1e-3 * torch.randn(1, N, generator=g)  # as after the original's last Adam step
    return {"encoder.weight": enc, "decoder.weight": dec, "pre_encoder_bias": 0.1 * torch.randn(D)}


def write_original(folder, tfm: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A save_pretrained folder of the original's MLSAE (or, with ``tfm``, MLSAETransformer)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = original_tensors(seed)
    if tfm:
        state = {f"autoencoder.{k}": v for k, v in tensors.items()}
        state["autoencoder.last_nonzero"] = torch.zeros(N, dtype=torch.long)
        state["transformer.model.gpt_neox.embed_in.weight"] = torch.randn(50, D)
        state["loss_true"] = torch.zeros(6)
        config = {
            "model_name": "EleutherAI/pythia-70m-deduped",
            "layers": [0, 1, 2, 3, 4, 5],
            "expansion_factor": N // D,
            "k": K,
            "auxk": 256,
            "auxk_coef": 1 / 32,
            "dead_tokens_threshold": 10_000_000,
            "tuned_lens": False,
            "standardize": True,
            "max_length": 2048,
        }
    else:
        state = tensors | {"last_nonzero": torch.zeros(N, dtype=torch.long)}
        config = {
            "n_inputs": D,
            "n_latents": N,
            "k": K,
            "dead_steps_threshold": 76,
            "dead_threshold": 1e-3,
            "auxk": 256,
            "standardize": True,
        }
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def reference_recons(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Their forward: standardise, subtract the bias, encode, top k, ReLU, decode, undo."""
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    std = centred.std(-1, keepdim=True)  # unbiased
    xs = centred / (std + 1e-5)
    latents = (xs - t["pre_encoder_bias"]) @ t["encoder.weight"].T
    values, indices = torch.topk(latents, K, sorted=False)
    dense = torch.zeros_like(latents).scatter_(-1, indices, values.relu())
    recons = dense @ t["decoder.weight"].T + t["pre_encoder_bias"]
    return recons * std + mean, indices


@pytest.mark.parametrize("tfm", [False, True])
def test_imported_sae_reproduces_the_original_forward(tmp_path, tfm):
    tensors = write_original(tmp_path / "mlsae-pythia-70m-deduped-x4-k4", tfm=tfm)
    sae, info = hub_import.import_mlsae(tmp_path / "mlsae-pythia-70m-deduped-x4-k4")
    assert info["tfm"] is tfm and info["prefix"] == ("autoencoder." if tfm else "")
    assert (sae.d_model, sae.n_latents, sae.k) == (D, N, K)
    # stored as it is: the nearly unit-norm decoder is not renormalised
    assert torch.equal(sae.W_dec.detach(), tensors["decoder.weight"].T)
    lo, hi = info["decoder_norm_range"]
    assert lo < 1 - 1e-5 or hi > 1 + 1e-5
    x = 3 * torch.randn(2, 40, D, generator=torch.Generator().manual_seed(1)) + 0.5
    want, want_idx = reference_recons(tensors, x)
    with torch.no_grad():
        out = sae(x)
    torch.testing.assert_close(out.recons, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.indices.sort(-1).values, want_idx.sort(-1).values)


def test_cli_writes_a_checkpoint_that_load_sae_reads(tmp_path):
    tensors = write_original(tmp_path / "src", tfm=True)
    main(["import-hub", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    sae = load_sae(tmp_path / "out" / "checkpoint.pt")
    assert torch.equal(sae.W_enc.detach(), tensors["encoder.weight"])
    assert torch.equal(sae.b_pre.detach(), tensors["pre_encoder_bias"])
    assert bool(sae.b_pre_initialized)
    main(["import-hub", str(tmp_path / "src"), "--out", str(tmp_path / "out")])  # re-import: ok


def test_import_never_overwrites_a_trained_checkpoint(tmp_path):
    write_original(tmp_path / "src")
    trained = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(trained, {"sae": {}, "sae_config": {}, "optimizer": None, "tokens_seen": 5})
    before = trained.read_bytes()
    with pytest.raises(FileExistsError, match="trained checkpoint"):
        main(["import-hub", str(tmp_path / "src"), "--out", str(tmp_path / "run")])
    assert trained.read_bytes() == before


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        hub_import.import_mlsae(tmp_path / "nowhere")
    folder = tmp_path / "bad"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hub_import.import_mlsae(folder)
    save_file({"encoder.weight": torch.zeros(N, D)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks the MLSAE tensors"):
        hub_import.import_mlsae(folder)
    t = original_tensors()
    t["decoder.weight"] = t["decoder.weight"][:, :-1].contiguous()
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"k": K}))
    with pytest.raises(ValueError, match="Inconsistent shapes"):
        hub_import.import_mlsae(folder)
    save_file(original_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"k": N + 1}))
    with pytest.raises(ValueError, match="k must be"):
        hub_import.import_mlsae(folder)
    (folder / "config.json").write_text(json.dumps({"k": K, "n_latents": N + 1}))
    with pytest.raises(ValueError, match="n_latents"):
        hub_import.import_mlsae(folder)


def test_repo_names():
    assert hub_import.parse_repo_id("tim-lawson/mlsae-pythia-70m-deduped-x64-k32-lens-tfm") == {
        "model": "pythia-70m-deduped",
        "expansion_factor": 64,
        "k": 32,
        "lens": True,
        "tfm": True,
        "multi_layer": True,
    }
    assert hub_import.parse_repo_id("tim-lawson/mlsae-pythia-160m-deduped-x16-k32")["lens"] is False
    assert hub_import.parse_repo_id("something-else") == {}


def write_dists(folder, counts: np.ndarray, totals: np.ndarray) -> None:
    """The original's -dists rows (``Dists.__iter__``), shuffled, as a hub parquet shard."""
    layers = np.arange(counts.shape[0])[:, None]
    probs = totals / totals.sum(0)
    layer_mean = (probs * layers).sum(0)
    layer_var = (probs * layers**2).sum(0) - layer_mean**2
    rows = [
        {
            "latent": i,
            "count": float(counts[:, i].sum()),
            "total": float(totals[:, i].sum()),
            "mean": float(totals[:, i].sum() / (counts[:, i].sum() + 1e-8)),
            "layer_mean": float(layer_mean[i]),
            "layer_var": float(layer_var[i]),
            "layer_std": float(np.sqrt(layer_var[i])),
            "counts": counts[:, i].tolist(),
            "totals": totals[:, i].tolist(),
            "means": (totals[:, i] / (counts[:, i] + 1e-8)).tolist(),
            "probs": probs[:, i].tolist(),
        }
        for i in np.random.default_rng(0).permutation(counts.shape[1])
    ]
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "train-00000-of-00001.parquet")


def test_dists_dataset_into_layer_stats(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 50, size=(6, N)).astype(float)
    totals = counts * rng.uniform(0.5, 2.0, size=(6, N))
    write_dists(tmp_path / "d", counts, totals)
    stats, info = hub_import.read_dists(tmp_path / "d")
    assert (info["n_layers"], info["n_latents"]) == (6, N)
    np.testing.assert_array_equal(stats.counts.numpy(), counts)
    np.testing.assert_allclose(stats.totals.numpy(), totals)
    assert info["layer_std_max_abs_diff"] < 1e-9
    # the Figure 2 statistics run on it: the mean layer is the dataset's (0-based)
    probs = totals / totals.sum(0)
    computed = stats.compute()
    np.testing.assert_allclose(
        computed["mean_layer"].numpy(), (probs * np.arange(6)[:, None]).sum(0)
    )
    main(["import-hub", str(tmp_path / "d"), "--dists", "--out", str(tmp_path / "o")])
    again = LayerStats.load(tmp_path / "o" / "latent_stats.pt")
    assert torch.equal(again.totals, stats.totals)


def test_dists_without_its_columns(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist([{"latent": 0}]), tmp_path / "d" / "x.parquet")
    with pytest.raises(ValueError, match="counts"):
        hub_import.read_dists(tmp_path / "d")


def test_evaluate_imported_on_a_tiny_model(tmp_path, monkeypatch, tiny_model, brown):
    """Our evaluation of an imported SAE: its FVU equals the original's forward on the same
    cached vectors, delta CE is measured, and a lens SAE is refused (its lens is not imported)."""
    import yaml
    from conftest import build_cache

    from mlsae import config, models

    d = tiny_model.cfg.d_model
    g = torch.Generator().manual_seed(3)
    enc = torch.randn(4 * d, d, generator=g) / d**0.5
    dec = (enc / enc.norm(dim=1, keepdim=True)).T.contiguous()
    src = tmp_path / "mlsae-tiny-x4-k4"
    src.mkdir()
    tensors = {"encoder.weight": enc, "decoder.weight": dec, "pre_encoder_bias": torch.zeros(d)}
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"n_inputs": d, "n_latents": 4 * d, "k": K}))
    main(["import-hub", str(src), "--out", str(tmp_path / "imp")])
    build_cache(tmp_path / "c" / "activations" / "test", tiny_model, brown[:6], 32, 2)
    params_file = tmp_path / "p.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "base": {"cache_dir": str(tmp_path / "c"), "device": "cpu"},
                "eval": {"eval_tokens": 128, "ce_contexts": 4, "ce_stride": 1, "ce_bf16": False},
            }
        )
    )
    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_model)
    params = config.load(params_file)
    result = imported.evaluate_imported(
        params, tmp_path / "imp" / "checkpoint.pt", tmp_path, tmp_path / "r" / "imp.json"
    )
    assert (tmp_path / "r" / "imp.latent_stats.pt").exists()
    main(
        [
            "evaluate-imported",
            str(tmp_path / "imp" / "checkpoint.pt"),
            "--params",
            str(params_file),
            "--root",
            str(tmp_path),
            "--out",
            str(tmp_path / "r" / "cli.json"),
        ]
    )
    assert json.loads((tmp_path / "r" / "cli.json").read_text())["mean"] == result["mean"]
    from mlsae.activations import ActivationCache, take_tokens

    cache = ActivationCache(tmp_path / "c" / "activations" / "test")
    x = torch.cat(list(take_tokens(cache.iter_batches(1024), 128)), dim=1)  # (layer, token, d)
    recons, _ = reference_recons(tensors, x)
    err = (x - recons).pow(2).sum((1, 2))
    total = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    np.testing.assert_allclose(result["per_layer"]["fvu"], (err / total).tolist(), rtol=1e-4)
    assert len(result["per_layer"]["delta_ce"]) == tiny_model.cfg.n_layers
    assert np.isfinite(result["mean"]["delta_ce"])
    state = torch.load(tmp_path / "imp" / "checkpoint.pt", weights_only=False)
    state["imported_from"]["lens"] = True
    torch.save(state, tmp_path / "imp" / "lens.pt")
    with pytest.raises(ValueError, match="lens is not imported"):
        imported.evaluate_imported(params, tmp_path / "imp" / "lens.pt", tmp_path, tmp_path / "x")
