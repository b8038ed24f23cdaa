"""Residual-stream activations of every layer: in memory, streamed over a corpus, or cached on disk.

The residual stream at layer l is the output of block l (`blocks.{l}.hook_resid_post`), the last
block's output taken before the final norm; the embeddings are excluded (paper, section 3.1).
Positions holding special tokens (BOS at each context start, EOS between documents, PAD) are
masked out of SAE data, as in the original code.

The disk cache stores the contexts it was built from (``contexts.npy``, special positions
included: delta CE runs the model on them) and their residuals as float16 ``.npy`` shards of
shape ``(layer, token, d_model)``, read back memory-mapped, so residuals are computed once per
(model, corpus, token budget) and reused by every sweep run and the single-layer baselines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm
from transformer_lens import HookedTransformer

from mlsae.data import Context, token_batches
from mlsae.models import special_token_ids

logger = logging.getLogger(__name__)


@torch.no_grad()
def residual_stream(
    model: HookedTransformer, tokens: torch.Tensor, layers: list[int] | None = None
) -> torch.Tensor:
    """Residual vectors of every block's output (or of ``layers``).

    Args:
        model: the language model.
        tokens: ``(batch, pos)`` token ids.
        layers: blocks whose output to return (None: all); the forward stops after the last.

    Returns:
        ``(layer, batch, pos, d_model)``; the model stops before the final norm and unembedding.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    stored: dict[str, torch.Tensor] = {}

    def store(act: torch.Tensor, hook) -> None:
        stored[hook.name] = act

    model.run_with_hooks(
        tokens.to(model.cfg.device),
        fwd_hooks=[(name, store) for name in set(names)],
        stop_at_layer=max(layers) + 1,
    )
    return torch.stack([stored[name] for name in names])


def to_float16(acts: torch.Tensor, where: str) -> torch.Tensor:
    """``acts`` as float16, or a clear error when they hold NaN/inf or exceed its range."""
    if not torch.isfinite(acts).all():
        raise ValueError(f"Non-finite residuals in {where}.")
    half = acts.to(torch.float16)
    if not torch.isfinite(half).all():
        raise ValueError(
            f"Residuals in {where} exceed the float16 range (max |x| = "
            f"{acts.abs().max().item():.3g})."
        )
    return half


