"""Where training vectors come from: the disk cache or the model itself, through a shuffle buffer.

Two sources give the same thing, a sequence of lazily loaded chunks of residual vectors
``(layer, token, d_model)`` with their token counts known before loading:

* `CacheSource`: the shards of an `ActivationCache` (the offline default: residuals computed
  once and shared by every sweep run).
* `ModelStream`: the model run on the corpus while training reads it (the paper's 1B-token runs,
  which no disk holds). One forward per batch of contexts yields every trained layer and stops
  after the last block it needs; special positions (BOS, EOS, PAD) are dropped.

`shuffled_batches` turns either into training batches. The in-order stream of kept tokens is cut
into *blocks* of ``shuffle_tokens`` (rounded up to whole batches); each block is loaded into one
buffer, permuted with a generator seeded by ``(seed, block index)``, and cut into batches, so a
batch mixes tokens of every context and document in its block. Because the block boundaries and
permutations depend only on token counts (known from token ids, without a forward) and the seed,
any position can be regenerated exactly: resuming at micro-batch ``b`` walks the token counts to
its block, loads that block alone and skips ``b``'s predecessors in it. Under ``torchrun`` rank
``r`` of ``W`` takes blocks ``r, r + W, ...``, so ranks compute disjoint parts of the stream.
``shuffle_tokens = 0`` turns shuffling off (blocks of one batch, in order; ranks then take
alternate batches).

Memory: one block, ``block_tokens x n_layers x d_model`` values in the chunks' dtype (float16:
2 bytes), plus one chunk being loaded (``batch_contexts x context_length`` tokens for the stream,
one shard for the cache) and one batch. For SmolLM2 (30 x 576) a 16,384-token block is 566 MB;
for Pythia-70m (6 x 512) a 262,144-token block is 1.6 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mlsae.activations import ActivationCache, kept_residuals, special_mask, to_float16
from mlsae.data import shuffle_corpus, special_ids, token_contexts
from mlsae.models import special_token_ids


class Chunk:
    """``n_tokens`` residual vectors ``(layer, n_tokens, d_model)``, loaded on first `get`."""

    def __init__(self, n_tokens: int, load: Callable[[], torch.Tensor]):
        self.n_tokens, self._load, self._value = n_tokens, load, None

    def get(self) -> torch.Tensor:
        """The vectors (loaded once, kept until `release`)."""
        if self._value is None:
            self._value = self._load()
        return self._value

    def release(self) -> None:
        """Drop the loaded vectors."""
        self._value = None


class CacheSource:
    """The shards of an `ActivationCache` as chunks (only ``layers``, if given)."""

    def __init__(self, cache: ActivationCache, layers: list[int] | None = None):
        self.cache, self.layers = cache, layers
        self.n_layers = cache.n_layers if layers is None else len(layers)
        self.d_model = cache.d_model
        self.n_tokens: int | None = cache.n_tokens
        """Tokens in one pass (None for an unbounded or unknown stream)."""

    def chunks(self, epoch: int = 0, seed: int = 0) -> Iterator[Chunk]:
        """One chunk per shard; a shard's length comes from its header, its data on `get`.

        Epoch 0 reads the shards in order; a later epoch in a seeded random order.
        """
        order = list(range(len(self.cache)))
        if epoch:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        for i in order:
            arr = self.cache.shard(i)  # memory-mapped: only the header is read here

            def load(arr=arr) -> torch.Tensor:
                part = arr if self.layers is None else arr[self.layers]
                return torch.from_numpy(np.array(part))  # read into memory

            yield Chunk(arr.shape[1], load)


class ModelStream:
    """Residuals computed on the fly: documents -> contexts -> model forward -> chunks.

    Documents are visited in a seeded order (`mlsae.data.shuffle_corpus`: a permutation of an
    in-memory corpus, a bounded shuffle buffer of ``doc_buffer`` documents for a stream), joined
    with EOS and cut into contexts of ``context_length`` tokens (BOS first); each batch of
    ``batch_contexts`` contexts is one chunk. The chunk's token count is the number of
    non-special positions, known from the token ids, so seeking needs no forward.

    Precision: the forward runs in the model's dtype, under ``autocast`` (e.g. ``torch.bfloat16``
    on a GPU) when given; the residuals are then kept in float16, as in the disk cache (a value
    beyond float16's range is an error, not an inf).

    One pass over the documents: a stream that ends before the training budget ends the run,
    and `mlsae.train.train` reports how many tokens it used.
    """

    def __init__(
        self,
        model: HookedTransformer,
        docs: Iterable[str],
        context_length: int,
        batch_contexts: int,
        layers: list[int] | None = None,
        seed: int = 0,
        shuffle_documents: bool = True,
        doc_buffer: int = 1000,
        autocast: torch.dtype | None = None,
    ):
        self.model, self.docs = model, docs
        self.context_length, self.batch_contexts = context_length, batch_contexts
        self.layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        self.seed, self.shuffle_documents, self.doc_buffer = seed, shuffle_documents, doc_buffer
        self.autocast = autocast
        self.n_layers, self.d_model = len(self.layers), model.cfg.d_model
        self.n_tokens: int | None = None
        self.specials = special_token_ids(model)

    def token_batches(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """``(batch_contexts, context_length)`` token batches in stream order (no forward)."""
        docs = self.docs
        if self.shuffle_documents:
            docs = shuffle_corpus(docs, self.seed + 7919 * epoch, self.doc_buffer)
        bos, eos = special_ids(self.model.tokenizer)
        contexts = token_contexts(docs, self.model.tokenizer, self.context_length, bos, eos)
        while batch := list(islice(contexts, self.batch_contexts)):
            yield torch.stack(batch)

    def residuals(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(layer, kept token, d_model)`` float16 residuals of the non-special positions."""
        device_type = torch.device(self.model.cfg.device).type
        with torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None):
            resid, _ = kept_residuals(self.model, tokens, self.specials, self.layers)
        return to_float16(resid, "the training stream")

    def chunks(self, epoch: int = 0, seed: int = 0) -> Iterator[Chunk]:
        """One chunk per batch of contexts; the forward runs on `Chunk.get`.

        Each epoch visits the documents in another seeded order (the stream's own ``seed``).
        """
        for tokens in self.token_batches(epoch):
            n_kept = int((~special_mask(tokens, self.specials)).sum())
            yield Chunk(n_kept, lambda tokens=tokens: self.residuals(tokens))


