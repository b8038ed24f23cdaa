"""Stage-level functions the notebooks call: build the activation cache, train a run, evaluate it.

Each returns plain data and writes small JSON files, so notebooks only drive and plot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mlsae.activations import ActivationCache
from mlsae.data import token_batches
from mlsae.metrics import evaluate
from mlsae.train import TrainConfig, load_sae, train

logger = logging.getLogger(__name__)


def get_cache(
    path: str | Path,
    model: HookedTransformer,
    docs: list[str],
    context_length: int,
    batch_size: int,
    max_tokens: int,
    meta: dict,
) -> ActivationCache:
    """Open the activation cache at ``path`` if it was built with ``meta``, else build it."""
    path = Path(path)
    wanted = {**meta, "context_length": context_length, "max_tokens": max_tokens}
    if (path / "meta.json").exists():
        cache = ActivationCache(path)
        if all(cache.meta.get(k) == v for k, v in wanted.items()):
            return cache
        logger.info("Rebuilding %s: its metadata differs from %s", path, wanted)
    return ActivationCache.build(
        path, model, docs, context_length, batch_size, max_tokens, meta=wanted
    )


def train_and_evaluate(
    cfg: TrainConfig,
    cache: ActivationCache,
    run_dir: str | Path,
    model: HookedTransformer,
    test_docs: list[str],
    context_length: int,
    eval_batch_size: int,
    eval_tokens: int,
    ce_batches: int | None,
    lens=None,
    progress: bool = True,
) -> dict:
    """Train (or resume) a run, evaluate it on held-out text, write ``run_dir/metrics.json``."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    done = run_dir / "checkpoint.pt"
    budget = cache.n_tokens if cfg.max_tokens is None else min(cfg.max_tokens, cache.n_tokens)
    if done.exists() and torch.load(done, weights_only=False)["tokens_seen"] >= budget:
        sae = load_sae(done, cfg.device)
    else:
        sae = train(cfg, cache, run_dir, lens=lens, progress=progress)
    batches = token_batches(
        test_docs, model.tokenizer, context_length, eval_batch_size, eval_tokens
    )
    result = evaluate(sae, model, batches, lens=lens, ce_batches=ce_batches, layers=cfg.layers)
    result["config"] = {k: v for k, v in vars(cfg).items() if k != "extra"} | cfg.extra
    metrics_file.write_text(json.dumps(result, indent=1))
    return result
