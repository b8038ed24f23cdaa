"""Stage-level functions the notebooks call: build the activation cache, train a run, evaluate it.

Each returns plain data and writes small JSON files, so notebooks only drive and plot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from transformer_lens import HookedTransformer

from mlsae.activations import ActivationCache, take_tokens
from mlsae.metrics import evaluate
from mlsae.train import TrainConfig, train

logger = logging.getLogger(__name__)


def build_caches(params, model: HookedTransformer, out_dir: str | Path = ".") -> dict:
    """Stage 01: the test cache, and the training cache when ``train.source`` is ``cache``.

    Each cache holds contexts sampled across every document of its split
    (`mlsae.data.sample_contexts`), in random order. For ``train.source: stream`` the training
    folder gets only a ``meta.json`` saying so (training then runs the model itself). A cache
    whose ``meta.json`` matches the settings is kept. Returns ``{split: meta}``.
    """
    from mlsae.data import sample_contexts

    train_docs, test_docs = corpus_split(params)
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
    paths, out = cache_paths(params, out_dir), {}
    for split, docs in (("test", test_docs), ("train", train_docs)):
        path = paths[split]
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
            docs,
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


def write_data_mix(metas: dict, path: str | Path):
    """Tokens per document label (Brown: genre) in each cache; saved as JSON at ``path``.

    ``metas`` is `build_caches`'s result. A split without labels (a stream, an ``hf:`` corpus)
    has an empty column. Returns ``(table, summary)``: the table as a DataFrame, and per split
    its tokens, contexts, documents, number of labels and source.
    """
    import pandas as pd

    counts = {split: meta.get("tokens_per_label", {}) for split, meta in metas.items()}
    table = pd.DataFrame(counts).fillna(0).astype(int).sort_index()
    table.index.name = "label"
    for split in counts:
        total = table[split].sum()
        table[f"{split} share"] = (table[split] / total).round(4) if total else 0.0
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
    write_json(path, {"summary": summary, "tokens_per_label": counts})
    return table, summary


def split_labels(params) -> dict[str, list[str] | None]:
    """Per-document labels (Brown: genre) of the train and test splits, in split order."""
    from mlsae.data import document_labels, split_indices

    labels = document_labels(params.base.corpus)
    if labels is None:
        return {"train": None, "test": None}
    train, test = split_indices(len(labels), params.data.test_fraction, params.base.seed)
    return {"train": [labels[i] for i in train], "test": [labels[i] for i in test]}


def training_source(
    params,
    out_dir: str | Path = ".",
    model: HookedTransformer | None = None,
    layers: list[int] | None = None,
    device: str | None = None,
):
    """The `mlsae.sources.TrainingSource` that ``train.source`` names (``layers``: None = all).

    ``cache``: the training cache of stage 01 (a clear `ConfigError` when there is none).
    ``stream``: the model run on the training documents (loaded here unless given).
    """
    from mlsae.config import ConfigError
    from mlsae.sources import CacheSource, ModelStream, TrainingSource

    if params.train.source == "cache":
        path = cache_paths(params, out_dir)["train"]
        meta = path / "meta.json"
        if not meta.exists() or json.loads(meta.read_text()).get("source") == "stream":
            raise ConfigError(
                f"train.source is 'cache' but there is no training cache at {path}: build it "
                "with the cache stage (dvc repro build_cache, notebooks/01_build_cache.ipynb) "
                "or set train.source: stream."
            )
        chunks = CacheSource(ActivationCache(path), layers)
    else:
        import torch

        from mlsae.models import load_model

        if model is None:
            model = load_model(params.base.model, device=device or params.base.device)
        autocast = params.train.stream_autocast
        on_gpu = str(model.cfg.device).startswith("cuda")
        chunks = ModelStream(
            model,
            corpus_split(params)[0],
            params.data.context_length,
            params.data.batch_contexts,
            layers=layers,
            seed=params.base.seed,
            doc_buffer=params.data.shuffle_documents,
            autocast=getattr(torch, autocast) if on_gpu and autocast != "none" else None,
        )
    return TrainingSource(
        chunks, params.train.shuffle_tokens, params.base.seed, epochs=params.train.epochs
    )


def evaluate_sae(
    sae,
    test_cache: ActivationCache,
    model: HookedTransformer,
    eval_batch_size: int,
    eval_tokens: int,
    ce_contexts: int,
    layers: list[int] | None = None,
    lens=None,
    ce_bf16: bool = False,
):
    """Held-out metrics of a trained SAE and the latent statistics of the same pass.

    FVU, L0 and L1 come from the first ``eval_tokens`` tokens of the test cache (no model
    forward); delta CE and KL from the first ``ce_contexts`` contexts the test cache was built
    from, run through the model in batches of ``eval_batch_size``. Returns ``(result,
    latent_stats)``: the metrics (`mlsae.metrics.evaluate`) and a `mlsae.latents.LayerStats`
    (counts and summed activations per layer and latent) for the latent analyses.
    """
    from mlsae.latents import LayerStats

    layers = layers or list(range(test_cache.n_layers))
    vectors = take_tokens(test_cache.iter_batches(1024, layers=layers), eval_tokens)
    batches = test_cache.contexts()[:ce_contexts].split(eval_batch_size)
    latent_stats = LayerStats(len(layers), sae.n_latents)
    result = evaluate(
        sae,
        model,
        batches,
        lens,
        None,
        layers,
        vectors=vectors,
        latent_stats=latent_stats,
        vector_contexts=test_cache.context_ids(),
        ce_bf16=ce_bf16,
    )
    return result, latent_stats


def cache_paths(params, out_dir: str | Path = ".") -> dict[str, Path]:
    """Where the train/test activation caches live (rebuilt when model or data settings change)."""
    root = Path(out_dir) / params.base.cache_dir / "activations"
    return {"train": root / "train", "test": root / "test"}


def lens_path(params, out_dir: str | Path = ".") -> Path:
    """The pipeline's copy of the model's tuned lens (trained, or loaded by the lens stage)."""
    return Path(out_dir) / params.base.cache_dir / "lens" / params.base.model


def sweep_entry(params, run: str):
    """``params.sweep[run]``, or a clear error naming the runs there are."""
    if run not in params.sweep:
        raise KeyError(f"Unknown sweep run {run!r}; params.yaml has {sorted(params.sweep)}.")
    return params.sweep[run]


def run_lens(params, run: str, out_dir: str | Path = ".", device: str | None = None):
    """``(lens, sha)`` of sweep entry ``run``, ``(None, None)`` for a run without a lens.

    ``sha`` is a short hash of the lens weights, recorded in the run's config so that a retrained
    lens never resumes a stale run.
    """
    from mlsae.lens import TunedLens

    if not sweep_entry(params, run).lens:
        return None, None
    folder = lens_path(params, out_dir)
    lens = TunedLens.load(folder).to(device or params.base.device)
    return lens, hashlib.sha256((folder / "params.pt").read_bytes()).hexdigest()[:16]


def train_config(params, run: str, layers: list[int] | None = None, lens_sha=None) -> TrainConfig:
    """The `TrainConfig` of sweep entry ``run`` (on ``layers``; None: every layer)."""
    entry = sweep_entry(params, run)
    return TrainConfig(
        expansion_factor=entry.expansion_factor,
        k=entry.k,
        k_aux=params.train.k_aux,
        aux_coef=params.train.aux_coef,
        dead_tokens=params.train.dead_tokens,
        select_bf16=params.train.select_bf16,
        lr=params.train.lr,
        adam_eps=params.train.adam_eps,
        batch_tokens=params.train.batch_tokens,
        grad_accum=params.train.grad_accum,
        max_tokens=(entry.train_tokens or params.data.train_tokens) * params.train.epochs,
        shuffle_tokens=params.train.shuffle_tokens,
        lr_warmup_tokens=params.train.lr_warmup_tokens,
        lr_decay=params.train.lr_decay,
        layers=layers,
        seed=params.base.seed,
        checkpoint_every=params.train.checkpoint_tokens,
        device=params.base.device,
        extra={
            "run": run,
            "model": params.base.model,
            "corpus": params.base.corpus,
            "lens": entry.lens,
            "lens_sha": lens_sha,
        },
    )


def corpus_split(params):
    """``(train, test)`` documents of ``params``'s corpus (streams for ``hf:`` corpora)."""
    from mlsae.data import iter_corpus, split_corpus

    docs = iter_corpus(params.base.corpus)
    return split_corpus(docs, params.data.test_fraction, params.base.seed)


