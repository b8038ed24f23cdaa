"""SAEBench 0.6 on our per-layer SAELens views and single-layer baselines, offline.

Runs in the environment `make clients` builds (``.venv-saebench``: SAEBench's pins, numpy < 2,
datasets < 4, sae-probes), not the main one. Which SAEs (``--layers``, default 0, 10, 20, 29):

* ``r8-k32``: the MLSAE's view at layer L (``python -m mlsae export-layers r8-k32``);
* ``r8-k32@64000``: its training snapshot at 64,000 tokens, the budget the single-layer baselines
  were trained with (``export-layers r8-k32 --tokens 64000``);
* ``baseline``: the single-layer SAE trained on layer L alone (``export-layers --baselines``).

Evaluations, each through SAEBench's own functions with our model object (every SAEBench
``run_eval`` starts with ``HookedTransformer.from_pretrained_no_processing(model_name)``, which
needs the hub; that call is the only thing replaced):

* ``core``: `sae_bench.evals.core.main.run_evals` with an SAELens ``ActivationsStore`` over the
  held-out Brown contexts of the test cache (``contexts.npy``, 256 tokens, BOS first), unshuffled,
  BOS/EOS/PAD ignored as SAEBench's driver does. Reconstruction (delta CE, KL) on the contexts
  our own evaluation patched at layer L (``results/per_context/r8-k32.csv``), so its delta CE and
  ours are over the same predictions; variance and sparsity on all contexts. Beside SAEBench's
  numbers, `fvu_check` recomputes FVU on the same tokens three ways (module `fvu_check`).
* ``sparse_probing_sae_probes``: sae-probes' top-k (1, 2, 5) latent probes and the model's own
  linear probe on a stated subset of its datasets (`PROBE_DATASETS`, the shortest prompts), with
  the model's activations generated here first (sae-probes would otherwise load the model by name).
* ``meta_structure``: a meta-SAE on each SAE's decoder (no model).
* ``absorption``: SAEBench's first-letter absorption with its defaults, except the vocabulary
  (`--absorption-words`, a seeded sample of its alphabetic tokens; the full ~26k would take hours
  on a 2-core CPU).

Writes ``<out>/<eval>/<sae>_layer<L>.json`` (SAEBench's own outputs) and the summary
``results/saebench.json``, from which ``python -m mlsae readme`` writes the README's table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from offline_model import smollm2_hooked_sae_transformer

MODEL_NAME = "smollm2-135m"
PROBE_DATASETS = [
    "117_us_state_FL",
    "118_us_state_CA",
    "120_us_timezone_Chicago",
    "123_world_country_United_Kingdom",
    "125_world_country_Italy",
    "127_art_type_song",
    "131_temp_cat_Typical Time",
    "114_nyc_borough_Manhattan",
    "154_athlete_sport_football",
    "155_athlete_sport_basketball",
]
"""sae-probes datasets used here: ten binary tasks with the shortest prompts (19,270 prompts)."""


def patched_contexts(per_context_csv: Path, layer: int) -> list[int]:
    """The contexts our evaluation patched at ``layer`` (its delta CE and KL are over these)."""
    with open(per_context_csv) as f:
        rows = [r for r in csv.DictReader(f) if int(r["layer"]) == layer and r["patched"] == "1"]
    if not rows:
        raise ValueError(f"{per_context_csv}: no patched contexts at layer {layer}")
    return sorted(int(r["context"]) for r in rows)


def ours_at_layer(per_context_csv: Path, layer: int, per_layer_csv: Path | None = None) -> dict:
    """Our pipeline's delta CE and KL at ``layer``, from its saved per-context sums.

    With ``per_layer_csv``, also its FVU at ``layer`` over all held-out tokens.
    """
    with open(per_context_csv) as f:
        rows = [r for r in csv.DictReader(f) if int(r["layer"]) == layer]
    patched = [r for r in rows if r["patched"] == "1"]
    n_pred = sum(float(r["n_pred"]) for r in patched)
    fvu = None
    if per_layer_csv is not None:
        with open(per_layer_csv) as f:
            fvu = next(float(r["fvu"]) for r in csv.DictReader(f) if int(r["layer"]) == layer)
    return {
        "fvu": fvu,
        "delta_ce": sum(float(r["delta_ce_sum"]) for r in patched) / n_pred,
        "kl": sum(float(r["kl_sum"]) for r in patched) / n_pred,
        "n_pred": n_pred,
        "contexts": len(patched),
    }


def fvu_check(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    r"""FVU of reconstructions ``x_hat`` of ``x`` ``(token, d)`` by three formulas.

    * ``ours``: :math:`\sum_t \|x_t - \hat x_t\|^2 / \sum_t \|x_t - \bar x\|^2`, the
      centred total (`mlsae.reconstruction.fvu_from_sums`, from the main package);
    * ``saebench_formula``: SAEBench 0.6's ``1 - explained_variance`` written out from
      ``get_sparsity_and_variance_metrics``: its "total variance" is
      :math:`E\|x\|^2 - (E\|x\|^2 / d)^2` (the mean over dimensions of :math:`E x_j^2`,
      squared) where the variance needs :math:`E\|x\|^2 - \|E x\|^2`;
    * ``uncentred``: :math:`\sum_t \|x_t - \hat x_t\|^2 / \sum_t \|x_t\|^2`.
    """
    from mlsae.reconstruction import fvu_from_sums

    x, x_hat = x.double(), x_hat.double()
    sse = (x - x_hat).pow(2).sum()
    n = torch.tensor(float(len(x)), dtype=torch.float64)
    sum_sq = x.pow(2).sum()
    ours = fvu_from_sums(sse, sum_sq, x.sum(0), n)
    mean_sq = sum_sq / n
    saebench_total = mean_sq - (x.pow(2).mean(0).mean()) ** 2
    return {
        "ours": float(ours),
        "saebench_formula": float((sse / n) / saebench_total),
        "uncentred": float(sse / sum_sq),
        "mean_sq_norm": float(mean_sq),
        "sq_norm_of_mean": float(x.mean(0).pow(2).sum()),
        "n_tokens": len(x),
    }


def token_store(model, sae, contexts: torch.Tensor):
    """SAELens's ActivationsStore over pre-tokenized contexts, in order (no shuffling)."""
    from datasets import Dataset
    from sae_lens.training.activations_store import ActivationsStore

    data = Dataset.from_dict({"input_ids": contexts.tolist()})
    return ActivationsStore.from_sae(
        model,
        sae,
        dataset=data,
        context_size=contexts.shape[1],
        streaming=False,
        store_batch_size_prompts=len(contexts),
        disable_concat_sequences=True,
    )


