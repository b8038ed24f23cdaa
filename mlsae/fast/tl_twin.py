"""The Hugging Face path of `mlsae.fast.hf_forward` beside TransformerLens's.

`kept_block_outputs` is the counterpart of `mlsae.activations.kept_residuals` (special positions
dropped), and `hooked_from_neox` builds the TransformerLens twin of a GPT-NeoX model with its
weights unprocessed, as `mlsae.models.hooked_from_llama` does for Llama, so that the two forwards
can be compared (`tests/test_hf_forward.py`, ``benchmarks/gpu_step.py``). Kept apart from
`mlsae.fast.hf_forward` so that the SDPA forward itself runs where TransformerLens is not
installed (the GPU machines' image).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_neox_weights

from mlsae.activations import special_mask
from mlsae.fast.hf_forward import block_outputs


def kept_block_outputs(
    hf_model: torch.nn.Module,
    tokens: torch.Tensor,
    specials: Iterable[int],
    layers: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_outputs` of the positions that hold no special token (BOS/EOS/PAD).

    The Hugging Face counterpart of `mlsae.activations.kept_residuals`.

    Args:
        hf_model: a GPT-NeoX or Llama-family causal LM.
        tokens: ``(batch, pos)`` token ids.
        specials: the special token ids (`mlsae.models.special_token_ids`).
        layers: block indices (None: all).

    Returns:
        ``(residuals (layer, kept token, d_model), keep mask (batch, pos))``; the mask lies on the
        device of ``tokens``, the residuals on the model's.
    """
    keep = ~special_mask(tokens, specials)
    resid = block_outputs(hf_model, tokens, layers)
    return resid[:, keep.to(resid.device)], keep


def neox_config(hf_config, dtype: torch.dtype = torch.float32) -> HookedTransformerConfig:
    """Build a TransformerLens config for a GPT-NeoX HF config, by hand.

    LayerNorm, rotary embeddings on the first ``partial_rotary_factor`` (``rotary_pct``) of each
    head with non-adjacent pairs (as HF), parallel or sequential attention/MLP
    (``use_parallel_residual``), biased projections.

    Raises:
        ValueError: for features TransformerLens's NeoX path does not have (scaled RoPE, no biases).
    """
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Unsupported rope_type {rope['rope_type']!r} for TransformerLens.")
    if not getattr(hf_config, "attention_bias", True):
        raise ValueError("convert_neox_weights needs attention biases (attention_bias=True).")
    n_heads = hf_config.num_attention_heads
    d_head = hf_config.hidden_size // n_heads
    rotary_pct = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 1.0))
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000))
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, 8192),
        eps=hf_config.layer_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=int(d_head * rotary_pct),  # as HF's GPTNeoXAttention.rotary_ndims
        rotary_base=rotary_base,
        rotary_adjacent_pairs=False,
        parallel_attn_mlp=bool(hf_config.use_parallel_residual),
        use_attn_scale=True,
        original_architecture="GPTNeoXForCausalLM",
        default_prepend_bos=False,
        dtype=dtype,
    )


def hooked_from_neox(
    hf_model: torch.nn.Module,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Wrap a HF ``GPTNeoXForCausalLM`` as a `HookedTransformer`, weights unprocessed.

    No layer-norm folding, centering or value-bias folding, so ``blocks.{l}.hook_resid_post``
    equals the HF block outputs (as `mlsae.models.hooked_from_llama` for Llama). No tokenizer.

    Args:
        hf_model: the GPT-NeoX causal LM.
        device: where to put the TransformerLens model.
        dtype: its parameter dtype.

    Returns:
        The TransformerLens model in eval mode.
    """
    cfg = neox_config(hf_model.config, dtype=dtype)
    cfg.device = str(device)
    model = HookedTransformer(cfg, move_to_device=False)
    state_dict = {
        name: weight.detach().to(dtype)
        for name, weight in convert_neox_weights(hf_model, cfg).items()
    }
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(device).eval()
