"""The client-tool script's own pieces (clients/dashboard.py), in the main environment.

The script itself runs in `make clients`' environment (sae-dashboard's pins); what it adds to the
tool is tested here: the stated latent set, the transformers-4 tokenizer copy and the offline page.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str = "dashboard"):
    """A client script as a module (``clients/`` on sys.path, as when it is run)."""
    if str(ROOT / "clients") not in sys.path:
        sys.path.insert(0, str(ROOT / "clients"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "clients" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chosen_latents_by_mass_among_sparse_latents(tmp_path):
    dash = load_script()
    totals = torch.zeros(3, 6, dtype=torch.float64)
    counts = torch.zeros(3, 6, dtype=torch.float64)
    totals[1] = torch.tensor([9.0, 5.0, 1.0, 7.0, 0.0, 3.0])
    counts[1] = torch.tensor([90.0, 4.0, 1.0, 5.0, 0.0, 2.0])  # latent 0 fires on 90% of tokens
    torch.save({"totals": totals, "counts": counts, "n_tokens": 100}, tmp_path / "s.pt")
    assert dash.chosen_latents(tmp_path / "s.pt", [1], 2) == {1: [3, 1]}
    assert dash.chosen_latents(tmp_path / "s.pt", [1], 2, max_density=1.0) == {1: [0, 3]}


def test_tokenizer_copy_reads_in_transformers_and_tokenizes_alike(smollm2, tmp_path):
    """The copy for transformers 4 (class PreTrainedTokenizerFast) gives the same ids and the
    same strings (the dashboard is given token ids, BOS included, and decodes them)."""
    from transformers import AutoTokenizer

    from mlsae.models import cache_dir

    dash = load_script()
    saved = cache_dir() / "smollm2-135m-hf"
    link = tmp_path / "smollm2-135m-hf"
    link.symlink_to(saved)
    folder = dash.transformers4_tokenizer(link)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    copy = AutoTokenizer.from_pretrained(folder)
    text = "The jury said it did find that many of Georgia's registration laws are outmoded."
    ids = smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert copy(text, add_special_tokens=False)["input_ids"] == ids
    ids = [smollm2.tokenizer.bos_token_id, *ids, smollm2.tokenizer.eos_token_id]
    assert [copy.decode([i]) for i in ids] == [smollm2.tokenizer.decode([i]) for i in ids]
    assert copy.bos_token_id == smollm2.tokenizer.bos_token_id


def test_offline_page_inlines_the_cdn_libraries(tmp_path):
    dash = load_script()
    page = tmp_path / "p.html"
    page.write_text(
        '<html><head><script src="https://d3js.org/d3.v6.min.js"></script>'
        '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script></head><body/></html>'
    )
    dash.offline_page(page)
    html = page.read_text()
    assert "https://" not in html.split("<body")[0].split("/*")[0]
    assert "d3@6.7.0" in html and "plotly.js-dist-min@1.58.5" in html
    assert html.count("<script>") == 2 and len(html) > 1_000_000
    (tmp_path / "q.html").write_text('<script src="https://cdn.plot.ly/plotly-latest.min.js" x>')
    with pytest.raises(ValueError):  # an unterminated tag is not silently kept
        dash.offline_page(tmp_path / "q.html")


def test_fvu_check_against_hand_computed_values():
    """SAEBench's FVU as its code computes it, ours and the uncentred ratio, on two tokens."""
    bench = load_script("saebench")
    x = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    x_hat = torch.tensor([[1.0, 2.0], [2.0, 5.0]])
    out = bench.fvu_check(x, x_hat)
    # squared error 1 + 1 = 2; ||x||^2: 10 and 34; mean x = (2, 4); centred total 2 + 2 = 4.
    assert out["ours"] == pytest.approx(2 / 4)
    # SAEBench 0.6: mean squared error per token 1, "total variance" E||x||^2 - (E x_j^2)^2 over
    # j = 22 - ((1 + 9 + 9 + 25) / 4)^2 = 22 - 121 = -99 (not a variance at all).
    assert out["saebench_formula"] == pytest.approx(1 / -99)
    assert out["uncentred"] == pytest.approx(2 / 44)
    assert out["sq_norm_of_mean"] == pytest.approx(20.0)


def test_patched_contexts_and_our_numbers_at_a_layer(tmp_path):
    bench = load_script("saebench")
    path = tmp_path / "pc.csv"
    rows = [
        "context,layer,patched,n_pred,delta_ce_sum,kl_sum,n_tokens,sse,sse_raw",
        "0,3,1,10,5.0,6.0,11,1,",
        "1,3,0,0,0,0,11,1,",
        "2,3,1,30,3.0,2.0,11,1,",
        "0,4,0,0,0,0,11,1,",
    ]
    path.write_text("\n".join(rows) + "\n")
    assert bench.patched_contexts(path, 3) == [0, 2]
    ours = bench.ours_at_layer(path, 3)
    assert ours["delta_ce"] == pytest.approx(8 / 40)  # a ratio of sums over predictions
    assert ours["kl"] == pytest.approx(8 / 40)
    assert ours["contexts"] == 2
    with pytest.raises(ValueError, match="no patched contexts at layer 4"):
        bench.patched_contexts(path, 4)


def test_export_layers_writes_snapshot_and_baseline_views(tmp_path, monkeypatch):
    """export-layers --tokens and --baselines: SAELens views that encode as the checkpoints do."""
    from sae_lens import SAE

    from mlsae.cli import main
    from mlsae.sae import MLSAE

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())

    def write(path, seed):
        torch.manual_seed(seed)
        sae = MLSAE(d_model=8, n_latents=16, k=2)
        with torch.no_grad():
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, 8), dim=-1))
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"sae": sae.state_dict(), "sae_config": sae.config(), "optimizer": None}
        torch.save({**state, "tokens_seen": 1, "train_config": {"layers": [0, 2]}}, path)
        return sae.eval()

    run = tmp_path / "cache" / "runs" / "r8-k32"
    write(run / "checkpoint.pt", 0)
    snap = write(run / "snapshots" / "tokens-64000.pt", 1)
    base = write(tmp_path / "cache" / "baselines" / "layer-2" / "checkpoint.pt", 2)
    main(["export-layers", "r8-k32", "--tokens", "64000"])
    main(["export-layers", "--baselines"])
    x = torch.randn(5, 8)
    for folder, sae, layer in [("r8-k32@64000/layer_2", snap, 2), ("baselines/layer_2", base, 2)]:
        view = SAE.load_from_disk(str(tmp_path / "cache" / "saelens" / folder))
        assert view.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        with torch.no_grad():
            torch.testing.assert_close(view.decode(view.encode(x)), sae(x)[0], atol=1e-5, rtol=0)
    assert not (tmp_path / "cache" / "saelens" / "r8-k32@64000" / "layer_1").exists()
