"""Every notebook runs through papermill with tiny parameters and writes what it declares."""

import json
import os
import sys
from pathlib import Path

import papermill as pm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [
    "01_build_cache.ipynb",
    "02_residual_drift.ipynb",
    "03_train_lens.ipynb",
    "04_train_mlsae.ipynb",
    "05_evaluate.ipynb",
    "06_single_layer_baselines.ipynb",
    "07_sweeps.ipynb",
    "08_latents_over_layers.ipynb",
    "09_latent_browser.ipynb",
]


def tiny_params(corpus: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"] |= {"model": "tiny-random-llama", "corpus": f"text:{corpus}"}
    params["data"] |= {
        "context_length": 32,
        "batch_contexts": 4,
        "train_tokens": 512,
        "test_tokens": 256,
    }
    params["train"] |= {"batch_tokens": 64, "checkpoint_tokens": 256, "dead_tokens": 128}
    params["lens"] |= {"steps": 3, "batch_tokens": 64}
    params["eval"] |= {"eval_tokens": 256}
    params["analysis"] |= {
        "drift_tokens": 128,
        "baseline_run": "r2-k4",
        "baseline_layers": [0, 1],
        "baseline_ce_contexts": 2,
    }
    params["sweep"] = {
        "r2-k4": {"expansion_factor": 2, "k": 4, "lens": False},
        "r1-k4": {"expansion_factor": 1, "k": 4, "lens": False},
        "r2-k8": {"expansion_factor": 2, "k": 8, "lens": False},
        "r2-k4-lens": {"expansion_factor": 2, "k": 4, "lens": True},
    }
    return params


@pytest.mark.slow
def test_every_notebook_runs_with_tiny_parameters(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the cat sat on the mat while a dog went to the store and John gave Mary a drink"
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join([words] * (3 + i % 4)))
    (tmp_path / "executed").mkdir()
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_params(corpus)))
    env_path = os.path.dirname(sys.executable)
    os.environ["PATH"] = env_path + os.pathsep + os.environ.get("PATH", "")
    for name in NOTEBOOKS:
        runs = ["r2-k4", "r1-k4", "r2-k8", "r2-k4-lens"] if name.startswith("04") else [None]
        for run in runs:
            parameters = {"params_path": str(params_path), "out_dir": str(tmp_path)}
            if run:
                parameters["run"] = run
            pm.execute_notebook(
                ROOT / "notebooks" / name,
                tmp_path / "executed" / f"{run or ''}{name}",
                parameters=parameters,
                cwd=str(ROOT),
                kernel_name="python3",
                progress_bar=False,
            )
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    for stem in [
        "residual_drift",
        "lens_kl",
        "train_fvu_r2-k4",
        "train_fvu_r2-k4-lens",
        "per_layer_metrics",
        "single_layer_matrices",
        "single_vs_mlsae",
        "sweeps",
        "latents_heatmaps",
        "latents_layer_histograms",
        "latents_thresholds",
        "latents_prompts",
        "latents_activity_sweeps",
        "latents_decoder_cosine",
    ]:
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures, stem
    assert {"table1.csv", "table1.md"} <= figures
    run = json.loads((tmp_path / "results" / "runs" / "r2-k4-lens.json").read_text())
    assert run["space"] == "lens" and len(run["per_layer"]["fvu_raw"]) == 2
    assert (tmp_path / "cache" / "lens" / "tiny-random-llama" / "params.pt").exists()
    baselines = json.loads((tmp_path / "results" / "baselines.json").read_text())
    assert len(baselines["fvu"]) == 3 and len(baselines["fvu"][0]) == 2
    sweeps = json.loads((tmp_path / "results" / "sweeps.json").read_text())
    assert [r["run"] for r in sweeps["R"]] == ["r1-k4", "r2-k4"]
    assert [r["run"] for r in sweeps["k"]] == ["r2-k4", "r2-k8"]
    latents = json.loads((tmp_path / "results" / "latents.json").read_text())
    assert set(latents["runs"]) == {"r2-k4", "r2-k4-lens"}
    assert latents["runs"]["r2-k4"]["summary"]["n_tokens"] > 0
    assert "latent_browser.html" in figures
    table = (tmp_path / "figures" / "table1.md").read_text()
    assert "r2-k4-lens" in table and "tiny-random-llama" in table


def test_source_notebooks_have_no_outputs():
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name
