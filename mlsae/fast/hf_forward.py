"""The residual stream from the Hugging Face model itself, with fused (SDPA) attention.

What: `block_outputs` runs a Hugging Face causal LM (GPT-NeoX/Pythia or a Llama-family model such
as SmolLM2) and returns the output of each requested decoder block, the same vectors as
TransformerLens's ``blocks.{l}.hook_resid_post`` in `mlsae.activations.residual_stream`;
`kept_block_outputs` drops the special positions, as `mlsae.activations.kept_residuals` does.

Why: TransformerLens computes attention with explicit matmuls and a softmax over the full
``(pos, pos)`` score matrix, while the Hugging Face model can use PyTorch's
``scaled_dot_product_attention`` (``attn_implementation="sdpa"``: fused flash / memory-efficient
kernels on a GPU, in bf16), which makes the model forward of the training stream much faster.

How:

* Each block's output is taken by a forward hook on the block module. The model's
  ``output_hidden_states`` is not used: its last entry is the output of the final norm
  (transformers replaces it with ``last_hidden_state``), whereas the paper takes the last block's
  output before that norm (section 3.1).
* The hook on the highest requested block raises a private exception that ends the forward there,
  so the later blocks, the final norm and the unembedding never run (like TransformerLens's
  ``stop_at_layer``).
* `with_sdpa` / `load_sdpa` make sure the model uses SDPA. transformers 5 already defaults to
  ``"sdpa"`` when a model is built or loaded (falling back to ``"eager"`` where SDPA cannot
  dispatch), so this mostly checks it and switches a model that was set to ``"eager"``.

`hooked_from_neox` builds the TransformerLens twin of a GPT-NeoX model (unprocessed weights, like
`mlsae.models.hooked_from_llama`); the tests compare both paths with it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch

SDPA = "sdpa"


class _StopForward(Exception):
    """Raised by the hook on the last needed block, to end the forward there."""


def _backbone(hf_model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``gpt_neox`` or ``model``) of a supported causal LM."""
    for name in ("gpt_neox", "model"):
        base = getattr(hf_model, name, None)
        if isinstance(base, torch.nn.Module) and isinstance(
            getattr(base, "layers", None), torch.nn.ModuleList
        ):
            return base
    raise ValueError(
        f"Unsupported model class {type(hf_model).__name__}: expected a GPT-NeoX causal LM "
        "(with .gpt_neox.layers) or a Llama-family causal LM (with .model.layers)."
    )


def decoder_layers(hf_model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a GPT-NeoX or Llama-family causal LM.

    Args:
        hf_model: e.g. a ``GPTNeoXForCausalLM`` (``hf_model.gpt_neox.layers``) or a
            ``LlamaForCausalLM`` (``hf_model.model.layers``).

    Returns:
        The ``torch.nn.ModuleList`` of blocks, in forward order.

    Raises:
        ValueError: for a model with neither layout (the message names its class).
    """
    return _backbone(hf_model).layers


def _check_layers(layers: Iterable[int] | None, n_layers: int) -> list[int]:
    """``layers`` as a list of ints in ``[0, n_layers)`` (None: all of them)."""
    if layers is None:
        return list(range(n_layers))
    checked = []
    for layer in layers:
        try:
            index = operator.index(layer)
        except TypeError as err:
            raise ValueError(f"Layer {layer!r} is not an integer.") from err
        if not 0 <= index < n_layers:
            raise ValueError(f"Layer {index} is out of range: the model has {n_layers} blocks.")
        checked.append(index)
    if not checked:
        raise ValueError("No layers requested.")
    return checked


def _input_device(base: torch.nn.Module) -> torch.device:
    """The device of the token embedding (where the token ids must go)."""
    return base.get_input_embeddings().weight.device


@torch.no_grad()
def block_outputs(
    hf_model: torch.nn.Module, tokens: torch.Tensor, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """The residual stream after each requested decoder block.

    Runs under ``torch.no_grad()`` with no attention mask (causal only) and no KV cache, in the
    model's dtype and attention implementation (see `with_sdpa`). The forward stops after the
    highest requested block: the later blocks, the final norm and the unembedding do not run.

    Args:
        hf_model: a GPT-NeoX or Llama-family causal LM (see `decoder_layers`), in eval mode.
        tokens: ``(batch, pos)`` token ids (moved to the model's device).
        layers: block indices whose output to return, in this order (repeats allowed); None: all.

    Returns:
        ``(len(layers), batch, pos, d_model)`` on the model's device, in the model's dtype; entry
        ``i`` equals TransformerLens's ``blocks.{layers[i]}.hook_resid_post``.

    Raises:
        ValueError: for an unsupported model, or a layer index that is not in
            ``[0, n_layers)``, or an empty ``layers``.
    """
    base = _backbone(hf_model)
    blocks = base.layers
    layers = _check_layers(layers, len(blocks))
    last = max(layers)
    stored: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, output):
            stored[index] = output[0] if isinstance(output, tuple) else output
            if index == last:
                raise _StopForward

        return hook

    handles = [blocks[index].register_forward_hook(hook_for(index)) for index in set(layers)]
    try:
        base(input_ids=tokens.to(_input_device(base)), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if last not in stored:  # a model whose forward skipped or swallowed the hook
        raise RuntimeError(f"Block {last} of {type(hf_model).__name__} did not run.")
    return torch.stack([stored[index] for index in layers])


def attn_implementation(hf_model: torch.nn.Module) -> str | None:
    """The attention implementation the model's config selects (e.g. ``"sdpa"``, ``"eager"``)."""
    return getattr(hf_model.config, "_attn_implementation", None)


def with_sdpa(hf_model: torch.nn.Module) -> torch.nn.Module:
    """Make ``hf_model`` use PyTorch's ``scaled_dot_product_attention``; return it.

    transformers 5 defaults to SDPA already; this switches a model set to another implementation,
    through ``set_attn_implementation`` (which checks the model supports it) where it exists, else
    by setting ``config._attn_implementation``.

    Raises:
        RuntimeError: when the model does not end up on SDPA.
    """
    if attn_implementation(hf_model) != SDPA:
        setter = getattr(hf_model, "set_attn_implementation", None)
        if callable(setter):
            setter(SDPA)
        else:
            hf_model.config._attn_implementation = SDPA
    if attn_implementation(hf_model) != SDPA:
        raise RuntimeError(
            f"{type(hf_model).__name__} did not switch to attn_implementation={SDPA!r} "
            f"(it uses {attn_implementation(hf_model)!r})."
        )
    return hf_model


def load_sdpa(
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    **kwargs,
) -> torch.nn.Module:
    """Load a causal LM with ``attn_implementation="sdpa"``, in eval mode.

    Args:
        path: a local folder written by ``save_pretrained`` (or a hub name, read from the local
            hub cache when ``local_files_only=True`` is passed).
        dtype: parameter dtype (bf16 for the GPU stream).
        device: where to put the model.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        The model, checked to use SDPA (`with_sdpa`).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=SDPA, dtype=dtype, **kwargs
    )
    return with_sdpa(model.to(device).eval())
