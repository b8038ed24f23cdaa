"""Export to and import from SAELens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

An MLSAE maps onto SAELens's inference ``topk`` architecture exactly:

* our per-vector standardization is SAELens's ``normalize_activations: "layer_norm"`` (mean and
  unbiased std over d_model, divide by ``std + 1e-5``, undone after the decoder);
* ``b_pre`` is ``b_dec`` with ``apply_b_dec_to_input: true``; there is no encoder bias, so ``b_enc``
  is zero; ``W_enc`` is stored transposed, ``(d_in, d_sae)``;
* ``rescale_acts_by_decoder_norm: true``. SAELens then selects the top k of ``pre_i * ||W_dec_i||``
  and decodes ``act_i / ||W_dec_i||``; our decoder rows are unit-norm (renormalised after every
  step), so that is our selection and decode within float rounding. It is what makes SAELens's
  ``fold_W_dec_norm`` valid for a TopK SAE (it raises ``NotImplementedError`` otherwise), and
  sae-dashboard calls it before every run. An SAE whose rows are not unit-norm (more than
  `UNIT_NORM_TOL` off) is exported with ``false``, which is exact for any norms.

SAELens keys an SAE by one ``hook_name``; an MLSAE reads every layer, so the metadata's
``hook_name`` is the first hook and ``hook_names`` lists all of them (SAELens keeps extra
metadata keys). ``sae_lens.SAE.load_from_disk(path)`` then encodes and decodes as our module does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlsae.sae import MLSAE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
EXTRA_FILE = "mlsae.json"
UNIT_NORM_TOL = 1e-5
"""Largest ``| ||W_dec_i|| - 1 |`` for which an export declares ``rescale_acts_by_decoder_norm``."""


def unit_norm_decoder(sae: MLSAE) -> bool:
    """Whether every decoder row has norm 1 within `UNIT_NORM_TOL`."""
    norms = sae.W_dec.detach().double().norm(dim=-1)
    return bool(((norms - 1).abs() <= UNIT_NORM_TOL).all())


def save(
    sae: MLSAE,
    path: str | Path,
    model_name: str,
    hook_names: list[str],
    extra: dict | None = None,
) -> Path:
    """Write ``sae`` to ``path`` in SAELens's format; returns the folder."""
    if not sae.standardize:
        raise ValueError("Only standardizing SAEs map onto SAELens's layer_norm normalization.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from sae_lens import __version__ as sae_lens_version

    cfg = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": unit_norm_decoder(sae),
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_names[0],
            "hook_names": list(hook_names),
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": sae_lens_version,
            "sae_lens_training_version": None,
            "trained_with": "mlsae",
        },
    }
    (path / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    state = {
        "W_enc": sae.W_enc.detach().T.contiguous().float().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().float().cpu(),
        "b_enc": torch.zeros(sae.n_latents),
        "b_dec": sae.b_pre.detach().float().cpu().clone(),
    }
    save_file(state, str(path / WEIGHTS_FILE))
    (path / EXTRA_FILE).write_text(
        json.dumps(
            {
                "sae_config": sae.config(),
                "tokens_since_fired": sae.tokens_since_fired.tolist(),
                **(extra or {}),
            }
        )
    )
    return path


def load(path: str | Path) -> MLSAE:
    """Read an SAE saved by `save` (or a SAELens ``topk`` SAE with ``layer_norm``, no b_enc)."""
    path = Path(path)
    if not (path / CFG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} lacks {CFG_FILE} or {WEIGHTS_FILE}.")
    cfg = json.loads((path / CFG_FILE).read_text())
    if cfg.get("architecture") != "topk" or cfg.get("normalize_activations") != "layer_norm":
        raise ValueError(
            f"{path}: need architecture 'topk' with layer_norm normalization, got "
            f"{cfg.get('architecture')!r} / {cfg.get('normalize_activations')!r}."
        )
    state = load_file(str(path / WEIGHTS_FILE))
    if state["b_enc"].abs().max() > 0:
        raise ValueError(f"{path}: a nonzero encoder bias has no place in an MLSAE.")
    extra = json.loads((path / EXTRA_FILE).read_text()) if (path / EXTRA_FILE).exists() else {}
    config = extra.get("sae_config", {"d_model": cfg["d_in"], "n_latents": cfg["d_sae"]})
    config["k"] = cfg["k"]
    sae = MLSAE(**config)
    w_enc, w_dec = state["W_enc"].T, state["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens's rescaled SAE equals the plain one with each latent's norm folded in
        norms = w_dec.norm(dim=-1, keepdim=True)
        if not torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_TOL, rtol=0):
            w_enc, w_dec = w_enc * norms, w_dec / norms
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_pre.copy_(state["b_dec"])
        sae.b_pre_initialized.fill_(True)
        if "tokens_since_fired" in extra:
            sae.tokens_since_fired.copy_(torch.tensor(extra["tokens_since_fired"]))
    return sae.eval()


LENS_ERROR = (
    "A lens run cannot be expressed in SAELens's format: its SAE reads x' = x + W x + b (the "
    "tuned lens) and standardizes x', but SAELens applies an SAE's normalization directly to the "
    "hook's activations and has no place for an affine map before it. Export a run of `sweep` "
    "(raw residuals) instead."
)


def save_layer_views(
    sae: MLSAE,
    folder: str | Path,
    model_name: str,
    layers: list[int],
    lens=None,
    extra: dict | None = None,
) -> list[Path]:
    """One SAELens SAE per layer, ``folder/layer_<L>``, each hooked at ``blocks.L.hook_resid_post``.

    The tools built on SAELens (sae-dashboard, SAEBench's custom-SAE interface, Neuronpedia's
    uploader) expect one hook per SAE; an MLSAE is the same SAE at every layer, so each view is
    the MLSAE's weights with one layer's hook. The weights are written once
    (``folder/layer_<first>``) and hard-linked into the other views where the filesystem allows,
    so the views share them on disk. ``lens`` not None (a lens run) is an error: `LENS_ERROR`.
    """
    if lens is not None:
        raise ValueError(LENS_ERROR)
    folder = Path(folder)
    paths, first = [], None
    for layer in layers:
        path = folder / f"layer_{layer}"
        hook = f"blocks.{layer}.hook_resid_post"
        if first is None:
            first = save(sae, path, model_name, [hook], {"layer": layer, **(extra or {})})
        else:
            path.mkdir(parents=True, exist_ok=True)
            for name in (WEIGHTS_FILE, EXTRA_FILE):
                (path / name).unlink(missing_ok=True)
                try:
                    (path / name).hardlink_to(first / name)
                except OSError:
                    (path / name).write_bytes((first / name).read_bytes())
            cfg = json.loads((first / CFG_FILE).read_text())
            cfg["metadata"] |= {"hook_name": hook, "hook_names": [hook]}
            (path / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        paths.append(path)
    return paths