def run_dir(params, run: str, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/runs/<run>``: the run's ``checkpoint.pt`` and ``log.jsonl`` (stage output)."""
    return Path(out_dir) / params.base.cache_dir / "runs" / run


def latent_stats_path(params, run: str, out_dir: str | Path = ".") -> Path:
    """``<cache_dir>/latent_stats/<run>.pt``, written by the run's evaluation."""
    return Path(out_dir) / params.base.cache_dir / "latent_stats" / f"{run}.pt"


def train_run(params, run: str, out_dir: str | Path = ".", model=None) -> Path:
    """Stage ``train_mlsae``: train (or resume) sweep entry ``run``; returns its run folder.

    Reads the training data (`training_source`), and the lens for a ``lens_sweep`` entry. The
    model is loaded only when training reads a stream (``model`` may be given instead).
    """
    lens, lens_sha = run_lens(params, run, out_dir)
    cfg = train_config(params, run, lens_sha=lens_sha)
    folder = run_dir(params, run, out_dir)
    train(cfg, training_source(params, out_dir, model), folder, lens=lens)
    return folder


METRIC_KEYS = (
    "fvu", "fvu_se", "fvu_paper", "fvu_raw", "fvu_raw_se", "fvu_paper_raw", "l0", "l1",
    "delta_ce", "delta_ce_se", "kl", "kl_se", "dead_fraction_train", "inactive_fraction",
)  # fmt: skip


def evaluate_run(params, run: str, model: HookedTransformer, out_dir: str | Path = ".") -> dict:
    """Stage ``evaluate_run``: held-out metrics of trained sweep entry ``run``.

    Writes ``results/runs/<run>.json`` (per layer, with standard errors and the run's config),
    ``results/metrics/runs/<run>.json`` (the means over layers: numbers only, for
    ``dvc metrics``), ``results/train/<run>.csv`` (the training curve, for ``dvc plots``) and
    the latent statistics (`latent_stats_path`). Returns the full result.
    """
    from mlsae.train import load_checkpoint, load_sae, read_log

    out_dir = Path(out_dir)
    folder = run_dir(params, run, out_dir)
    lens, _ = run_lens(params, run, out_dir)
    sae = load_sae(folder / "checkpoint.pt", params.base.device).eval()
    result, stats = evaluate_sae(
        sae,
        ActivationCache(cache_paths(params, out_dir)["test"]),
        model,
        eval_batch_size=params.data.batch_contexts,
        eval_tokens=params.eval.eval_tokens,
        ce_contexts=params.eval.ce_contexts,
        lens=lens,
        ce_bf16=params.eval.ce_bf16,
    )
    checkpoint = load_checkpoint(folder / "checkpoint.pt")
    config = checkpoint["train_config"]
    result["config"] = {k: v for k, v in config.items() if k != "extra"} | config.get("extra", {})
    result["tokens_trained"] = checkpoint["tokens_seen"]
    stats_path = latent_stats_path(params, run, out_dir)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(stats_path)
    write_json(out_dir / "results" / "runs" / f"{run}.json", result)
    metrics = {k: result["mean"][k] for k in METRIC_KEYS if k in result["mean"]}
    metrics["tokens_trained"] = result["tokens_trained"]
    write_metrics(out_dir / "results" / "metrics" / "runs" / f"{run}.json", metrics)
    write_csv(out_dir / "results" / "train" / f"{run}.csv", read_log(folder))
    return result


def write_json(path: str | Path, data) -> Path:
    """``data`` as indented JSON at ``path`` (folders created; tensors and arrays as lists)."""

    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=default))
    return path


