import pytest
import torch

from mlsae.activations import residual_stream
from mlsae.models import SUPPORTED_MODELS, load_model


def test_unknown_model_lists_supported_names():
    with pytest.raises(ValueError, match="Unknown model 'gpt5'.*smollm2-135m.*pythia-70m"):
        load_model("gpt5")
    assert "EleutherAI/pythia-70m-deduped" in SUPPORTED_MODELS


@pytest.mark.slow
def test_smollm2_shapes(smollm2):
    assert smollm2.cfg.n_layers == 30
    assert smollm2.cfg.d_model == 576
    assert smollm2.cfg.d_vocab == 49152
    assert smollm2.tokenizer.bos_token_id == 1


@pytest.mark.slow
def test_smollm2_residuals_match_hf_hidden_states(smollm2, smollm2_hf):
    hf_model, tokenizer = smollm2_hf
    text = "The Fulton County Grand Jury said Friday an investigation of Atlanta's election"
    tokens = torch.tensor([[1, *tokenizer(text)["input_ids"]]])
    resid = residual_stream(smollm2, tokens)
    assert resid.shape == (30, 1, tokens.shape[1], 576)
    with torch.no_grad():
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    # hidden[l + 1] is block l's output; HF applies the final norm to the last one, we do not.
    for layer in range(29):
        rel = (resid[layer] - hidden[layer + 1]).norm() / hidden[layer + 1].norm()
        assert rel < 1e-4, (layer, rel.item())
    final = hf_model.model.norm(resid[29])
    assert ((final - hidden[30]).norm() / hidden[30].norm()) < 1e-4


@pytest.mark.slow
def test_smollm2_greedy_continuation_says_paris(smollm2):
    out = smollm2.generate(
        "The capital of France is",
        max_new_tokens=8,
        do_sample=False,
        prepend_bos=False,
        verbose=False,
    )
    assert "Paris" in out.removeprefix("The capital of France is")


def test_pythia_loads_by_hub_name_offline(tiny_pythia):
    """A random GPT-NeoX saved in a hub-cache layout loads by its hub name with no network."""
    hf_model, _ = tiny_pythia
    model = load_model("EleutherAI/pythia-70m-deduped")
    assert model.cfg.n_layers == 3 and model.cfg.d_model == 32
    tokens = torch.tensor([[1, 5, 9, 12, 7, 30, 2]])
    resid = residual_stream(model, tokens)
    with torch.no_grad():
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    for layer in range(2):
        rel = (resid[layer] - hidden[layer + 1]).norm() / hidden[layer + 1].norm()
        assert rel < 1e-4, (layer, rel.item())
