"""Shared fixtures: tiny random models built from configs (no downloads) and the real SmolLM2."""

from __future__ import annotations

import os

# Triton's interpreter for tests/test_fast_kernels.py: Triton reads this when triton.language is
# first imported (its own @jit helpers, tl.sum's among them) and when a kernel runs, so it is set
# before anything can import triton. Only our kernel tests call Triton in this process.
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

WORDS = (
    "the a of and to in is was he she it that for on with as his her they at by this had not "
    "are but from or have an which one you were all we when there can more if no man out so "
    "what time up into only new some could them than first been other its people two may "
    "Mary John went store gave drink cat dog sat mat France capital Paris . , ! ?"
).split()

_TOKENIZER_DIR: str | None = None


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BOS/EOS/PAD/UNK, so tests need no hub."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    # TransformerLens reloads tokenizers by name_or_path, so give it a folder to reload from.
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.mkdtemp(prefix="mlsae-tok-")
        fast.save_pretrained(_TOKENIZER_DIR)
    return AutoTokenizer.from_pretrained(_TOKENIZER_DIR)


def make_tiny_model(n_layers: int = 3, d_model: int = 32, seed: int = 0) -> HookedTransformer:
    """A random Llama-style HookedTransformer (RMSNorm, rotary, gated MLP, GQA)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=64,
        d_vocab=len(tokenizer),
        n_ctx=64,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        init_weights=True,
        seed=seed,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    # Default init leaves the residual stream tiny; make the blocks matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def smollm2():
    from mlsae.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf():
    from mlsae.models import load_smollm2_hf

    return load_smollm2_hf()


@pytest.fixture(scope="session")
def brown():
    from mlsae.corpora import load_corpus

    return load_corpus("brown")


def make_cache(path, n_tokens=2048, n_layers=3, d=16, shard=256, seed=0, nan_at=None):
    """A synthetic cache of sparse-ish structured vectors."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(40, d, generator=gen)
    path.mkdir(parents=True)
    shards = []
    for i in range(n_tokens // shard):
        codes = torch.rand(n_layers, shard, 40, generator=gen)
        codes = codes * (codes > 0.85)
        acts = codes @ dictionary + 0.05 * torch.randn(n_layers, shard, d, generator=gen)
        if nan_at is not None and i == nan_at:
            acts[0, 3, 2] = float("nan")
        name = f"shard_{i:05d}"
        np.save(path / f"{name}.npy", acts.numpy().astype(np.float16))
        np.save(path / f"{name}.tokens.npy", np.zeros(shard, dtype=np.int32))
        shards.append(name)
    meta = {"shards": shards, "n_layers": n_layers, "d_model": d, "n_tokens": n_tokens}
    (path / "meta.json").write_text(json.dumps(meta))
    from mlsae.activations import ActivationCache

    return ActivationCache(path)


def build_cache(path, model, docs, context_length: int, batch_contexts: int):
    """An `ActivationCache` of ``docs`` cut into contexts in corpus order."""
    from mlsae.activations import ActivationCache
    from mlsae.data import document_contexts, special_ids

    bos, eos = special_ids(model.tokenizer)
    contexts = document_contexts(docs, model.tokenizer, context_length, bos, eos)
    return ActivationCache.build(path, model, contexts, batch_contexts, progress=False)


def write_train_params(path, cache_root, run: str, r: int, k: int, tokens: int, **train):
    """A params file for `python -m mlsae train` over a cache at ``cache_root/activations/train``.

    One sweep entry ``run`` (R = ``r``, k = ``k``, no lens), ``tokens`` training tokens, fp32
    selection; ``train`` sets further `train` keys.
    """
    params = {
        "base": {"cache_dir": str(cache_root), "device": "cpu"},
        "data": {"train_tokens": tokens},
        "train": {"select_bf16": False, "shuffle_tokens": 0, **train},
        "analysis": {"baseline_run": run},
        "sweep": {run: {"expansion_factor": r, "k": k}},
    }
    path.write_text(yaml.safe_dump(params))
    return path


def write_stream_params(path, cache_root, corpus, run: str, tokens: int, **train):
    """`write_train_params` for training from the stream: the tiny Pythia on ``text:<corpus>``."""
    r, k = (int(x[1:]) for x in run.split("-"))
    write_train_params(path, cache_root, run, r, k, tokens, source="stream", **train)
    params = yaml.safe_load(path.read_text())
    params["base"] |= {"model": PYTHIA, "corpus": f"text:{corpus}"}
    params["data"] |= {"context_length": 32, "batch_contexts": 4, "test_fraction": 0.1}
    params["lens"] = {"train": False}
    path.write_text(yaml.safe_dump(params))
    return path


PYTHIA = "EleutherAI/pythia-70m-deduped"


def write_tiny_pythia(root, n_layers: int = 3, d_model: int = 32, seed: int = 0):
    """A random GPT-NeoX (Pythia's architecture, hand-written config) in a hub-cache layout.

    Saved as ``root/hub/models--EleutherAI--pythia-70m-deduped`` so that
    `mlsae.models.load_model` loads it by the paper's model name with no network (see
    `offline_hub_env`). Returns the HF model.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=2 * d_model,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf_model = GPTNeoXForCausalLM(config).eval()
    rev = "0" * 40
    repo = root / "hub" / f"models--{PYTHIA.replace('/', '--')}"
    snapshot = repo / "snapshots" / rev
    hf_model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return hf_model


def offline_hub_env(root) -> dict[str, str]:
    """Environment variables that point Hugging Face at ``root``'s hub cache, offline."""
    return {
        "HF_HOME": str(root),
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


@pytest.fixture
def tiny_pythia(tmp_path, monkeypatch):
    """`write_tiny_pythia` under ``tmp_path``, with this process pointed at it; yields the env."""
    root = tmp_path / "hf"
    hf_model = write_tiny_pythia(root)
    env = offline_hub_env(root)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hf_model, env


def write_text_corpus(folder, n_docs: int = 40, words: int = 120, seed: int = 0):
    """``n_docs`` text files of random sentences over the test vocabulary (``text:<folder>``)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [w for w in WORDS if w not in ".,!?"]
    for i in range(n_docs):
        n = int(rng.integers(words // 2, 2 * words))
        text = " ".join(rng.choice(vocab, n)) + " ."
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
"""Debian's chromium (installed by `make test`), or None."""


def chromium_dom(url: str, profile, budget_ms: int = 5000) -> str:
    """The DOM of ``url`` after headless Chromium ran its scripts for ``budget_ms`` (virtual)."""
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--virtual-time-budget={budget_ms}",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
