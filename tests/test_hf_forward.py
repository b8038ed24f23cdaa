"""The SDPA forward of the Hugging Face model against TransformerLens, HF hidden states and eager.

Tiny random GPT-NeoX (Pythia-like) and Llama (GQA) models built from configs, no downloads.
Every parameter is drawn at random (norm weights near 1, non-zero biases, embeddings of unit
scale), so that a wrong conversion, rotary layout or residual wiring shows up far above the
float32 tolerance (a rotary base of 5000 instead of 10000 alone moves the output by ~3e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from mlsae.activations import kept_residuals, residual_stream
from mlsae.fast.hf_forward import (
    attn_implementation,
    block_outputs,
    decoder_layers,
    load_sdpa,
    with_sdpa,
)
from mlsae.fast.tl_twin import hooked_from_neox, kept_block_outputs
from mlsae.models import hooked_from_llama

N_LAYERS = 3
VOCAB = 500
# Measured max |difference| ~3e-6 (values up to ~8) between HF SDPA and TransformerLens, and
# between SDPA and eager attention, in float32.
TOL = {"rtol": 1e-5, "atol": 2e-5}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every parameter at random, so no weight is left at its special init (ones/zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


def tiny_neox(parallel: bool = True, seed: int = 0) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        use_parallel_residual=parallel,
        max_position_embeddings=64,
    )
    return randomize(GPTNeoXForCausalLM(config), seed)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return randomize(LlamaForCausalLM(config), seed)


def hooked(hf_model):
    if isinstance(hf_model, GPTNeoXForCausalLM):
        return hooked_from_neox(hf_model)
    return hooked_from_llama(hf_model, None)


def final_norm(hf_model) -> torch.nn.Module:
    if isinstance(hf_model, GPTNeoXForCausalLM):
        return hf_model.gpt_neox.final_layer_norm
    return hf_model.model.norm


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["neox", "neox-sequential", "llama"])
def pair(request):
    """``(hf_model, its TransformerLens twin)``, float32."""
    hf_model = {
        "neox": lambda: tiny_neox(parallel=True),
        "neox-sequential": lambda: tiny_neox(parallel=False),
        "llama": tiny_llama,
    }[request.param]()
    return hf_model, hooked(hf_model)


def test_decoder_layers():
    neox, llama = tiny_neox(), tiny_llama()
    assert decoder_layers(neox) is neox.gpt_neox.layers
    assert decoder_layers(llama) is llama.model.layers
    assert len(decoder_layers(neox)) == len(decoder_layers(llama)) == N_LAYERS


@pytest.mark.parametrize("layers", [None, [0, 2], [1], [2, 0, 2]])
def test_block_outputs_equal_transformer_lens(pair, tokens, layers):
    hf_model, tl_model = pair
    assert attn_implementation(hf_model) == "sdpa"
    out = block_outputs(hf_model, tokens, layers)
    want = list(range(N_LAYERS)) if layers is None else layers
    assert out.shape == (len(want), *tokens.shape, 64)
    _, cache = tl_model.run_with_cache(tokens)
    ref = torch.stack([cache[f"blocks.{layer}.hook_resid_post"] for layer in want])
    torch.testing.assert_close(out, ref, **TOL)
    # The same thing through the repository's own TransformerLens path.
    torch.testing.assert_close(out, residual_stream(tl_model, tokens, layers), **TOL)


def test_block_outputs_equal_hf_hidden_states_before_the_final_norm(pair, tokens):
    hf_model, _ = pair
    out = block_outputs(hf_model, tokens)
    with torch.no_grad():
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(out[layer], hidden[layer + 1], **TOL)
    # hidden_states[-1] is the output of the final norm, not of the last block: the reason the
    # block outputs are taken by hooks.
    last = out[N_LAYERS - 1]
    assert (last - hidden[-1]).abs().max() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(final_norm(hf_model)(last), hidden[-1], **TOL)


def count_calls(module: torch.nn.Module, counts: dict, name: str):
    def hook(*_):
        counts[name] = counts.get(name, 0) + 1

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("make", [tiny_neox, tiny_llama])
def test_forward_stops_after_the_last_needed_block(make, tokens):
    hf_model = make()
    blocks = decoder_layers(hf_model)
    counts: dict[str, int] = {}
    handles = [count_calls(block, counts, f"block{i}") for i, block in enumerate(blocks)]
    handles.append(count_calls(final_norm(hf_model), counts, "norm"))
    handles.append(count_calls(hf_model.lm_head, counts, "lm_head"))
    try:
        block_outputs(hf_model, tokens, [0])
        assert counts == {"block0": 1}
        counts.clear()
        block_outputs(hf_model, tokens, [1, 0])
        assert counts == {"block0": 1, "block1": 1}
        counts.clear()
        block_outputs(hf_model, tokens)
        assert counts == {f"block{i}": 1 for i in range(N_LAYERS)}  # no final norm, no lm_head
        counts.clear()
        hf_model(tokens)  # the counters do count the full forward
        assert counts == {**{f"block{i}": 1 for i in range(N_LAYERS)}, "norm": 1, "lm_head": 1}
    finally:
        for handle in handles:
            handle.remove()
    # block_outputs leaves no hook behind.
    assert all(not block._forward_hooks for block in blocks)


def test_hooks_removed_on_error():
    hf_model = tiny_neox()
    bad = torch.full((1, 4), VOCAB + 10)  # out of the embedding's range
    with pytest.raises(IndexError):
        block_outputs(hf_model, bad, [0, 1])
    assert all(not block._forward_hooks for block in decoder_layers(hf_model))


@pytest.mark.parametrize("make", [tiny_neox, tiny_llama])
def test_sdpa_is_used_and_equals_eager(make, tokens, monkeypatch):
    hf_model = make()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)

    hf_model.set_attn_implementation("eager")
    assert attn_implementation(hf_model) == "eager"
    eager = block_outputs(hf_model, tokens)
    assert not calls

    assert with_sdpa(hf_model) is hf_model
    assert attn_implementation(hf_model) == "sdpa"
    assert hf_model.config._attn_implementation == "sdpa"
    fused = block_outputs(hf_model, tokens, [0, 1])
    assert len(calls) == 2  # one SDPA call per block run, none after block 1
    torch.testing.assert_close(fused, eager[:2], **TOL)
    assert with_sdpa(hf_model) is hf_model  # already on SDPA: a no-op


def test_load_sdpa_from_a_saved_folder(tmp_path, tokens):
    hf_model = tiny_llama()
    hf_model.set_attn_implementation("eager")
    hf_model.save_pretrained(tmp_path)
    loaded = load_sdpa(str(tmp_path), dtype=torch.float32)
    assert attn_implementation(loaded) == "sdpa"
    assert not loaded.training
    torch.testing.assert_close(
        block_outputs(loaded, tokens), block_outputs(hf_model, tokens), **TOL
    )


@pytest.mark.parametrize("make", [tiny_neox, tiny_llama])
def test_bf16_agrees_with_float32(make, tokens):
    hf_model = make()
    ref = block_outputs(hf_model, tokens)
    half = copy.deepcopy(hf_model).to(torch.bfloat16)
    out = block_outputs(half, tokens)
    assert out.dtype == torch.bfloat16
    for layer in range(N_LAYERS):
        err = (out[layer].float() - ref[layer]).norm() / ref[layer].norm()
        assert err < 3e-2, (layer, err.item())  # measured ~5e-3 to 9e-3


@pytest.mark.parametrize("layers", [None, [2, 0]])
def test_kept_block_outputs_equal_kept_residuals(pair, tokens, layers):
    hf_model, tl_model = pair
    tokens = tokens.clone()
    tokens[:, 0] = 0
    tokens[1, 7] = 0
    tokens[0, 5] = 3
    specials = [0, 3]
    resid, keep = kept_block_outputs(hf_model, tokens, specials, layers)
    ref, ref_keep = kept_residuals(tl_model, tokens, specials, layers)
    assert torch.equal(keep, ref_keep)
    assert int(keep.sum()) == tokens.numel() - 4
    assert resid.shape == ref.shape == (3 if layers is None else 2, tokens.numel() - 4, 64)
    torch.testing.assert_close(resid, ref, **TOL)


@pytest.mark.parametrize("layers", [[3], [-1], [0, 5], [], [1.5]])
def test_bad_layers(layers, tokens):
    with pytest.raises(ValueError, match="out of range|No layers|not an integer"):
        block_outputs(tiny_neox(), tokens, layers)


def test_out_of_range_message_names_the_layer(tokens):
    with pytest.raises(ValueError, match="Layer 7 is out of range: the model has 3 blocks"):
        block_outputs(tiny_llama(), tokens, [0, 7])


def test_unsupported_model_class(tokens):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Unsupported model class Toy"):
        decoder_layers(Toy())
    with pytest.raises(ValueError, match="Unsupported model class Toy"):
        block_outputs(Toy(), tokens)