def special_ids(tokenizer) -> set[int]:
    """PAD, EOS and BOS ids (SAEBench's ``ignore_tokens``), without ``None``."""
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    return {i for i in ids if i is not None}


def run_core(
    model,
    sae,
    layer: int,
    contexts: torch.Tensor,
    patched: list[int],
    test_cache: Path,
    eval_tokens: int,
) -> dict:
    """SAEBench's core metrics (two ``run_evals`` calls, module docstring) and the FVU check.

    The check (`fvu_check` on this environment's residuals, `cache_check` on the test cache's)
    shares one forward of the contexts.
    """
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals

    ignore = special_ids(model.tokenizer)
    recon_tokens = contexts[patched]
    store = token_store(model, sae, recon_tokens)
    seen = store.get_batch_tokens(len(recon_tokens))
    if not torch.equal(seen.cpu(), recon_tokens):
        raise RuntimeError("ActivationsStore changed the contexts (BOS added or reordered?)")

    def one_pass(tokens: torch.Tensor, **settings):
        """``run_evals`` over ``tokens`` in one batch, with these metric switches."""
        cfg = CoreEvalConfig(
            model_name=MODEL_NAME,
            batch_size_prompts=len(tokens),
            context_size=tokens.shape[1],
            **settings,
        )
        return run_evals(sae, token_store(model, sae, tokens), model, cfg, ignore_tokens=ignore)

    recon, _ = one_pass(
        recon_tokens,
        n_eval_reconstruction_batches=1,
        compute_kl=True,
        compute_ce_loss=True,
        exclude_special_tokens_from_reconstruction=True,
    )
    var, features = one_pass(
        contexts,
        n_eval_sparsity_variance_batches=1,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    perf = recon["model_performance_preservation"]
    metrics = {
        **recon,
        **var,
        "delta_ce": perf["ce_loss_with_sae"] - perf["ce_loss_without_sae"],
        "fvu": 1 - var["reconstruction_quality"]["explained_variance"],
        "dead_fraction": float(np.mean(np.asarray(features["feature_density"]) == 0)),
    }
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=[hook], stop_at_layer=layer + 1)
        keep = ~torch.isin(contexts, torch.tensor(sorted(ignore)))
        x = cache[hook][keep]
        metrics["fvu_check"] = fvu_check(x, sae.decode(sae.encode(x)))
    metrics["fvu_check"].update(cache_check(sae, layer, x, contexts[keep], test_cache, eval_tokens))
    return metrics