def write_metrics(path: str | Path, metrics: dict) -> Path:
    """A DVC metrics file: nested mappings of numbers only (a string or list is an error)."""

    def check(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, f"{key}.{k}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metrics file {path}: {key} = {value!r} is not a number.")

    check(metrics, "")
    return write_json(path, metrics)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Rows of equal keys as a CSV with a header (a `dvc plots` source)."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def table1(runs: dict[str, dict], params):
    """The paper's Table 1 for our runs: means over layers, with bootstrap standard errors.

    ``FVU`` is ours (per-dimension mean) and ``FVU (paper def.)`` the original code's (scalar
    variance, per batch; `mlsae.metrics`), both in the space the SAE reconstructs (lens space
    for a lens run), and both again in the raw residual space for lens runs. ``± SE``: standard
    errors by bootstrap over held-out contexts (`mlsae.bootstrap`). Returns a pandas DataFrame.
    """
    import pandas as pd

    rows = []
    for name, res in runs.items():
        entry, mean = params.sweep[name], res["mean"]
        nan = float("nan")
        rows.append(
            {
                "run": name,
                "model": params.base.model,
                "corpus": params.base.corpus,
                "R": int(entry.expansion_factor)
                if float(entry.expansion_factor).is_integer()
                else entry.expansion_factor,
                "k": entry.k,
                "lens": "yes" if entry.lens else "no",
                "FVU": mean["fvu"],
                "FVU SE": mean.get("fvu_se", nan),
                "FVU (paper def.)": mean.get("fvu_paper", nan),
                "FVU raw": mean.get("fvu_raw", mean["fvu"]),
                "FVU raw (paper def.)": mean.get("fvu_paper_raw", mean.get("fvu_paper", nan)),
                "L1": mean["l1"],
                "delta CE": mean.get("delta_ce", nan),
                "delta CE SE": mean.get("delta_ce_se", nan),
                "KL": mean.get("kl", nan),
                "KL SE": mean.get("kl_se", nan),
                "test tokens": res["n_tokens"],
                "CE predictions": res["n_ce_tokens"],
                "CE contexts": res.get("n_ce_contexts", nan),
                "train tokens": res.get("tokens_trained", nan),
            }
        )
    return pd.DataFrame(rows)


