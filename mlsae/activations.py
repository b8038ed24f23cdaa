"""Residual-stream activations of every layer: in memory, streamed over a corpus, or cached on disk.

The residual stream at layer l is the output of block l (`blocks.{l}.hook_resid_post`), the last
block's output taken before the final norm; the embeddings are excluded (paper, section 3.1).
Positions holding special tokens (BOS at each context start, EOS between documents, PAD) are
masked out of SAE data, as in the original code.

The disk cache stores chunks of shape ``(layer, token, d_model)`` in float16 ``.npy`` shards, read
back memory-mapped, so residuals are computed once per (model, corpus, token budget) and reused by
every sweep run and the single-layer baselines.
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
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mlsae.data import token_batches
from mlsae.models import special_token_ids

logger = logging.getLogger(__name__)


def resid_hook_names(n_layers: int) -> list[str]:
    """Hook names of the residual stream after each block."""
    return [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


@torch.no_grad()
def residual_stream(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Residual vectors of every block's output.

    Args:
        model: the language model.
        tokens: ``(batch, pos)`` token ids.

    Returns:
        ``(layer, batch, pos, d_model)``; the model stops before the final norm and unembedding.
    """
    names = resid_hook_names(model.cfg.n_layers)
    stored: dict[str, torch.Tensor] = {}

    def store(act: torch.Tensor, hook) -> None:
        stored[hook.name] = act

    model.run_with_hooks(
        tokens.to(model.cfg.device),
        fwd_hooks=[(name, store) for name in names],
        stop_at_layer=model.cfg.n_layers,
    )
    return torch.stack([stored[name] for name in names])


def special_mask(tokens: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """``(batch, pos)`` bool mask, True where the token is special (BOS/EOS/PAD)."""
    ids = torch.as_tensor(list(special_ids), dtype=tokens.dtype, device=tokens.device)
    return torch.isin(tokens, ids)


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
        acts = residual_stream(model, tokens)
        keep = ~special_mask(tokens, specials).to(acts.device)
        yield ResidualChunk(acts[:, keep], tokens.to(acts.device)[keep])
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
        self.shards: list[str] = self.meta["shards"]
        self.n_layers: int = self.meta["n_layers"]
        self.d_model: int = self.meta["d_model"]
        self.n_tokens: int = self.meta["n_tokens"]

    @classmethod
    def build(
        cls,
        path: str | Path,
        model: HookedTransformer,
        docs: Iterable[str],
        context_length: int,
        batch_size: int,
        max_tokens: int,
        meta: dict | None = None,
        progress: bool = True,
    ) -> ActivationCache:
        """Compute residuals over ``docs`` and write them as one shard per batch of contexts."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shards, n_tokens = [], 0
        chunks = iter_residuals(model, docs, context_length, batch_size, max_tokens, progress)
        for i, chunk in enumerate(chunks):
            if not torch.isfinite(chunk.acts).all():
                raise ValueError(f"Non-finite residuals in batch {i} while building {path}.")
            acts = chunk.acts.cpu().numpy().astype(np.float16)
            if not np.isfinite(acts).all():
                raise ValueError(
                    f"Residuals in batch {i} exceed the float16 range (max |x| = "
                    f"{chunk.acts.abs().max().item():.3g}) while building {path}."
                )
            name = f"shard_{i:05d}"
            np.save(tmp / f"{name}.npy", acts)
            np.save(tmp / f"{name}.tokens.npy", chunk.token_ids.cpu().numpy().astype(np.int32))
            shards.append(name)
            n_tokens += acts.shape[1]
        info = {
            "shards": shards,
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
            "n_tokens": n_tokens,
            "context_length": context_length,
            **(meta or {}),
        }
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

    def tokens(self, i: int) -> np.ndarray:
        """Token ids ``(token,)`` of shard ``i``."""
        return np.load(self.path / f"{self.shards[i]}.tokens.npy")

    def iter_batches(
        self,
        batch_tokens: int,
        layers: list[int] | None = None,
        dtype: torch.dtype = torch.float32,
        start_token: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Yield ``(layer, batch_tokens, d_model)`` batches in corpus order (last may be short).

        ``start_token`` skips tokens already consumed (resume); ``rank``/``world_size`` give each
        data-parallel process every ``world_size``-th batch.
        """
        buffer: list[np.ndarray] = []
        held, index, seen = 0, 0, 0
        for i in range(len(self)):
            arr = self.shard(i)
            n = arr.shape[1]
            if seen + n <= start_token:
                seen += n
                continue
            lo = max(0, start_token - seen)
            seen += n
            arr = arr if layers is None else arr[layers]
            buffer.append(arr[:, lo:])
            held += n - lo
            while held >= batch_tokens:
                batch, buffer, held = _take(buffer, batch_tokens, held)
                if index % world_size == rank:
                    yield torch.from_numpy(batch).to(dtype)
                index += 1
        if held and index % world_size == rank:
            yield torch.from_numpy(np.concatenate(buffer, axis=1)).to(dtype)


def take_tokens(batches: Iterable[torch.Tensor], max_tokens: int) -> Iterator[torch.Tensor]:
    """The first ``max_tokens`` tokens (axis 1) of a stream of ``(layer, token, d)`` batches."""
    seen = 0
    for batch in batches:
        if seen >= max_tokens:
            return
        batch = batch[:, : max_tokens - seen]
        seen += batch.shape[1]
        yield batch


def _take(buffer: list[np.ndarray], n: int, held: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Pop the first ``n`` tokens (axis 1) of a list of arrays."""
    out, got = [], 0
    while got < n:
        arr = buffer[0]
        need = n - got
        if arr.shape[1] <= need:
            out.append(arr)
            got += arr.shape[1]
            buffer.pop(0)
        else:
            out.append(arr[:, :need])
            buffer[0] = arr[:, need:]
            got = n
    return np.concatenate(out, axis=1), buffer, held - n