def cache_check(
    sae, layer: int, x: torch.Tensor, tokens: torch.Tensor, test_cache: Path, eval_tokens: int
) -> dict:
    """Our FVU on the test cache's float16 residuals, which our pipeline evaluates.

    Beside it, how far those residuals are from ``x``, this environment's forward of the same
    ``tokens`` (which SAEBench evaluates): the relative Frobenius norm of the difference; our
    FVU on the first ``eval_tokens`` of them, the set our pipeline's FVU is taken over
    (``eval.eval_tokens``); and the share of the centred total that the single largest token
    carries (SmolLM2 has tokens with massive activations in its middle layers, and one of them
    moves the FVU by itself).
    """
    meta = json.loads((test_cache / "meta.json").read_text())
    cached = np.concatenate(
        [np.load(test_cache / f"{s}.npy", mmap_mode="r")[layer] for s in meta["shards"]]
    )
    cached_tokens = [np.load(test_cache / f"{s}.tokens.npy") for s in meta["shards"]]
    if not np.array_equal(np.concatenate(cached_tokens), tokens.numpy()):
        raise RuntimeError("the test cache's tokens are not contexts.npy's non-special tokens")
    with torch.no_grad():
        x16 = torch.from_numpy(np.asarray(cached, dtype=np.float32))
        x_hat = sae.decode(sae.encode(x16))
    on_cache = fvu_check(x16, x_hat)
    first = fvu_check(x16[:eval_tokens], x_hat[:eval_tokens])
    rel = float((x.double() - x16.double()).norm() / x.double().norm())
    centred = (x16.double() - x16.double().mean(0)).pow(2).sum(-1)
    return {
        "ours_on_cache": on_cache["ours"],
        "cache_relative_difference": rel,
        "ours_first_eval_tokens": first["ours"],
        "eval_tokens": eval_tokens,
        "largest_token_share": float(centred.max() / centred.sum()),
        "largest_token_share_first_eval_tokens": float(
            centred[:eval_tokens].max() / centred[:eval_tokens].sum()
        ),
    }


def generate_probe_activations(model, hooks: list[str], cache_path: Path) -> None:
    """The model's activations on `PROBE_DATASETS` for every hook, as sae-probes stores them."""
    from sae_probes.generate_model_activations import ensure_dataset_activations

    ensure_dataset_activations(
        model_name=MODEL_NAME,
        dataset_short_names=PROBE_DATASETS,
        hook_names=hooks,
        model_cache_path=cache_path,
        device="cpu",
        max_seq_len=256,
        batch_size=64,
        model=model,
    )


def run_probing(sae, name: str, out: Path, cache_path: Path) -> dict:
    """sae-probes through SAEBench's ``sparse_probing_sae_probes`` (activations already cached)."""
    from sae_bench.evals.sparse_probing_sae_probes.eval_config import (
        SparseProbingSaeProbesEvalConfig,
    )
    from sae_bench.evals.sparse_probing_sae_probes.main import run_eval

    cfg = SparseProbingSaeProbesEvalConfig(
        model_name=MODEL_NAME,
        dataset_names=PROBE_DATASETS,
        ks=[1, 2, 5],
        results_path=str(out / "sae_probes"),  # per-SAE subfolders; the LLM baseline once per hook
        model_cache_path=str(cache_path),
        include_llm_baseline=True,
    )
    result = run_eval(cfg, [(name, sae)], "cpu", str(out / "sparse_probing"), force_rerun=True)
    return next(iter(result.values()))["eval_result_metrics"]


