"""The client scripts run end to end in their own environments (``make clients``), on SmolLM2.

Each test runs a script with the interpreter of the environment `make clients` builds (skipped
where it has not been built; ``make test`` builds it first), on a few held-out-like contexts and a
random SAE at one layer, and checks what the tool computed against our own formulas.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae import saelens
from mlsae.sae import MLSAE

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
    "election produced no evidence that any irregularities took place. The jury further said in "
    "term-end presentments that the City Executive Committee, which had over-all charge of the "
    "election, deserves the praise and thanks of the City of Atlanta for the manner in which the "
    "election was conducted."
)


def client_python(name: str) -> Path:
    python = ROOT / f".venv-{name}" / "bin" / "python"
    if not python.exists():
        pytest.skip(f".venv-{name} not built (make clients)")
    return python


def fixture_cache(tmp_path: Path, tokenizer, layer: int, n_ctx: int = 2, length: int = 48):
    """contexts.npy (BOS first), a random unit-norm SAE's view at ``layer``, our per-context CSV."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id, *ids[i : i + length - 1]] for i in range(n_ctx)]
    test = tmp_path / "cache" / "activations" / "test"
    test.mkdir(parents=True)
    np.save(test / "contexts.npy", np.asarray(rows, dtype=np.int32))
    torch.manual_seed(0)
    sae = MLSAE(d_model=576, n_latents=1152, k=8).eval()
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(1152, 576), dim=-1))
    saelens.save_layer_views(
        sae, tmp_path / "cache" / "saelens" / "r8-k32", "smollm2-135m", [layer]
    )
    ours = tmp_path / "ours"
    (ours / "per_context").mkdir(parents=True)
    (ours / "per_layer").mkdir()
    with open(ours / "per_context" / "r8-k32.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["context", "layer", "patched", "n_pred", "delta_ce_sum", "kl_sum", "n_tokens"])
        for c in range(n_ctx):
            w.writerow([c, layer, 1, length - 2, 1.0, 1.0, length - 1])
    (ours / "per_layer" / "r8-k32.csv").write_text(f"layer,fvu\n{layer},0.5\n")
    return sae, rows


@pytest.mark.slow
def test_saebench_core_runs_offline_and_its_fvu_is_its_formula(smollm2, tmp_path):
    """SAEBench's own core code on our export: its FVU is the formula `fvu_check` writes out
    (1 - its explained_variance, to float32 rounding), and its delta CE and KL are finite."""
    python = client_python("saebench")
    _, rows = fixture_cache(tmp_path, smollm2.tokenizer, layer=1)
    # the test cache's float16 shard of layer 1, from the main environment's TransformerLens 3
    tokens = torch.tensor(rows)
    keep = ~torch.isin(tokens, torch.tensor([smollm2.tokenizer.bos_token_id]))
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    resid = cache["blocks.1.hook_resid_post"][keep]
    test = tmp_path / "cache" / "activations" / "test"
    np.save(test / "shard_00000.npy", resid.expand(2, -1, -1).numpy().astype(np.float16))
    np.save(test / "shard_00000.tokens.npy", tokens[keep].numpy().astype(np.int32))
    (test / "meta.json").write_text(json.dumps({"shards": ["shard_00000"]}))
    cmd = [
        str(python), "clients/saebench.py", "--cache", str(tmp_path / "cache"), "--layers", "1",
        "--saes", "r8-k32", "--evals", "core", "--ours", str(tmp_path / "ours"),
        "--out", str(tmp_path / "sb"), "--summary", str(tmp_path / "summary.json"),
        "--eval-tokens", "47",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900)
    (row,) = json.loads((tmp_path / "summary.json").read_text())["rows"]
    core = row["core"]
    assert core["fvu"] == pytest.approx(core["fvu_check"]["saebench_formula"], rel=1e-4)
    assert core["fvu_check"]["ours"] > core["fvu_check"]["saebench_formula"]  # centred total
    assert core["fvu_check"]["n_tokens"] == 2 * 47  # BOS left out, as SAEBench's driver does
    assert np.isfinite(core["delta_ce"]) and core["delta_ce"] > 0
    assert core["sparsity"]["l0"] == pytest.approx(8.0)
    assert row["ours"]["delta_ce"] == pytest.approx(2.0 / (2 * 46))
    check = core["fvu_check"]  # the float16 cache of the other environment's forward
    assert check["cache_relative_difference"] < 1e-3
    assert check["ours_on_cache"] == pytest.approx(check["ours"], rel=1e-2)
    assert 0 < check["largest_token_share_first_eval_tokens"] <= 1


@pytest.mark.slow
def test_dashboard_page_offline(smollm2, tmp_path):
    """sae-dashboard writes a page for the chosen latents that loads nothing from the network."""
    python = client_python("dashboard")
    sae, rows = fixture_cache(tmp_path, smollm2.tokenizer, layer=1)
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(torch.tensor(rows), names_filter=[hook])
        out = sae(cache[hook][:, 1:].reshape(-1, 576))  # BOS left out
    acts = torch.zeros(len(out.values), 1152).scatter_(1, out.indices, out.values)
    counts = torch.zeros(30, 1152, dtype=torch.float64)
    totals = torch.zeros(30, 1152, dtype=torch.float64)
    counts[1], totals[1] = (acts > 0).sum(0).double(), acts.sum(0).double()
    n_tokens = len(acts)
    stats = tmp_path / "cache" / "latent_stats"
    stats.mkdir()
    torch.save({"totals": totals, "counts": counts, "n_tokens": n_tokens}, stats / "r8-k32.pt")
    dense = counts[1] / n_tokens <= 0.05
    expected = torch.where(dense, totals[1], float("-inf")).topk(2).indices.tolist()
    cmd = [
        str(python), "clients/dashboard.py", "--cache", str(tmp_path / "cache"), "--layers", "1",
        "--per-layer", "2", "--contexts", "2", "--out", str(tmp_path / "dash"),
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900)
    page = (tmp_path / "dash" / "layer_1.html").read_text()
    assert not re.search(r"<(?:script|link)[^>]*(?:src|href)=[\"']?https?:", page)
    assert "/* d3@6.7.0 */" in page and "/* plotly.js-dist-min@1.58.5 */" in page
    assert json.loads((tmp_path / "dash" / "latents.json").read_text()) == {"1": expected}
    for latent in expected:
        assert f"{latent}" in page