def special_mask(tokens: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """``(batch, pos)`` bool mask, True where the token is special (BOS/EOS/PAD)."""
    ids = torch.as_tensor(list(special_ids), dtype=tokens.dtype, device=tokens.device)
    return torch.isin(tokens, ids)


def kept_residuals(
    model: HookedTransformer,
    tokens: torch.Tensor,
    specials: Iterable[int],
    layers: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residuals (layer, kept token, d_model), keep mask (batch, pos))`` of ``tokens``.

    The residuals of the positions that hold no special token (BOS/EOS/PAD), at every block's
    output or at ``layers`` (`residual_stream`).
    """
    keep = ~special_mask(tokens, specials)
    resid = residual_stream(model, tokens, layers)
    return resid[:, keep.to(resid.device)], keep


class ResidualChunk(NamedTuple):
    """Residual vectors of the non-special tokens of one batch of contexts."""

    acts: torch.Tensor
    """``(layer, token, d_model)`` residual vectors."""
    token_ids: torch.Tensor
    """``(token,)`` ids of the tokens kept."""


def iter_residuals(
    model: HookedTransformer,
    docs: Iterable[str],
    context_length: int,
    batch_size: int,
    max_tokens: int | None = None,
    progress: bool = True,
) -> Iterator[ResidualChunk]:
    """Stream residual vectors of every layer over a corpus.

    Yields one `ResidualChunk` per batch of contexts, special positions dropped. ``max_tokens``
    bounds the context tokens read (special positions included).
    """
    specials = special_token_ids(model)
    bar = tqdm(total=max_tokens, unit="tok", desc="residuals", disable=not progress)
    batches = token_batches(docs, model.tokenizer, context_length, batch_size, max_tokens)
    for tokens in batches:
        acts, keep = kept_residuals(model, tokens, specials)
        yield ResidualChunk(acts, tokens[keep].to(acts.device))
        bar.update(tokens.numel())
    bar.close()


class ActivationCache:
    """Residual vectors on disk as float16 shards ``(layer, token, d_model)``, read memory-mapped.

    Build one with `ActivationCache.build`; open an existing one with ``ActivationCache(path)``.
    A cache is complete only once ``meta.json`` is written (the build writes to a temporary folder
    and renames it), so an interrupted build never leaves a half cache that looks whole.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"No activation cache at {self.path} (missing meta.json).")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("source") == "stream":
            raise FileNotFoundError(
                f"{self.path} holds no activation cache: it was prepared for train.source: stream "
                "(residuals computed during training). Set train.source: cache and re-run the "
                "cache stage (dvc repro build_cache) to build one."
            )
        self.shards: list[str] = self.meta["shards"]
        self.n_layers: int = self.meta["n_layers"]
        self.d_model: int = self.meta["d_model"]
        self.n_tokens: int = self.meta["n_tokens"]

    @classmethod
    def build(
        cls,
        path: str | Path,
        model: HookedTransformer,
        contexts: Iterable[Context],
        batch_size: int,
        meta: dict | None = None,
        progress: bool = True,
        labels: list[str] | None = None,
    ) -> ActivationCache:
        """Compute residuals of ``contexts`` and write one shard per batch of contexts.

        Each shard keeps the token id, document index and context index of every kept token; with
        ``labels`` (one per document index), ``meta.json`` records the tokens per label (for
        Brown: tokens per genre).
        """
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards, n_tokens, per_label = [], 0, {}
        contexts = list(contexts)
        specials = special_token_ids(model)
        bar = tqdm(total=len(contexts), unit="ctx", desc=f"cache {path.name}", disable=not progress)
        for i in range(0, len(contexts), batch_size):
            batch = contexts[i : i + batch_size]
            tokens = torch.stack([c.tokens for c in batch])
            resid, keep = kept_residuals(model, tokens, specials)
            acts = to_float16(resid, f"batch {i // batch_size} while building {path}")
            docs = torch.stack([c.docs for c in batch])[keep].numpy().astype(np.int32)
            name = f"shard_{i // batch_size:05d}"
            np.save(tmp / f"{name}.npy", acts.cpu().numpy())
            np.save(tmp / f"{name}.tokens.npy", tokens[keep].numpy().astype(np.int32))
            np.save(tmp / f"{name}.docs.npy", docs)
            ctx = torch.arange(i, i + len(batch))[:, None].expand_as(tokens)[keep]
            np.save(tmp / f"{name}.ctx.npy", ctx.numpy().astype(np.int32))
            if labels is not None:
                for doc, count in zip(*np.unique(docs, return_counts=True), strict=True):
                    per_label[labels[doc]] = per_label.get(labels[doc], 0) + int(count)
            shards.append(name)
            n_tokens += acts.shape[1]
            bar.update(len(batch))
        bar.close()
        info = {
            "shards": shards,
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
            "n_tokens": n_tokens,
            "n_contexts": len(contexts),
            "n_documents": len({int(d) for c in contexts for d in c.docs.unique()}),
            **({"tokens_per_label": dict(sorted(per_label.items()))} if labels else {}),
            **(meta or {}),
        }
        tokens = torch.stack([c.tokens for c in contexts]) if contexts else torch.zeros(0, 0)
        np.save(tmp / "contexts.npy", tokens.numpy().astype(np.int32))
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return cls(path)

    def __len__(self) -> int:
        return len(self.shards)

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a memory-mapped float16 array ``(layer, token, d_model)``."""
        return np.load(self.path / f"{self.shards[i]}.npy", mmap_mode="r")

    def contexts(self) -> torch.Tensor:
        """``(context, context_length)`` token ids of the contexts the cache was built from."""
        return torch.from_numpy(np.load(self.path / "contexts.npy").astype(np.int64))

    def context_ids(self) -> torch.Tensor | None:
        """``(token,)`` index (into `contexts`) of each cached token's context; None if unknown."""
        files = [self.path / f"{name}.ctx.npy" for name in self.shards]
        if not all(f.exists() for f in files):
            return None
        return torch.from_numpy(np.concatenate([np.load(f) for f in files]).astype(np.int64))

    def tokens(self, i: int) -> np.ndarray:
        """Token ids ``(token,)`` of shard ``i``."""
        return np.load(self.path / f"{self.shards[i]}.tokens.npy")

    def iter_batches(
        self, batch_tokens: int, layers: list[int] | None = None, dtype: torch.dtype = torch.float32
    ) -> Iterator[torch.Tensor]:
        """Yield ``(layer, batch_tokens, d_model)`` batches in cache order (last may be short).

        Training reads the cache through `mlsae.sources` (shuffle blocks, resume, ranks); with no
        shuffling that gives these same batches (tested).
        """
        rest = None  # tokens of the last shard that did not fill a batch
        for i in range(len(self)):
            arr = self.shard(i)
            x = torch.from_numpy(np.array(arr if layers is None else arr[layers]))
            x = x if rest is None else torch.cat([rest, x], dim=1)
            full = x.shape[1] // batch_tokens * batch_tokens
            for lo in range(0, full, batch_tokens):
                yield x[:, lo : lo + batch_tokens].to(dtype)
            rest = x[:, full:]
        if rest is not None and rest.shape[1]:
            yield rest.to(dtype)


def take_tokens(batches: Iterable[torch.Tensor], max_tokens: int) -> Iterator[torch.Tensor]:
    """The first ``max_tokens`` tokens (axis 1) of a stream of ``(layer, token, d)`` batches."""
    seen = 0
    for batch in batches:
        if seen >= max_tokens:
            return
        batch = batch[:, : max_tokens - seen]
        seen += batch.shape[1]
        yield batch