def run_meta_structure(sae, name: str) -> dict:
    """SAEBench's meta-SAE on the decoder, its default settings."""
    from sae_bench.evals.meta_structure.eval_config import MetaStructureEvalConfig
    from sae_bench.evals.meta_structure.main import run_eval_single_sae

    torch.manual_seed(42)
    result = run_eval_single_sae(name, "custom_sae", sae, MetaStructureEvalConfig(), "cpu")
    return asdict(result)["eval_result_metrics"]


@contextlib.contextmanager
def offline_model(model):
    """SAEBench's ``from_pretrained_no_processing(name)`` returns our model (no hub)."""
    from transformer_lens import HookedTransformer

    with mock.patch.object(
        HookedTransformer, "from_pretrained_no_processing", lambda *a, **k: model
    ):
        yield


def sampled_vocab(words: int, seed: int = 0):
    """SAEBench's alphabetic vocabulary, a seeded sample of ``words`` of it (0: all)."""
    from sae_bench.evals.absorption import vocab

    full = vocab.get_alpha_tokens

    def sample(tokenizer, *args, **kwargs):
        tokens = full(tokenizer, *args, **kwargs)
        if words and len(tokens) > words:
            tokens = random.Random(seed).sample(tokens, words)
        return tokens

    return sample


def run_absorption(model, sae, name: str, out: Path, words: int) -> dict:
    """SAEBench's absorption eval (defaults; vocabulary sampled, `sampled_vocab`)."""
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as fa
    import sae_bench.evals.absorption.k_sparse_probing as ksp
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.main import run_eval

    patches = [
        mock.patch.object(module, "get_alpha_tokens", sampled_vocab(words))
        for module in (common, fa, ksp)
        if hasattr(module, "get_alpha_tokens")
    ]
    cfg = AbsorptionEvalConfig(model_name=MODEL_NAME, llm_batch_size=64)
    out = out.resolve()
    with offline_model(model), contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(contextlib.chdir(out))  # it writes its artifacts/ under the cwd
        result = run_eval(cfg, [(name, sae)], "cpu", str(out / "absorption"), force_rerun=True)
    probing = json.loads(
        (out / "artifacts" / "absorption" / f"{name}_custom_sae_k_sparse_probing.json").read_text()
    )
    passing = [r for r in probing if r["f1_probe"] > cfg.min_GT_probe_f1]
    gate = {
        "letters": len(probing),
        "letters_probe_f1_above": len(passing),
        "min_probe_f1": cfg.min_GT_probe_f1,
        "min_letters": cfg.min_feats_for_eval,
        "mean_probe_f1": float(np.mean([r["f1_probe"] for r in probing])),
        "mean_sae_k1_f1_passing": float(np.mean([r["f1_sparse_sae_1"] for r in passing]))
        if passing
        else None,
    }
    if not result:
        return {"error": "too few first-letter features for SAEBench to score absorption", **gate}
    return {**next(iter(result.values()))["eval_result_metrics"], **gate}