def block_size(batch_tokens: int, shuffle_tokens: int) -> int:
    """Tokens per shuffle block: ``shuffle_tokens`` rounded up to whole batches (0: one batch)."""
    if shuffle_tokens and shuffle_tokens < batch_tokens:
        raise ValueError(
            f"The shuffle buffer ({shuffle_tokens} tokens) is smaller than one batch "
            f"({batch_tokens} tokens)."
        )
    return batch_tokens * max(1, math.ceil(shuffle_tokens / batch_tokens))


def _blocks(chunks: Iterable[Chunk], block_tokens: int) -> Iterator[list[tuple[Chunk, int, int]]]:
    """Cut the in-order token stream into blocks: lists of ``(chunk, lo, hi)`` pieces."""
    pieces: list[tuple[Chunk, int, int]] = []
    need = block_tokens
    for chunk in chunks:
        lo = 0
        while chunk.n_tokens - lo >= need:
            pieces.append((chunk, lo, lo + need))
            yield pieces
            lo += need
            pieces, need = [], block_tokens
        if chunk.n_tokens > lo:
            pieces.append((chunk, lo, chunk.n_tokens))
            need -= chunk.n_tokens - lo
    if pieces:
        yield pieces  # the last, partial block


def _assemble(pieces: list[tuple[Chunk, int, int]]) -> torch.Tensor:
    """One block ``(layer, token, d)``, filled piece by piece (each chunk released once used)."""
    n = sum(hi - lo for _, lo, hi in pieces)
    block, pos = None, 0
    for chunk, lo, hi in pieces:
        x = chunk.get()[:, lo:hi]
        if block is None:
            block = x.new_empty((x.shape[0], n, x.shape[2]))
        block[:, pos : pos + hi - lo] = x
        pos += hi - lo
        if hi == chunk.n_tokens:
            chunk.release()
    return block


def shuffled_batches(
    chunks: Iterable[Chunk],
    batch_tokens: int,
    shuffle_tokens: int,
    seed: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor]:
    """Training batches ``(layer, batch_tokens, d_model)`` of a chunk stream (module docstring).

    Args:
        chunks: the source's chunks, in stream order.
        batch_tokens: tokens per batch (the last batch of the stream may be short).
        shuffle_tokens: shuffle block size in tokens (0: no shuffling).
        seed: seeds each block's permutation together with the block's index.
        start_batch: batches of this rank already consumed (resume); they are skipped without
            loading any block before the one holding the next batch.
        rank: this process's data-parallel rank r; it takes blocks r, r + W, ...
        world_size: the number W of data-parallel processes.
        dtype: dtype of the yielded batches.
    """
    block_tokens = block_size(batch_tokens, shuffle_tokens)
    per_block = block_tokens // batch_tokens
    skip_blocks, skip_batches = divmod(start_batch, per_block)
    first = rank + world_size * skip_blocks
    for j, pieces in enumerate(_blocks(chunks, block_tokens)):
        if j < first or (j - rank) % world_size:
            continue
        block = _assemble(pieces)
        n = block.shape[1]
        order = None
        if shuffle_tokens:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + j)
            order = torch.randperm(n, generator=generator).to(block.device)
        for lo in range(skip_batches * batch_tokens if j == first else 0, n, batch_tokens):
            index = slice(lo, lo + batch_tokens) if order is None else order[lo : lo + batch_tokens]
            yield block[:, index].to(dtype)
        del block


class TrainingSource:
    """A chunk source with its shuffle settings and epochs: what `mlsae.train.train` reads.

    ``epochs`` passes over the source make one stream (each pass in another seeded order of
    shards or documents, then through the same shuffle blocks), so resume and rank splits work
    across epochs as within one.
    """

    def __init__(
        self, source: CacheSource | ModelStream, shuffle_tokens: int, seed: int = 0, epochs: int = 1
    ):
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}.")
        self.source, self.shuffle_tokens, self.seed = source, shuffle_tokens, seed
        self.epochs = epochs
        self.n_layers, self.d_model = source.n_layers, source.d_model
        self.n_tokens = None if source.n_tokens is None else source.n_tokens * epochs

    def chunks(self) -> Iterator[Chunk]:
        """The source's chunks, ``epochs`` times."""
        for epoch in range(self.epochs):
            yield from self.source.chunks(epoch, self.seed)

    def batches(
        self, batch_tokens: int, start_batch: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[torch.Tensor]:
        """`shuffled_batches` of the source, float32."""
        return shuffled_batches(
            self.chunks(),
            batch_tokens,
            self.shuffle_tokens,
            self.seed,
            start_batch,
            rank,
            world_size,
        )
