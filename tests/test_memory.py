"""Streaming stays in bounded memory: a pass over a cache much larger than the allowed growth."""

import json
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import resource, sys, torch
torch.set_num_threads(1)
from mlsae.activations import ActivationCache
from mlsae.latents import LayerStats
from mlsae.sae import MLSAE
cache = ActivationCache(sys.argv[1])
sae = MLSAE(cache.d_model, 512, 8).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = LayerStats(cache.n_layers, 512)
seen = 0
with torch.no_grad():
    for x in cache.iter_batches(512):
        stats.update(*sae.encode(x))
        seen += x.shape[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seen, before, after)
"""


def test_streaming_over_a_large_cache_keeps_memory_bounded(tmp_path):
    n_layers, d, shard, n_shards = 4, 256, 4096, 40  # 40 x 8 MB = 320 MB of float16 on disk
    path = tmp_path / "cache"
    path.mkdir()
    rng = np.random.default_rng(0)
    block = rng.standard_normal((n_layers, shard, d)).astype(np.float16)
    names = []
    for i in range(n_shards):
        np.save(path / f"s{i}.npy", block)
        np.save(path / f"s{i}.tokens.npy", np.zeros(shard, dtype=np.int32))
        names.append(f"s{i}")
    meta = {"shards": names, "n_layers": n_layers, "d_model": d, "n_tokens": shard * n_shards}
    (path / "meta.json").write_text(json.dumps(meta))
    on_disk = sum(p.stat().st_size for p in path.glob("*.npy"))
    assert on_disk > 300e6
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    seen, before_kb, after_kb = map(int, out.stdout.split())
    assert seen == shard * n_shards
    growth = (after_kb - before_kb) * 1024
    # the whole cache would be 320 MB (640 MB as float32); growth stays a few shards' worth
    assert growth < 120e6, f"peak RSS grew by {growth / 1e6:.0f} MB"


SPLIT_SCRIPT = r"""
import resource
from mlsae.data import HashSplit

class Corpus:  # 400k documents of ~1 KB made on the fly: 400 MB of text that never exists at once
    def __iter__(self):
        return (f"{i} " + "lorem ipsum dolor sit amet " * 38 for i in range(400_000))

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n_test = n_chars = 0
for part in ("train", "test"):
    for doc in HashSplit(Corpus(), 0.01, 0, part):
        n_chars += len(doc)
        n_test += part == "test"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n_test, n_chars, before, after)
"""


def test_splitting_a_streamed_corpus_keeps_memory_bounded():
    out = subprocess.run(
        [sys.executable, "-c", SPLIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    n_test, n_chars, before_kb, after_kb = map(int, out.stdout.split())
    assert n_chars > 400e6 and 3000 < n_test < 5000  # the whole corpus, ~1% of it held out
    assert (after_kb - before_kb) * 1024 < 20e6, f"peak RSS grew by {after_kb - before_kb} kB"


STREAM_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import numpy as np
from conftest import WORDS, make_tiny_model
from mlsae.sources import ModelStream, TrainingSource
from mlsae.train import TrainConfig, train

model = make_tiny_model(n_layers=4, d_model=256)
rng = np.random.default_rng(0)
docs = [" ".join(rng.choice(WORDS, 100)) for _ in range(2600)]  # ~260k tokens
stream = ModelStream(model, docs, 64, 8)
source = TrainingSource(stream, shuffle_tokens=int(sys.argv[2]))
cfg = TrainConfig.of(
    expansion_factor=2, k=8, batch_tokens=256, max_tokens=200_000, dead_tokens=4096
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train(cfg, source, sys.argv[3], progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(torch.load(sys.argv[3] + "/checkpoint.pt", weights_only=False)["tokens_seen"], before, after)
"""


def test_a_streaming_run_stays_within_its_shuffle_buffer(tmp_path):
    """Training on 200k streamed tokens holds one shuffle block, not the stream.

    The stream's residuals are 200k tokens x 4 layers x 256 dims x 2 bytes = 410 MB; the shuffle
    block is 4,096 tokens (8.4 MB), one chunk 512 tokens (1 MB). The ceiling, 60 MB of peak-RSS
    growth, leaves room for the SAE, Adam and allocator slack but not for the stream.
    """
    from pathlib import Path

    tests = str(Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT, tests, "4096", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen, before_kb, after_kb = map(int, out.stdout.split())
    assert seen == 199_936  # the whole 256-token steps within the budget
    growth = (after_kb - before_kb) * 1024
    print(f"peak RSS growth {growth / 1e6:.1f} MB")
    assert growth < 60e6, f"peak RSS grew by {growth / 1e6:.0f} MB"
