import re

import pytest
import torch

from mlsae.data import load_corpus, split_documents, strip_brown_tags, token_batches


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

    from mlsae.data import iter_corpus

    calls = []

    def fake_load(name, split, streaming=False):
        calls.append((name, split, streaming))
        return ({"text": f"doc {i}"} for i in range(10**9))  # endless: must not be listed

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = iter_corpus("hf:some/dataset:validation")
    assert calls == []  # nothing read until iterated
    assert next(iter(docs)) == "doc 0" and calls == [("some/dataset", "validation", True)]
    assert load_corpus("hf:some/dataset", max_documents=3) == ["doc 0", "doc 1", "doc 2"]
