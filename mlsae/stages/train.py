"""Stages ``train_mlsae`` / ``train_mlsae_lens`` (notebook 04) and ``train_baselines`` (07a).

Training only: these import the training path (data, model, sources, SAE, training loop, lens)
and nothing of evaluation, statistics, plotting or prose, so only a change to that path or to
the training settings retrains.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.corpora import iter_corpus
from mlsae.data import split_corpus
from mlsae.models import load_model
from mlsae.sources import CacheSource, ModelStream, TrainingSource
from mlsae.stages.runs import run_lens, sweep_entry
from mlsae.train import TrainConfig, train


def train_config(
    params, run: str, layers: list[int] | None = None, lens_sha=None, tokens: int | None = None
) -> TrainConfig:
    """The `TrainConfig` of sweep entry ``run`` (on ``layers``; None: every layer).

    Its ``run`` and ``train`` sections are params.yaml's own; the budget is ``tokens`` (default:
    the entry's ``train_tokens``, or ``data.train_tokens``) times ``train.epochs``.
    """
    entry = sweep_entry(params, run)
    tokens = tokens or entry.train_tokens or params.data.train_tokens
    return TrainConfig(
        run=entry,
        train=params.train,
        max_tokens=tokens * params.train.epochs,
        layers=layers,
        seed=params.base.seed,
        device=params.base.device,
        extra={
            "run": run,
            "model": params.base.model,
            "corpus": params.base.corpus,
            "lens_sha": lens_sha,
        },
    )


def training_source(
    params,
    out_dir: str | Path = ".",
    model: HookedTransformer | None = None,
    layers: list[int] | None = None,
    device: str | None = None,
    tokens: int | None = None,
) -> TrainingSource:
    """The `mlsae.sources.TrainingSource` that ``train.source`` names (``layers``: None = all).

    ``cache``: the training cache of stage 01 (a clear `ConfigError` when there is none).
    ``stream``: the model run on the training documents (loaded here unless given). ``tokens``:
    the run's budget per epoch (`passes`).
    """
    if params.train.source == "cache":
        path = paths.cache_paths(params, out_dir)["train"]
        meta = path / "meta.json"
        if not meta.exists() or json.loads(meta.read_text()).get("source") == "stream":
            raise config.ConfigError(
                f"train.source is 'cache' but there is no training cache at {path}: build it "
                "with the cache stage (dvc repro build_cache, notebooks/01_build_cache.ipynb) "
                "or set train.source: stream."
            )
        chunks = CacheSource(ActivationCache(path), layers)
    else:
        if model is None:
            model = load_model(params.base.model, device=device or params.base.device)
        autocast = params.train.stream_autocast
        on_gpu = str(model.cfg.device).startswith("cuda")
        docs = split_corpus(
            iter_corpus(params.base.corpus), params.data.test_fraction, params.base.seed
        )[0]
        chunks = ModelStream(
            model,
            docs,
            params.data.context_length,
            params.data.batch_contexts,
            layers=layers,
            seed=params.base.seed,
            doc_buffer=params.data.shuffle_documents,
            autocast=getattr(torch, autocast) if on_gpu and autocast != "none" else None,
        )
    return TrainingSource(
        chunks, params.train.shuffle_tokens, params.base.seed, epochs=passes(params, tokens)
    )


def passes(params, tokens: int | None) -> int:
    """Passes over the training data for a run of ``tokens`` (None: ``data.train_tokens``).

    ``train.epochs`` times the passes the budget needs: a run longer than the training cache
    (``sweep.<run>.train_tokens`` > ``data.train_tokens``) reads it again, each pass in another
    seeded order, rather than stopping when the cache ends.
    """
    per_epoch = -(-(tokens or params.data.train_tokens) // params.data.train_tokens)
    return params.train.epochs * per_epoch


def train_mlsae(params: config.Params, run: str, out_dir: str | Path = ".", model=None) -> Path:
    """Train (or resume) sweep entry ``run``; returns its run folder (`mlsae.paths.run_dir`).

    Reads the training data (`training_source`), and the lens for a ``lens_sweep`` entry. The
    model is loaded only when training reads a stream (``model`` may be given instead).
    """
    lens, lens_sha = run_lens(params, run, out_dir)
    cfg = train_config(params, run, lens_sha=lens_sha)
    folder = paths.run_dir(params, run, out_dir)
    tokens = sweep_entry(params, run).train_tokens
    train(cfg, training_source(params, out_dir, model, tokens=tokens), folder, lens=lens)
    return folder


def train_baselines(params: config.Params, out_dir: str | Path = ".", model=None) -> dict:
    """Single-layer SAEs at ``analysis.baseline_layers``; returns ``{layer: run folder}``.

    Each has the size of ``analysis.baseline_run`` and its budget at the comparison point
    (``analysis.compare_tokens``, where the baseline run keeps a snapshot; else its own budget),
    but trains on one layer's vectors.

    Each goes to ``<cache_dir>/baselines/layer-<L>`` (a persistent DVC output: an interrupted
    stage resumes, and a change to how they are evaluated or drawn never retrains them).
    """
    run, folders = params.analysis.baseline_run, {}
    for layer in params.analysis.baseline_layers:
        folder = paths.baselines_dir(params, out_dir) / f"layer-{layer}"
        tokens = config.compare_tokens(params)
        cfg = train_config(params, run, layers=[layer], tokens=tokens)
        train(cfg, training_source(params, out_dir, model, [layer], tokens=tokens), folder)
        folders[layer] = folder
    return folders
