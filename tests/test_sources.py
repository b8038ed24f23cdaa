"""Training sources: the shuffle blocks, resume and rank splits, and stream == cache."""

import json
import logging

import numpy as np
import pytest
import torch
from conftest import build_cache, make_cache, make_tiny_model, write_text_corpus

from mlsae.activations import ActivationCache
from mlsae.corpora import load_corpus
from mlsae.sources import (
    CacheSource,
    Chunk,
    ModelStream,
    TrainingSource,
    block_size,
    shuffled_batches,
)
from mlsae.train import TrainConfig, train


def numbered_chunks(lengths, d=2, n_layers=2):
    """Chunks whose vectors hold their global token index (so order can be read back)."""
    start, loads = 0, []

    def make(lo, n):
        def load():
            loads.append(lo)
            idx = torch.arange(lo, lo + n, dtype=torch.float32)
            return idx[None, :, None].expand(n_layers, n, d).clone()

        return load

    chunks = []
    for n in lengths:
        chunks.append(Chunk(n, make(start, n)))
        start += n
    return chunks, loads


def ids(batches):
    return [b[0, :, 0].long().tolist() for b in batches]


LENGTHS = [7, 3, 12, 5, 9, 1, 8, 11, 4]  # 60 tokens in chunks of uneven size


def test_without_shuffling_batches_are_the_stream_in_order():
    chunks, _ = numbered_chunks(LENGTHS)
    out = ids(shuffled_batches(chunks, 8, 0))
    assert out == [list(range(i, min(i + 8, 60))) for i in range(0, 60, 8)]


def test_shuffle_blocks_permute_whole_blocks_and_depend_on_the_seed():
    chunks, _ = numbered_chunks(LENGTHS)
    out = ids(shuffled_batches(chunks, 4, 10, seed=3))  # blocks of 12 tokens = 3 batches
    assert block_size(4, 10) == 12 and len(out) == 15
    for b in range(5):
        block = sum(out[3 * b : 3 * b + 3], [])
        assert sorted(block) == list(range(12 * b, 12 * b + 12))  # each block a permutation
    assert sum(out, []) != list(range(60))  # and not the identity
    chunks, _ = numbered_chunks(LENGTHS)
    assert ids(shuffled_batches(chunks, 4, 10, seed=3)) == out  # seeded
    chunks, _ = numbered_chunks(LENGTHS)
    assert ids(shuffled_batches(chunks, 4, 10, seed=4)) != out


def test_resume_regenerates_the_stream_and_loads_only_the_needed_block():
    chunks, _ = numbered_chunks(LENGTHS)
    full = ids(shuffled_batches(chunks, 4, 10, seed=1))
    for start in range(len(full)):
        chunks, loads = numbered_chunks(LENGTHS)
        tail = ids(shuffled_batches(chunks, 4, 10, seed=1, start_batch=start))
        assert tail == full[start:]
        block_start = 12 * (start // 3)  # no chunk wholly before the resumed block is loaded
        assert all(ENDS[lo] > block_start for lo in loads)


ENDS = dict(zip(np.cumsum([0, *LENGTHS[:-1]]).tolist(), np.cumsum(LENGTHS).tolist(), strict=True))


@pytest.mark.parametrize("shuffle", [0, 10])
def test_ranks_read_disjoint_parts_that_cover_the_stream(shuffle):
    world = 3
    parts = []
    for rank in range(world):
        chunks, _ = numbered_chunks(LENGTHS)
        parts.append(ids(shuffled_batches(chunks, 4, shuffle, 2, rank=rank, world_size=world)))
    tokens = [t for part in parts for batch in part for t in batch]
    assert sorted(tokens) == list(range(60))  # disjoint and complete
    # a rank resumes within its own part
    chunks, _ = numbered_chunks(LENGTHS)
    resumed = ids(shuffled_batches(chunks, 4, shuffle, 2, start_batch=2, rank=1, world_size=world))
    assert resumed == parts[1][2:]


def test_a_buffer_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="smaller than one batch"):
        block_size(64, 32)
    with pytest.raises(ValueError, match="smaller than one batch"):
        TrainConfig.of(batch_tokens=64, shuffle_tokens=32)


