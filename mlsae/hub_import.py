"""The authors' published MLSAEs (tim-lawson/mlsae on the Hugging Face hub) read into this package.

The original code writes its SAEs with ``PyTorchModelHubMixin.save_pretrained``: a folder (or hub
repo ``tim-lawson/mlsae-{model}-x{R}-k{k}[-lens][-tfm]``, their ``mlsae/utils.py``) holding
``model.safetensors`` and ``config.json`` (the constructor's arguments). What we read from it:

* ``encoder.weight`` ``(n, d)``: our ``W_enc`` as it is;
* ``decoder.weight`` ``(d, n)``: its columns are the latents' directions, our ``W_dec`` rows
  (transposed). They are *not* renormalised: the original rescales the decoder before its last
  optimizer step, so its columns are only nearly unit-norm, and the SAE it evaluated is the one
  stored;
* ``pre_encoder_bias`` ``(d,)``: our ``b_pre``. There is no encoder bias;
* the ``-tfm`` repos (the Lightning module with its transformer, and for ``-lens`` its tuned
  lens) hold the same tensors under ``autoencoder.``; only those are read;
* the SAE's own ``last_nonzero`` counter (steps, not tokens) is not needed for inference.

Their forward (``mlsae/model/autoencoder.py``) is ours: standardise each vector over d_model
(mean, unbiased std, divide by ``std + 1e-5``), subtract the bias, encode, keep the top k of the
pre-activations, ReLU, decode, add the bias, undo the standardisation with ``std`` (no eps). So
the imported `mlsae.sae.MLSAE` reproduces theirs exactly (``tests/test_hub_import.py`` checks it
against a transcription of their formulas).

A ``-lens`` SAE reads tuned-lens-transformed residuals (their ``forward_lens``); its lens is the
published Pythia tuned lens, not part of the autoencoder, and is not imported here.

The ``-dists`` datasets (``mlsae/analysis/dists.py``) hold, per latent, ``counts`` and
``totals`` over layers: how often it was among the top k at each layer and the sum of its top-k
values there. Their values are taken *before* the ReLU and without a lens, so a totals entry can
include negative values where ours (`mlsae.latents.LayerStats`) sums positive activations only.
`read_dists` loads them into a `LayerStats` (counts and totals; no per-context sums), on which
the Figure 2 analyses (`mlsae.latents.layer_distribution`) run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mlsae.latent_measures import layer_distribution
from mlsae.latents import LayerStats
from mlsae.sae import MLSAE, nearest_power_of_2

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
KEYS = ("encoder.weight", "decoder.weight", "pre_encoder_bias")
PREFIXES = ("", "autoencoder.")
REPO_PATTERN = re.compile(
    r"(?:.*/)?(?P<kind>mlsae|sae)-(?P<model>.+)-x(?P<R>\d+)-k(?P<k>\d+)"
    r"(?P<lens>-lens)?(?P<tfm>-tfm)?(?:-layers-(?P<layers>\d+))?(?P<dists>-dists)?$"
)
DISTS_COLUMNS = ("latent", "counts", "totals")


def parse_repo_id(name: str) -> dict:
    """What the original's repo naming (``get_repo_id``) says: model, R, k, lens, tfm.

    Returns ``{}`` for a name that does not follow it (a renamed local folder).
    """
    m = REPO_PATTERN.match(name.rstrip("/"))
    if m is None:
        return {}
    return {
        "model": m["model"],
        "expansion_factor": int(m["R"]),
        "k": int(m["k"]),
        "lens": bool(m["lens"]),
        "tfm": bool(m["tfm"]),
        "multi_layer": m["kind"] == "mlsae",
    }


def resolve(source: str | Path, patterns: list[str] | None = None) -> Path:
    """A local folder as it is; otherwise a hub repo id, downloaded (needs the hub)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; give the folder that holds it (or a hub repo id).")
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise FileNotFoundError(f"No folder {source}, and it is not a hub repo id (owner/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, no permission
        raise FileNotFoundError(
            f"Could not download {source} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Download it where the hub is reachable and pass the folder."
        ) from err


def read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The three SAE tensors of ``folder/model.safetensors`` and the key prefix they had."""
    from safetensors import safe_open

    file = folder / WEIGHTS_FILE
    if not file.exists():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}: not a save_pretrained folder.")
    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            for prefix in PREFIXES:
                if all(prefix + k in names for k in KEYS):
                    return {k: f.get_tensor(prefix + k) for k in KEYS}, prefix
    except Exception as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from err
    shown = ", ".join(sorted(names)[:8])
    raise ValueError(
        f"{file} lacks the MLSAE tensors {list(KEYS)} (with or without 'autoencoder.'); "
        f"it holds {shown}{' ...' if len(names) > 8 else ''}."
    )


def read_config(folder: Path) -> dict:
    """``config.json`` (the constructor's arguments), or {} without one."""
    file = folder / CONFIG_FILE
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


def mlsae_from_tensors(tensors: dict[str, torch.Tensor], config: dict) -> MLSAE:
    """Our `MLSAE` holding the original's tensors exactly (float32, no renormalisation)."""
    enc, dec, bias = (tensors[k].detach().float() for k in KEYS)
    if enc.ndim != 2 or dec.shape != enc.T.shape or bias.shape != (enc.shape[1],):
        raise ValueError(
            f"Inconsistent shapes: encoder.weight {tuple(enc.shape)} (n, d), decoder.weight "
            f"{tuple(dec.shape)} (d, n), pre_encoder_bias {tuple(bias.shape)} (d,)."
        )
    n, d = enc.shape
    for key, want in (("n_latents", n), ("n_inputs", d)):
        if key in config and int(config[key]) != want:
            raise ValueError(f"config.json says {key}={config[key]}, the tensors say {want}.")
    if "k" not in config:
        raise ValueError("config.json has no k: the number of latents kept per vector.")
    k = int(config["k"])
    auxk = config.get("auxk")
    sae = MLSAE(
        d_model=d,
        n_latents=n,
        k=k,
        k_aux=min(int(auxk), n) if auxk else nearest_power_of_2(d / 2),
        aux_coef=float(config.get("auxk_coef") or 1 / 32),
        dead_tokens=int(config.get("dead_tokens_threshold") or 10_000_000),
        standardize=bool(config.get("standardize", True)),
    )
    with torch.no_grad():
        sae.W_enc.copy_(enc)
        sae.W_dec.copy_(dec.T)
        sae.b_pre.copy_(bias)
        sae.b_pre_initialized.fill_(True)
    return sae.eval()


def import_mlsae(source: str | Path) -> tuple[MLSAE, dict]:
    """Read a published MLSAE (hub repo id or local folder) into our `MLSAE`.

    Returns ``(sae, info)``; ``info`` holds the source, the key prefix found (``"autoencoder."``
    for ``-tfm``), the repo name's fields (`parse_repo_id`) and the config's model and layers.
    """
    folder = resolve(source, [WEIGHTS_FILE, CONFIG_FILE])
    tensors, prefix = read_tensors(folder)
    config = read_config(folder)
    sae = mlsae_from_tensors(tensors, config)
    name = parse_repo_id(str(source)) or parse_repo_id(folder.name)
    norms = sae.W_dec.detach().norm(dim=-1)
    info = {
        "source": str(source),
        "prefix": prefix,
        "tfm": prefix == "autoencoder.",
        "name": name,
        "model_name": config.get("model_name"),
        "layers": config.get("layers"),
        "lens": bool(config.get("tuned_lens", name.get("lens", False))),
        "decoder_norm_range": [float(norms.min()), float(norms.max())],
    }
    return sae, info


def _lists(column) -> np.ndarray:
    return np.array([np.asarray(v, dtype=np.float64) for v in column]).T  # (layer, latent)


def read_dists(source: str | Path) -> tuple[LayerStats, dict]:
    """A ``-dists`` dataset (hub repo id or local folder of parquet files) as `LayerStats`.

    Its ``counts`` and ``totals`` become ``LayerStats.counts`` / ``totals`` ``(layer, latent)``,
    rows ordered by ``latent``. The dataset's own ``layer_std`` (their 0-based layer index) is
    recomputed from them as a check; returns ``(stats, {"source", "n_layers", "n_latents",
    "layer_std_max_abs_diff"})``.
    """
    import pyarrow.parquet as pq

    folder = resolve(source, ["*.parquet", "data/*", "README.md"])
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no parquet files: not a -dists dataset.")
    table = pq.read_table(files[0]) if len(files) == 1 else None
    if table is None:
        import pyarrow as pa

        table = pa.concat_tables([pq.read_table(f) for f in files])
    missing = [c for c in DISTS_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{folder}: the -dists columns {missing} are missing.")
    order = np.argsort(np.asarray(table.column("latent").to_pylist()))
    counts = _lists(table.column("counts").to_pylist())[:, order]
    totals = _lists(table.column("totals").to_pylist())[:, order]
    n_layers, n_latents = counts.shape
    stats = LayerStats(n_layers, n_latents)
    stats.counts = torch.from_numpy(np.ascontiguousarray(counts))
    stats.totals = torch.from_numpy(np.ascontiguousarray(totals))
    stats.token_count = stats.counts.sum(0)
    diff = float("nan")
    if "layer_std" in table.column_names:
        theirs = np.asarray(table.column("layer_std").to_pylist(), dtype=np.float64)[order]
        ours = layer_distribution(stats.totals)["variance"].sqrt().numpy()
        both = np.isfinite(theirs) & np.isfinite(ours)
        diff = float(np.abs(theirs[both] - ours[both]).max()) if both.any() else float("nan")
    info = {
        "source": str(source),
        "n_layers": n_layers,
        "n_latents": n_latents,
        "layer_std_max_abs_diff": diff,
    }
    return stats, info