def run_baselines(params, model: HookedTransformer, out_dir: str | Path = ".") -> dict:
    """Train single-layer SAEs at ``analysis.baseline_layers``; write ``results/baselines.json``.

    The SAEs go to ``<cache_dir>/baselines/layer-<L>``. The matrices have one row per
    single-layer SAE (train layer) and a last row for the MLSAE of ``analysis.baseline_run``,
    all evaluated on the same held-out tokens at each baseline layer. Also writes
    ``results/metrics/baselines.json``: the means over baseline layers of each single-layer SAE at
    its own layer and of the MLSAE (numbers only).
    """
    import numpy as np

    from mlsae.baselines import delta_ce_matrix, fvu_matrix
    from mlsae.train import load_sae

    out_dir, run = Path(out_dir), params.analysis.baseline_run
    layers = list(params.analysis.baseline_layers)
    paths = cache_paths(params, out_dir)
    folder = out_dir / params.base.cache_dir / "baselines"
    saes = {}
    for layer in layers:
        cfg = train_config(params, run, layers=[layer])
        source = training_source(params, out_dir, model, layers=[layer])
        saes[layer] = train(cfg, source, folder / f"layer-{layer}").eval()
    saes["mlsae"] = load_sae(run_dir(params, run, out_dir) / "checkpoint.pt", params.base.device)
    saes["mlsae"].eval()
    test_cache = ActivationCache(paths["test"])
    fvu = fvu_matrix(saes, test_cache, layers, params.eval.eval_tokens)
    tokens = test_cache.contexts()[: params.analysis.baseline_ce_contexts]
    d_ce, kl, n_ce = delta_ce_matrix(saes, model, tokens, layers, bf16=params.eval.ce_bf16)
    result = {
        "layers": layers,
        "rows": [f"single layer {ly}" for ly in layers] + [f"MLSAE {run}"],
        "run": run,
        "fvu": fvu.tolist(),
        "delta_ce": d_ce.tolist(),
        "kl": kl.tolist(),
        "n_fvu_tokens": min(params.eval.eval_tokens, test_cache.n_tokens),
        "n_ce_tokens": n_ce,  # predictions averaged over, as in Table 1
        "model": params.base.model,
        "corpus": params.base.corpus,
    }
    write_json(out_dir / "results" / "baselines.json", result)
    own = {key: np.diag(np.array(result[key])[:-1]) for key in ("fvu", "delta_ce")}
    mlsae = {key: np.array(result[key])[-1] for key in ("fvu", "delta_ce")}
    write_metrics(
        out_dir / "results" / "metrics" / "baselines.json",
        {
            "single_layer_fvu": float(own["fvu"].mean()),
            "mlsae_fvu": float(mlsae["fvu"].mean()),
            "single_layer_delta_ce": float(own["delta_ce"].mean()),
            "mlsae_delta_ce": float(mlsae["delta_ce"].mean()),
        },
    )
    return result


