"""Imported SAEs (`mlsae.hub_import`) in our checkpoint format, and our evaluation of them.

`save_imported` writes an imported SAE as ``checkpoint.pt`` (`mlsae.train.load_sae` reads it);
`evaluate_imported` runs our held-out metrics (`mlsae.stages.evaluate.evaluate_sae`) on it: the
FVU, delta CE and KL of this package's definitions, with standard errors, for an SAE trained by the
original code. That separates differences of implementation from differences of scale.
"""

from __future__ import annotations

from pathlib import Path

from mlsae import models, paths
from mlsae.activations import ActivationCache
from mlsae.precision import use_bf16
from mlsae.sae import MLSAE
from mlsae.stages.evaluate import evaluate_sae
from mlsae.train import load_checkpoint, load_sae, save_checkpoint
from mlsae.writers import write_json


def save_imported(sae: MLSAE, info: dict, out: str | Path) -> Path:
    """Write ``out/checkpoint.pt`` in our checkpoint format (`mlsae.train.load_sae` reads it).

    Refuses to overwrite a checkpoint that is not itself an import.
    """
    path = Path(out) / "checkpoint.pt"
    if path.exists() and "imported_from" not in load_checkpoint(path):
        raise FileExistsError(f"{path} is a trained checkpoint; choose another --out.")
    save_checkpoint(
        path,
        {
            "sae": sae.state_dict(),
            "sae_config": sae.config(),
            "optimizer": None,
            "train_config": None,
            "layers": info.get("layers"),
            "tokens_seen": None,
            "imported_from": info,
        },
    )
    return path


def evaluate_imported(params, checkpoint: str | Path, root: str | Path, out: str | Path) -> dict:
    """Our held-out metrics of an imported SAE (`mlsae.stages.evaluate.evaluate_sae`).

    On the model and test cache of ``params`` (for the published Pythia SAEs: the paper preset,
    its ``build_cache`` stage run first); delta CE on ``eval.ce_contexts`` contexts at
    ``eval.ce_stride``. A ``-lens`` SAE needs its tuned lens, which is not imported: refused.
    Writes ``out`` (JSON: the metrics and per-layer values) and the latent statistics beside it
    (``<out stem>.latent_stats.pt``, for the Figure 2 analyses); returns the result.
    """
    state = load_checkpoint(checkpoint)
    info = state.get("imported_from") or {}
    if info.get("lens"):
        raise ValueError(
            f"{checkpoint} reads tuned-lens residuals; its lens is not imported, so our "
            "evaluation would feed it raw residuals. Evaluate a repo without -lens."
        )
    sae = load_sae(checkpoint, params.base.device).eval()
    cache = ActivationCache(paths.cache_paths(params, root)["test"])
    model = models.load_model(params.base.model, device=params.base.device)
    if cache.d_model != sae.d_model:
        raise ValueError(
            f"The SAE reads d={sae.d_model} vectors; the test cache of {params.base.model} "
            f"holds d={cache.d_model}. Use the params of the model the SAE was trained on."
        )
    result, stats = evaluate_sae(
        sae,
        cache,
        model,
        eval_batch_size=params.data.batch_contexts,
        eval_tokens=params.eval.eval_tokens,
        ce_contexts=params.eval.ce_contexts,
        ce_bf16=use_bf16(params.eval.ce_bf16, params.base.device),
        ce_stride=params.eval.ce_stride,
    )
    out = Path(out)
    result = {k: v for k, v in result.items() if k != "per_context"} | {"imported_from": info}
    write_json(out, result)
    stats.save(out.with_name(out.stem + ".latent_stats.pt"))
    return result