def test_cache_source_reads_layers_and_shards_lazily(tmp_path):
    cache = make_cache(tmp_path / "c", n_tokens=1024, n_layers=3, d=8, shard=256)
    source = CacheSource(cache, layers=[2])
    chunks = list(source.chunks())
    assert [c.n_tokens for c in chunks] == [256] * 4 and all(c._value is None for c in chunks)
    x = torch.cat([c.get() for c in chunks], dim=1)
    reference = torch.cat(list(cache.iter_batches(1024, layers=[2])), dim=1)
    assert torch.equal(x.float(), reference)


def small_docs(n=30, seed=0):
    rng = np.random.default_rng(seed)
    words = "the a of and to in is was he she it that for on with as his her they".split()
    return [" ".join(rng.choice(words, int(rng.integers(5, 40)))) for _ in range(n)]


def test_stream_without_shuffling_trains_as_the_cache_of_the_same_tokens(tmp_path):
    torch.set_num_threads(1)
    model = make_tiny_model()
    docs = small_docs()
    cache = build_cache(tmp_path / "c", model, docs, 16, 3)
    stream = ModelStream(model, docs, 16, 3, shuffle_documents=False)
    assert sum(c.n_tokens for c in stream.chunks()) == cache.n_tokens
    cfg = TrainConfig.of(
        expansion_factor=4,
        k=4,
        batch_tokens=16,
        lr=3e-3,
        dead_tokens=64,
        max_tokens=cache.n_tokens,
        shuffle_tokens=0,  # the cache in its own order, as the unshuffled stream
        select_bf16=False,
    )
    a = train(cfg, cache, tmp_path / "cache-run", progress=False)
    b = train(cfg, TrainingSource(stream, 0), tmp_path / "stream-run", progress=False)
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-5, msg=name)
    # and shuffling changes what the run sees
    c = train(cfg, TrainingSource(stream, 64, seed=0), tmp_path / "shuffled-run", progress=False)
    assert not torch.allclose(c.W_dec, a.W_dec)


def test_stream_stops_after_the_last_needed_block_and_keeps_float16(tmp_path):
    model = make_tiny_model(n_layers=3)
    stream = ModelStream(model, small_docs(), 16, 2, layers=[0, 1])
    calls = []
    model.blocks[2].register_forward_hook(lambda *a: calls.append(1))
    x = next(iter(stream.chunks())).get()
    assert x.shape[0] == 2 and x.dtype == torch.float16 and not calls


def test_a_stream_ending_before_the_budget_says_how_many_tokens_were_used(tmp_path, caplog):
    model = make_tiny_model()
    stream = ModelStream(model, small_docs(8), 16, 2)
    n = sum(c.n_tokens for c in stream.chunks())
    cfg = TrainConfig.of(expansion_factor=2, k=4, batch_tokens=16, max_tokens=10 * n)
    with caplog.at_level(logging.WARNING):
        train(cfg, TrainingSource(stream, 0), tmp_path / "run", progress=False)
    used = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["tokens_seen"]
    assert 0 < used <= n
    assert f"ended after {used} tokens, before the budget of {10 * n}" in caplog.text


@pytest.mark.slow
def test_cache_contexts_span_the_corpus_and_record_the_genre_mix(tmp_path, tokenizer):
    """The default's training sample covers all 15 Brown genres (word-level test tokenizer)."""
    from mlsae.corpora import document_labels
    from mlsae.data import sample_contexts, split_documents, split_indices

    docs = load_corpus("brown")
    labels = document_labels("brown")
    assert len(set(labels)) == 15 and len(labels) == 500
    train_idx, _ = split_indices(500, 0.1, 0)
    train_docs, _ = split_documents(docs, 0.1, 0)
    contexts = sample_contexts(train_docs, tokenizer, 256, 250, seed=0)  # the default's 64k tokens
    seen = {labels[train_idx[int(d)]] for c in contexts for d in c.docs}
    assert len(seen) == 15
    assert len({int(d) for c in contexts for d in c.docs}) > 150  # not the first few documents


