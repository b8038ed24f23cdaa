"""The paper's model family end to end, offline: a random Pythia-architecture model by its hub
name, the test cache, training from the stream, and evaluation (as `params-paper.yaml` runs)."""

import json
import math

from conftest import PYTHIA, write_text_corpus

from mlsae import config
from mlsae.models import load_model
from mlsae.stages.cache import build_caches
from mlsae.stages.evaluate import evaluate_run
from mlsae.stages.train import train_mlsae


def test_tiny_pythia_loads_streams_trains_and_evaluates(tmp_path, tiny_pythia):
    corpus = write_text_corpus(tmp_path / "corpus", n_docs=80)
    params = config.from_dict(
        {
            "base": {"model": PYTHIA, "corpus": f"text:{corpus}", "cache_dir": "cache"},
            "data": {
                "context_length": 32,
                "batch_contexts": 4,
                "train_tokens": 2048,
                "test_tokens": 256,
                "test_fraction": 0.2,
            },
            "train": {"source": "stream", "batch_tokens": 32, "shuffle_tokens": 256, "lr": 3e-3},
            "lens": {"train": False},
            "eval": {"eval_tokens": 256, "ce_contexts": 4},
            "sweep": {"r4-k8": {"expansion_factor": 4, "k": 8}},
            "analysis": {"baseline_run": "r4-k8", "baseline_layers": [0]},
        }
    )
    model = load_model(PYTHIA)
    assert model.cfg.original_architecture == "GPTNeoXForCausalLM" and model.cfg.n_layers == 3
    metas = build_caches(params, model, tmp_path)
    assert metas["train"]["source"] == "stream" and not list(
        (tmp_path / "cache/activations/train").glob("*.npy")
    )  # no training cache on disk
    train_mlsae(params, "r4-k8", tmp_path, model)
    result = evaluate_run(params, "r4-k8", tmp_path, 0.22, model=model)["result"]
    assert result["tokens_trained"] == 2048
    assert len(result["per_layer"]["fvu"]) == 3 and result["mean"]["fvu"] < 1.0
    assert math.isfinite(result["mean"]["delta_ce"]) and result["mean"]["l0"] == 8
    saved = json.loads((tmp_path / "results/runs/r4-k8.json").read_text())
    assert saved["mean"] == result["mean"]
