"""Stage ``build_cache`` (notebook 01): the held-out and training activation caches."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
from transformer_lens import HookedTransformer

from mlsae import config, paths
from mlsae.activations import ActivationCache
from mlsae.corpora import document_labels, iter_corpus
from mlsae.data import sample_contexts, split_corpus, split_indices
from mlsae.models import load_model
from mlsae.writers import write_json, write_metrics

logger = logging.getLogger(__name__)


def build_cache(params: config.Params, out_dir: str | Path = ".") -> dict:
    """Load the model, check params against it, build both caches and record their data mix.

    Writes the caches, ``results/data_mix.json`` and ``results/metrics/data.json``. Returns
    ``{"metas", "mix", "summary"}`` (`build_caches`, `data_mix`).
    """
    model = load_model(params.base.model, device=params.base.device)
    config.validate(
        params, d_model=model.cfg.d_model, n_ctx=model.cfg.n_ctx, n_layers=model.cfg.n_layers
    )
    metas = build_caches(params, model, out_dir)
    counts, summary = data_mix(metas)
    write_json(
        paths.results(out_dir, "data_mix.json"), {"summary": summary, "tokens_per_label": counts}
    )
    numbers = {split: {k: v for k, v in s.items() if k != "source"} for split, s in summary.items()}
    write_metrics(paths.metrics(out_dir, "data.json"), numbers)
    return {"metas": metas, "counts": counts, "summary": summary}


def build_caches(params, model: HookedTransformer, out_dir: str | Path = ".") -> dict:
    """The test cache, and the training cache when ``train.source`` is ``cache``.

    Each cache holds contexts sampled across every document of its split
    (`mlsae.data.sample_contexts`), in random order. For ``train.source: stream`` the training
    folder gets only a ``meta.json`` saying so (training then runs the model itself). A cache
    whose ``meta.json`` matches the settings is kept. Returns ``{split: meta}``.
    """
    docs = split_corpus(
        iter_corpus(params.base.corpus), params.data.test_fraction, params.base.seed
    )
    labels = split_labels(params)
    meta = {
        "model": params.base.model,
        "corpus": params.base.corpus,
        "seed": params.base.seed,
        "test_fraction": params.data.test_fraction,
        "context_length": params.data.context_length,
    }
    wanted = {
        "test": meta | {"split": "test", "max_tokens": params.data.test_tokens},
        "train": meta | {"split": "train", "max_tokens": params.data.train_tokens},
    }
    where, out = paths.cache_paths(params, out_dir), {}
    for split, split_docs in (("test", docs[1]), ("train", docs[0])):
        path = where[split]
        if split == "train" and params.train.source == "stream":
            shutil.rmtree(path, ignore_errors=True)  # a manifest, not a cache with stale shards
            path.mkdir(parents=True)
            (path / "meta.json").write_text(json.dumps({"source": "stream", **wanted[split]}))
            out[split] = {"source": "stream", **wanted[split]}
            continue
        if (path / "meta.json").exists():
            old = json.loads((path / "meta.json").read_text())
            same = all(old.get(k) == v for k, v in wanted[split].items())
            if same and old.get("source") != "stream":
                out[split] = old
                continue
            logger.info("Rebuilding %s: its metadata differs from %s", path, wanted[split])
        n_contexts = max(1, wanted[split]["max_tokens"] // params.data.context_length)
        contexts = sample_contexts(
            split_docs,
            model.tokenizer,
            params.data.context_length,
            n_contexts,
            params.base.seed + (split == "test"),
            params.data.shuffle_documents,
        )
        cache = ActivationCache.build(
            path,
            model,
            contexts,
            params.data.batch_contexts,
            meta=wanted[split],
            labels=labels[split],
        )
        out[split] = cache.meta
    return out


def split_labels(params) -> dict[str, list[str] | None]:
    """Per-document labels (Brown: genre) of the train and test splits, in split order."""
    labels = document_labels(params.base.corpus)
    if labels is None:
        return {"train": None, "test": None}
    train, test = split_indices(len(labels), params.data.test_fraction, params.base.seed)
    return {"train": [labels[i] for i in train], "test": [labels[i] for i in test]}


def data_mix(metas: dict) -> tuple[dict, dict]:
    """Tokens per document label (Brown: genre) in each cache, and a summary per split.

    ``metas`` is `build_caches`'s result. A split without labels (a stream, an ``hf:`` corpus)
    has an empty mapping. Returns ``(counts, summary)``: ``{split: {label: tokens}}``, and per
    split its tokens, contexts, documents, number of labels and source.
    """
    counts = {split: meta.get("tokens_per_label", {}) for split, meta in metas.items()}
    summary = {
        split: {
            "tokens": meta.get("n_tokens", 0),
            "contexts": meta.get("n_contexts", 0),
            "documents": meta.get("n_documents", 0),
            "labels": len(counts[split]),
            "source": meta.get("source", "cache"),
        }
        for split, meta in metas.items()
    }
    return counts, summary


def mix_table(counts: dict) -> pd.DataFrame:
    """``data_mix``'s counts as a table: one row per label, tokens and share per split."""
    table = pd.DataFrame(counts).fillna(0).astype(int).sort_index()
    table.index.name = "label"
    for split in counts:
        total = table[split].sum()
        table[f"{split} share"] = (table[split] / total).round(4) if total else 0.0
    return table
