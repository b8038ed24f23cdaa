import re

import pytest
import torch
from conftest import WORDS

from mlsae.corpora import load_corpus, strip_brown_tags
from mlsae.data import (
    document_contexts,
    document_order,
    sample_contexts,
    shuffled_documents,
    special_ids,
    split_documents,
    token_batches,
)


def test_unknown_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown corpus 'wikipedia'.*brown"):
        load_corpus("wikipedia")


def test_missing_text_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(f"text:{tmp_path / 'nope.txt'}")


def test_text_corpus_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b.txt").write_text("second doc")
    assert load_corpus(f"text:{tmp_path / 'a.txt'}") == ["first doc"]
    assert load_corpus(f"text:{tmp_path}") == ["first doc", "second doc"]


def test_strip_brown_tags():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\tIt/pps ran/vbd ./.\n"
    assert strip_brown_tags(raw) == 'The jury said "no".\nIt ran.'


def test_split_is_disjoint_reproducible_and_seeded():
    docs = [f"doc {i}" for i in range(100)]
    train, test = split_documents(docs, test_fraction=0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(docs)
    assert split_documents(docs, 0.2, seed=3) == (train, test)
    assert split_documents(docs, 0.2, seed=4)[1] != test


def test_token_batches_join_with_eos_and_start_with_bos(tokenizer):
    docs = ["the cat sat", "a dog", "the man went to the store"]
    batches = list(token_batches(docs, tokenizer, context_length=4, batch_size=2))
    flat = torch.cat(batches)
    assert flat.shape[1] == 4
    assert (flat[:, 0] == tokenizer.bos_token_id).all()
    eos = tokenizer.eos_token_id
    stream = flat[:, 1:].flatten().tolist()
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    # 14 tokens in the joined stream, three per context: the last two are dropped.
    assert stream == expected[: len(stream)] and len(stream) == 12
    assert [b.shape[0] for b in batches] == [2, 2]


def test_token_batches_respect_max_tokens(tokenizer):
    docs = ["the cat sat on the mat"] * 20
    batches = list(token_batches(docs, tokenizer, context_length=8, batch_size=3, max_tokens=40))
    assert sum(b.numel() for b in batches) == 40


DOCS = [" ".join([w] * (3 + i % 7) + ["the", "cat", "sat"]) for i, w in enumerate(WORDS[4:16])]
"""Twelve documents of 6 to 12 words, each with a word of its own."""


def test_shuffled_documents_follow_document_order():
    docs = [f"doc {i}" for i in range(30)]
    order = document_order(len(docs), seed=7)
    assert sorted(order) == list(range(30)) and order != list(range(30))
    assert shuffled_documents(docs, 7) == [docs[i] for i in order]
    assert document_order(30, 7) == order and document_order(30, 8) != order


def test_sample_contexts_draws_from_every_context_of_the_seeded_document_order(tokenizer):
    """The cache's contexts, pinned: every context of the documents in `document_order`, then a
    seeded (``seed + 1``) draw without replacement; document ids index the documents as given."""
    seed, length = 3, 8
    got = sample_contexts(DOCS, tokenizer, length, 10, seed)
    bos, eos = special_ids(tokenizer)
    order = torch.randperm(len(DOCS), generator=torch.Generator().manual_seed(seed))
    every = list(document_contexts([DOCS[i] for i in order], tokenizer, length, bos, eos))
    chosen = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed + 1))[:10]
    assert len(got) == 10 and len(every) > 10
    for context, i in zip(got, chosen.tolist(), strict=True):
        assert torch.equal(context.tokens, every[i].tokens)
        assert torch.equal(context.docs, order[every[i].docs])
    for context in got:  # each position's document: a run of that document's tokens (or EOS)
        for d in context.docs[1:].unique().tolist():
            text = tokenizer(DOCS[d], add_special_tokens=False)["input_ids"] + [eos]
            own = context.tokens[1:][context.docs[1:] == d].tolist()
            assert any(text[i : i + len(own)] == own for i in range(len(text))), (d, own)
    assert [c.tokens.tolist() for c in sample_contexts(DOCS, tokenizer, length, 10, seed)] == [
        c.tokens.tolist() for c in got
    ]


@pytest.mark.slow
def test_brown_corpus(brown):
    assert len(brown) == 500
    words = sum(len(re.findall(r"\w+|[^\w\s]", doc)) for doc in brown)
    assert words > 1_100_000
    assert brown[0].startswith("The Fulton County Grand Jury said Friday")
    assert "/nn" not in brown[0] and "/at " not in brown[0]
    train, test = split_documents(brown, test_fraction=0.1, seed=0)
    assert len(test) == 50 and not set(train) & set(test)
    assert split_documents(brown, 0.1, seed=0)[1] == test


def test_hash_split_is_disjoint_complete_seeded_and_order_free():
    from mlsae.data import HashSplit, split_corpus

    docs = [f"document number {i}" for i in range(2000)]

    class Stream:  # re-iterable, not a list: split_corpus must not materialise it
        def __iter__(self):
            return iter(docs)

    train, test = split_corpus(Stream(), test_fraction=0.1, seed=3)
    assert isinstance(test, HashSplit)
    tr, te = list(train), list(test)
    assert sorted(tr + te) == sorted(docs) and not set(tr) & set(te)
    assert 150 < len(te) < 250  # ~10%
    assert list(test) == te  # every pass gives the same documents
    assert set(HashSplit(list(reversed(docs)), 0.1, 3, "test")) == set(te)  # order does not matter
    assert set(HashSplit(docs, 0.1, 4, "test")) != set(te)  # the seed does


def test_hf_corpus_is_streamed_not_loaded(monkeypatch):
    import datasets

    from mlsae.corpora import iter_corpus

    calls = []

    def fake_load(name, split, streaming=False):
        calls.append((name, split, streaming))
        return ({"text": f"doc {i}"} for i in range(10**9))  # endless: must not be listed

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = iter_corpus("hf:some/dataset:validation")
    assert calls == []  # nothing read until iterated
    assert next(iter(docs)) == "doc 0" and calls == [("some/dataset", "validation", True)]
    assert load_corpus("hf:some/dataset", max_documents=3) == ["doc 0", "doc 1", "doc 2"]


def _tarball(path, names):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
    return path


@pytest.mark.parametrize("with_filter", [True, False])
def test_npm_tarball_unpacks_on_any_python_311_and_refuses_escaping_members(
    tmp_path, monkeypatch, with_filter
):
    import tarfile

    from mlsae.corpora import extract_tarball

    if not with_filter:  # Debian 12's Python 3.11.2: extractall has no filter argument
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good = _tarball(tmp_path / "good.tgz", ["package/ca01", "package/cb02"])
    extract_tarball(good, tmp_path / "out")
    assert (tmp_path / "out" / "package" / "ca01").read_text() == "ok"
    for bad in ("../escape", "/abs/path", "package/../../escape"):
        with pytest.raises(ValueError, match="unsafe member"):
            extract_tarball(_tarball(tmp_path / "bad.tgz", [bad]), tmp_path / "out2")
        assert not (tmp_path / "escape").exists()