def main(argv: list[str] | None = None) -> None:
    """Run the evaluations and write the summary (module docstring)."""
    from sae_bench.sae_bench_utils import general_utils
    from sae_lens import SAE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="r8-k32")
    p.add_argument("--snapshot", type=int, default=64000)
    p.add_argument("--cache", default="cache", help="the pipeline's cache_dir")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    p.add_argument(
        "--evals",
        nargs="+",
        default=["core", "sparse_probing", "absorption"],
        help="also meta_structure (a meta-SAE on the decoder: not cheap here, see README)",
    )
    p.add_argument("--saes", nargs="+", default=None, help="subset of r8-k32, @64000, baseline")
    p.add_argument("--absorption-words", type=int, default=2000)
    p.add_argument("--eval-tokens", type=int, default=8192, help="params.yaml's eval.eval_tokens")
    p.add_argument(
        "--ours",
        default="results",
        help="where our evaluation of the same run wrote per_context/ and per_layer/ CSVs",
    )
    p.add_argument("--out", default="cache/saebench")
    p.add_argument("--summary", default="results/saebench.json")
    args = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    cache, out, summary_path = Path(args.cache), Path(args.out), Path(args.summary)
    out.mkdir(parents=True, exist_ok=True)
    ours_dir = Path(args.ours)
    per_context = ours_dir / "per_context" / f"{args.run}.csv"
    contexts = torch.from_numpy(
        np.load(cache / "activations" / "test" / "contexts.npy").astype(np.int64)
    )
    snap = f"{args.run}@{args.snapshot}"
    folders = {
        args.run: lambda ly: cache / "saelens" / args.run / f"layer_{ly}",
        snap: lambda ly: cache / "saelens" / snap / f"layer_{ly}",
        "baseline": lambda ly: cache / "saelens" / "baselines" / f"layer_{ly}",
    }
    wanted = args.saes or list(folders)
    for name in wanted:
        for layer in args.layers:
            if not (folders[name](layer) / "cfg.json").exists():
                raise SystemExit(
                    f"{folders[name](layer)} is missing: run `make saebench` (it exports the "
                    "views first) or python -m mlsae export-layers (see its --help)."
                )
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    layers = sorted(set(summary.get("layers", [])) | set(args.layers))  # earlier runs' rows stay
    summary.update(
        {
            "model": MODEL_NAME,
            "corpus": "brown",
            "run": args.run,
            "snapshot": snap,
            "layers": layers,
            "n_contexts": len(contexts),
            "context_size": contexts.shape[1],
            "probe_datasets": PROBE_DATASETS,
            "absorption_words": args.absorption_words,
            "sae_bench_version": "0.6.0",
            "ours_from": str(ours_dir),
        }
    )
    rows = {(r["sae"], r["layer"]): r for r in summary.get("rows", [])}
    model = smollm2_hooked_sae_transformer()
    probe_cache = out / "model_acts"
    if "absorption" in args.evals:
        # SAEBench caches its first-letter probe per model and layer inside its package; one
        # trained on another vocabulary sample must not be reused.
        import shutil

        from sae_bench.evals.absorption.common import PROBES_DIR

        probes = PROBES_DIR / model.cfg.model_name
        sample = {"words": args.absorption_words, "seed": 0}
        stamp = probes / "vocabulary.json"
        if not stamp.exists() or json.loads(stamp.read_text()) != sample:
            shutil.rmtree(probes, ignore_errors=True)
            probes.mkdir(parents=True)
            stamp.write_text(json.dumps(sample))
    if "sparse_probing" in args.evals:
        hooks = [f"blocks.{ly}.hook_resid_post" for ly in args.layers]
        generate_probe_activations(model, hooks, probe_cache)
    for layer in args.layers:
        for name in wanted:
            sae = SAE.load_from_disk(str(folders[name](layer)), device="cpu")
            # SAEBench's own step for a custom SAE: checks decoder norms, and copies hook_name,
            # hook_layer and the like from the metadata onto the config, where its evals read them.
            general_utils.load_and_format_sae(name, sae, "cpu")
            row = rows.setdefault((name, layer), {"sae": name, "layer": layer})
            tag = f"{name.replace('@', '_at_')}_layer{layer}"
            for ev in args.evals:
                start = time.perf_counter()
                if ev == "core":
                    row["core"] = run_core(
                        model,
                        sae,
                        layer,
                        contexts,
                        patched_contexts(per_context, layer),
                        cache / "activations" / "test",
                        args.eval_tokens,
                    )
                    if name == args.run:
                        row["ours"] = ours_at_layer(
                            per_context, layer, ours_dir / "per_layer" / f"{args.run}.csv"
                        )
                        committed = Path("results")
                        if committed.resolve() != ours_dir.resolve():
                            row["ours_committed"] = ours_at_layer(
                                committed / "per_context" / f"{args.run}.csv",
                                layer,
                                committed / "per_layer" / f"{args.run}.csv",
                            )
                elif ev == "sparse_probing":
                    row["sparse_probing"] = run_probing(sae, tag, out, probe_cache)
                elif ev == "meta_structure":
                    row["meta_structure"] = run_meta_structure(sae, tag)
                elif ev == "absorption":
                    row["absorption"] = run_absorption(model, sae, tag, out, args.absorption_words)
                else:
                    raise SystemExit(f"unknown evaluation {ev!r}")
                row.setdefault("seconds", {})[ev] = round(time.perf_counter() - start, 1)
                print(f"{name} layer {layer} {ev}: {row['seconds'][ev]} s", flush=True)
                summary["rows"] = sorted(rows.values(), key=lambda r: (r["layer"], r["sae"]))
                summary_path.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(f"summary: {summary_path}")


if __name__ == "__main__":
    sys.exit(main())
