"""The client-tool script's own pieces (clients/dashboard.py), in the main environment.

The script itself runs in `make clients`' environment (sae-dashboard's pins); what it adds to the
tool is tested here: the stated latent set, the transformers-4 tokenizer copy and the offline page.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "clients" / "dashboard.py")
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