def test_build_caches_records_tokens_per_label_and_writes_a_stream_manifest(tmp_path):
    from mlsae import config
    from mlsae.stages.cache import build_caches
    from mlsae.stages.train import training_source

    corpus = write_text_corpus(tmp_path / "corpus", n_docs=12)
    model = make_tiny_model()
    raw = {
        "base": {"corpus": f"text:{corpus}", "cache_dir": str(tmp_path / "cache")},
        "data": {"context_length": 16, "batch_contexts": 4, "train_tokens": 160, "test_tokens": 64},
        "train": {"batch_tokens": 16, "shuffle_tokens": 32},
        "lens": {"train": False},
        "sweep": {"r8-k32": {"expansion_factor": 2, "k": 4}},
    }
    metas = build_caches(config.from_dict(raw), model, tmp_path)
    assert sum(metas["train"]["tokens_per_label"].values()) == metas["train"]["n_tokens"]
    assert all(name.endswith(".txt") for name in metas["test"]["tokens_per_label"])
    raw["train"]["source"] = "stream"
    params = config.from_dict(raw)
    build_caches(params, model, tmp_path)
    manifest = json.loads((tmp_path / "cache/activations/train/meta.json").read_text())
    assert manifest["source"] == "stream"
    with pytest.raises(FileNotFoundError, match="train.source: stream"):
        ActivationCache(tmp_path / "cache/activations/train")
    assert not list((tmp_path / "cache/activations/train").glob("*.npy"))  # no stale shards
    raw["train"]["source"] = "cache"
    with pytest.raises(config.ConfigError, match="train.source is 'cache' but there is no"):
        training_source(config.from_dict(raw), tmp_path, model)
    # switching back builds a real cache over the manifest
    metas = build_caches(config.from_dict(raw), model, tmp_path)
    assert metas["train"]["n_tokens"] > 0 and training_source(config.from_dict(raw), tmp_path)


def test_epochs_repeat_the_source_in_a_new_order_and_resume_across_them(tmp_path):
    cache = make_cache(tmp_path / "c", n_tokens=1024, n_layers=2, d=4, shard=128)
    one = TrainingSource(CacheSource(cache), 0, seed=5)
    two = TrainingSource(CacheSource(cache), 0, seed=5, epochs=2)
    assert two.n_tokens == 2 * one.n_tokens == 2048
    first = torch.cat(list(one.batches(128)), dim=1)
    both = torch.cat(list(two.batches(128)), dim=1)
    assert torch.equal(both[:, :1024], first)  # epoch 0 in order
    assert not torch.equal(both[:, 1024:], first)  # epoch 1 reshuffled (its shards permuted)
    assert torch.equal(both[:, 1024:].sort(1).values, first.sort(1).values)  # same vectors
    tail = torch.cat(list(two.batches(128, start_batch=11)), dim=1)
    assert torch.equal(tail, both[:, 11 * 128 :])


def test_cache_batches_equal_the_unshuffled_training_stream(tmp_path):
    """`ActivationCache.iter_batches` (evaluation) and `shuffled_batches` with no shuffling
    (training) read the same tokens in the same batches, across shard boundaries."""
    cache = make_cache(tmp_path / "c", n_tokens=1000, n_layers=3, d=8, shard=256)
    for layers in (None, [2, 0]):
        ours = list(cache.iter_batches(100, layers=layers))
        ref = list(shuffled_batches(CacheSource(cache, layers).chunks(), 100, 0))
        n = sum(cache.shard(i).shape[1] for i in range(len(cache)))
        assert n % 100 and [b.shape[1] for b in ours] == [100] * (n // 100) + [n % 100]
        assert len(ours) == len(ref) and all(
            torch.equal(a, b) for a, b in zip(ours, ref, strict=True)
        )
