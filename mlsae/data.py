"""Documents to model inputs: a seeded split by document, a seeded order, fixed-length contexts.

Works on the documents of `mlsae.corpora.iter_corpus`: a list for the small local corpora, a
re-iterable stream for ``hf:`` datasets (split by a seeded hash of each document, `HashSplit`,
and shuffled through a bounded buffer, `DocumentShuffleBuffer`, never held in memory). Contexts
are BOS then text joined across documents with EOS; `sample_contexts` draws the activation
caches' contexts and `token_batches` batches contexts in corpus order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import NamedTuple

import torch


class HashSplit:
    """The ``"train"`` or ``"test"`` part of a document stream, never materialised.

    A document is a test document when a seeded hash of its text falls below ``test_fraction``,
    so the split needs no document count, is the same whatever the stream's order, and every
    pass over the stream gives the same documents (re-iterable when ``docs`` is).
    """

    def __init__(self, docs: Iterable[str], test_fraction: float, seed: int, part: str):
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', got {part!r}.")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        self.docs, self.test_fraction, self.seed, self.part = docs, test_fraction, seed, part

    def is_test(self, doc: str) -> bool:
        """Whether ``doc`` belongs to the test part."""
        key = hashlib.blake2b(doc.encode(), digest_size=8, key=str(self.seed).encode()).digest()
        return int.from_bytes(key, "big") < self.test_fraction * 2**64

    def __iter__(self) -> Iterator[str]:
        want_test = self.part == "test"
        return (doc for doc in self.docs if self.is_test(doc) == want_test)


def split_corpus(docs: Iterable[str], test_fraction: float = 0.1, seed: int = 0):
    """``(train, test)`` documents of a corpus from `mlsae.corpora.iter_corpus`.

    `split_documents` for a list (an exact, seeded share); a `HashSplit` pair for a stream.
    """
    if isinstance(docs, list):
        return split_documents(docs, test_fraction, seed)
    return tuple(HashSplit(docs, test_fraction, seed, part) for part in ("train", "test"))


def split_documents(
    docs: list[str], test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split documents into disjoint ``(train, test)`` lists with a seeded permutation.

    Splitting by document (not by token) keeps test text out of training (the original code took
    validation tokens from the training stream).
    """
    train, test = split_indices(len(docs), test_fraction, seed)
    return [docs[i] for i in train], [docs[i] for i in test]


def split_indices(n_docs: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted ``(train, test)`` document indices of `split_documents`."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_docs, generator=generator).tolist()
    n_test = max(1, round(n_docs * test_fraction))
    return sorted(order[n_test:]), sorted(order[:n_test])


class Context(NamedTuple):
    """One fixed-length context and the document each of its positions came from."""

    tokens: torch.Tensor
    """``(context_length,)`` token ids: BOS, then text joined across documents with EOS."""
    docs: torch.Tensor
    """``(context_length,)`` index of each position's document in the corpus's order (BOS
    takes the document of the token after it; an EOS, the document it closes)."""


def document_contexts(
    docs: Iterable[str], tokenizer, context_length: int, bos_id: int, eos_id: int
) -> Iterator[Context]:
    """Yield `Context` s: BOS then ``context_length - 1`` tokens of the joined documents.

    Documents are joined with EOS into one stream, which is cut into fixed-length pieces; the
    incomplete last piece is dropped. Document indices count the documents of ``docs`` in the
    order given.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}.")
    body = context_length - 1
    ids: list[int] = []
    owner: list[int] = []
    for index, doc in enumerate(docs):
        new = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids.extend(new)
        ids.append(eos_id)
        owner.extend([index] * (len(new) + 1))
        while len(ids) >= body:
            yield Context(
                torch.tensor([bos_id, *ids[:body]], dtype=torch.long),
                torch.tensor([owner[0], *owner[:body]], dtype=torch.long),
            )
            del ids[:body], owner[:body]


def token_contexts(
    docs: Iterable[str], tokenizer, context_length: int, bos_id: int, eos_id: int
) -> Iterator[torch.Tensor]:
    """The token ids ``(context_length,)`` of each `document_contexts` context."""
    for context in document_contexts(docs, tokenizer, context_length, bos_id, eos_id):
        yield context.tokens


def special_ids(tokenizer) -> tuple[int, int]:
    """``(bos, eos)`` ids of a tokenizer; a clear error when it has none."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("The tokenizer has no BOS/EOS token; pass bos_id and eos_id.")
    return bos, eos


def document_order(n_docs: int, seed: int) -> list[int]:
    """The seeded order of `shuffled_documents`: entry j is the index of its j-th document."""
    return torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed)).tolist()