def sweep_groups(params) -> dict[str, list[str]]:
    """Sweep entries that vary R at the baseline run's k, and k at its R (lens and no lens)."""
    ref = params.sweep[params.analysis.baseline_run]
    groups: dict[str, list[str]] = {}
    for name, entry in params.sweep.items():
        suffix = " + lens" if entry.lens else ""
        if entry.train_tokens not in (
            None,
            params.sweep[params.analysis.baseline_run].train_tokens,
        ):
            continue
        if entry.k == ref.k:
            groups.setdefault(f"R{suffix}", []).append(name)
        if entry.expansion_factor == ref.expansion_factor:
            groups.setdefault(f"k{suffix}", []).append(name)
    key = {"R": lambda n: params.sweep[n].expansion_factor, "k": lambda n: params.sweep[n].k}
    return {g: sorted(names, key=key[g[0]]) for g, names in groups.items()}


def sweep_differences(runs: dict[str, dict], groups: dict[str, list[str]]) -> dict:
    """Adjacent sweep points compared with their noise: is each step larger than 2 SE?

    For each group and each metric (raw-space FVU, delta CE), the difference of the means over
    layers of neighbouring runs and ``se = sqrt(se_a^2 + se_b^2)`` from their bootstrap standard
    errors. The runs are evaluated on the same contexts, so their errors are positively
    correlated and this ``se`` overstates the noise of the difference: "within noise"
    (``|diff| < 2 se``) is a cautious verdict.
    """
    out: dict[str, list[dict]] = {}
    for group, names in groups.items():
        rows = []
        for a, b in zip(names, names[1:], strict=False):
            for key in ("fvu_raw", "delta_ce"):
                ma, mb = runs[a]["mean"], runs[b]["mean"]
                metric = key if key in ma and key in mb else key.removesuffix("_raw")
                if metric not in ma or f"{metric}_se" not in ma or f"{metric}_se" not in mb:
                    continue
                diff = mb[metric] - ma[metric]
                se = (ma[f"{metric}_se"] ** 2 + mb[f"{metric}_se"] ** 2) ** 0.5
                rows.append(
                    {
                        "from": a,
                        "to": b,
                        "metric": metric,
                        "difference": diff,
                        "se": se,
                        "within_noise": abs(diff) < 2 * se,
                    }
                )
        out[group] = rows
    return out