def shuffled_documents(docs: list[str], seed: int) -> list[str]:
    """The documents of an in-memory corpus in a seeded random order (`document_order`)."""
    return [docs[i] for i in document_order(len(docs), seed)]


class DocumentShuffleBuffer:
    """A seeded shuffle of a document stream through a bounded buffer (for ``hf:`` corpora).

    Holds ``size`` documents; each new document takes the place of a randomly chosen held one,
    which is yielded (the scheme of `datasets.IterableDataset.shuffle`). Memory: ``size``
    documents. Re-iterable, and every pass gives the same order.
    """

    def __init__(self, docs: Iterable[str], size: int, seed: int):
        if size < 1:
            raise ValueError(f"The document shuffle buffer needs size >= 1, got {size}.")
        self.docs, self.size, self.seed = docs, size, seed

    def __iter__(self) -> Iterator[str]:
        generator = torch.Generator().manual_seed(self.seed)
        held: list[str] = []
        for doc in self.docs:
            if len(held) < self.size:
                held.append(doc)
                continue
            i = int(torch.randint(self.size, (1,), generator=generator))
            yield held[i]
            held[i] = doc
        order = torch.randperm(len(held), generator=generator).tolist()
        yield from (held[i] for i in order)


def shuffle_corpus(docs: Iterable[str], seed: int, stream_buffer: int) -> Iterable[str]:
    """Documents in a seeded order: a permutation of a list, a `DocumentShuffleBuffer` stream."""
    if isinstance(docs, list):
        return shuffled_documents(docs, seed)
    return DocumentShuffleBuffer(docs, stream_buffer, seed)


def sample_contexts(
    docs: Iterable[str],
    tokenizer,
    context_length: int,
    n_contexts: int,
    seed: int,
    stream_buffer: int = 1000,
) -> list[Context]:
    """``n_contexts`` contexts drawn across a whole corpus split, in a seeded random order.

    An in-memory corpus is cut into every context of its documents (in `shuffled_documents` order)
    and ``n_contexts`` of them are chosen uniformly without replacement, so a small sample spans
    the whole split rather than its first documents. A stream (``hf:``) cannot be cut whole: its
    first ``n_contexts`` contexts after a `DocumentShuffleBuffer` are taken. Context ``docs``
    index the documents of ``docs`` as given (a stream's: in shuffled order).
    """
    bos, eos = special_ids(tokenizer)
    if isinstance(docs, list):
        shuffled = shuffled_documents(docs, seed)
        order = torch.tensor(document_order(len(docs), seed))  # shuffled[j] is docs[order[j]]
        contexts = [
            Context(c.tokens, order[c.docs])  # indices into shuffled -> into docs
            for c in document_contexts(shuffled, tokenizer, context_length, bos, eos)
        ]
        generator = torch.Generator().manual_seed(seed + 1)
        chosen = torch.randperm(len(contexts), generator=generator)[:n_contexts].tolist()
        return [contexts[i] for i in chosen]
    stream = DocumentShuffleBuffer(docs, stream_buffer, seed)
    return list(islice(document_contexts(stream, tokenizer, context_length, bos, eos), n_contexts))


def token_batches(
    docs: Iterable[str],
    tokenizer,
    context_length: int,
    batch_size: int,
    max_tokens: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield token batches of shape ``(batch, context_length)`` until ``max_tokens`` are used.

    The last batch may be smaller than ``batch_size``.
    """
    bos, eos = special_ids(tokenizer) if bos_id is None or eos_id is None else (bos_id, eos_id)
    max_contexts = None if max_tokens is None else max(1, max_tokens // context_length)
    contexts = islice(token_contexts(docs, tokenizer, context_length, bos, eos), max_contexts)
    while batch := list(islice(contexts, batch_size)):
        yield torch.stack(batch)
