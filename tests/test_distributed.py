"""Two CPU processes under torchrun (gloo) train as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_cache, write_train_params

from mlsae.train import load_checkpoint, read_log


def write_params(path: Path, cache_root: Path, grad_accum: int) -> Path:
    return write_train_params(
        path,
        cache_root,
        "r4-k4",
        4,
        4,
        tokens=1024,
        lr=3e-3,
        batch_tokens=64,
        dead_tokens=128,
        checkpoint_tokens=512,
        grad_accum=grad_accum,
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, cwd, extra_env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path):
    root = tmp_path / "cache"
    make_cache(root / "activations" / "train", n_tokens=2048, n_layers=3, d=16)
    one = write_params(tmp_path / "one.yaml", root, grad_accum=2)
    two = write_params(tmp_path / "two.yaml", root, grad_accum=1)
    base = [sys.executable, "-m", "mlsae", "train", "r4-k4", "--no-progress"]
    run([*base, "--params", str(one), "--run-dir", str(tmp_path / "single")], tmp_path)
    run(
        [
            *TORCHRUN,
            "-m",
            "mlsae",
            "train",
            "r4-k4",
            "--no-progress",
            "--params",
            str(two),
            "--run-dir",
            str(tmp_path / "ddp"),
        ],
        tmp_path,
    )
    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert a["tokens_seen"] == b["tokens_seen"] == 1024 and a["step"] == b["step"] == 8
    for name, value in a["sae"].items():
        torch.testing.assert_close(b["sae"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    # the dead-latent counters were reduced across ranks, not kept per rank
    assert torch.equal(a["sae"]["tokens_since_fired"], b["sae"]["tokens_since_fired"])
    # so were the logged metrics: each row is the mean over the step's batches on both ranks
    rows_a, rows_b = (read_log(tmp_path / d) for d in ("single", "ddp"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] and rows_a
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["fvu"] == pytest.approx(ra["fvu"], rel=1e-5)
        assert rb["auxk"] == pytest.approx(ra["auxk"], rel=1e-5, abs=1e-9)


class Interleaved:
    """One process reading the ranks' parts of a source in turn, as a DDP step sees them."""

    def __init__(self, source, world_size: int):
        self.source, self.world = source, world_size
        self.n_layers, self.d_model, self.n_tokens = source.n_layers, source.d_model, None

    def batches(self, batch_tokens, start_batch=0, rank=0, world_size=1):
        assert rank == 0 and world_size == 1 and start_batch % self.world == 0
        parts = [
            self.source.batches(batch_tokens, start_batch // self.world, r, self.world)
            for r in range(self.world)
        ]
        for group in zip(*parts, strict=False):  # the ranks' parts may differ in length
            yield from group


def test_two_gloo_processes_on_the_stream_match_one_process_reading_both_parts(
    tmp_path, tiny_pythia
):
    from conftest import write_stream_params, write_text_corpus

    from mlsae import config
    from mlsae.stages.train import train_config, training_source
    from mlsae.train import train

    _, env = tiny_pythia
    corpus = write_text_corpus(tmp_path / "corpus", n_docs=60)
    kw = {"lr": 3e-3, "batch_tokens": 32, "dead_tokens": 128, "shuffle_tokens": 96}
    one = write_stream_params(
        tmp_path / "one.yaml", tmp_path, corpus, "r4-k4", 1024, grad_accum=2, **kw
    )
    two = write_stream_params(
        tmp_path / "two.yaml", tmp_path, corpus, "r4-k4", 1024, grad_accum=1, **kw
    )
    params = config.load(one)
    source = Interleaved(training_source(params, tmp_path), 2)
    train(train_config(params, "r4-k4"), source, tmp_path / "single", progress=False)
    cmd = [*TORCHRUN, "-m", "mlsae", "train", "r4-k4", "--no-progress", "--params", str(two)]
    run([*cmd, "--run-dir", str(tmp_path / "ddp")], tmp_path, env)
    a = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert a["tokens_seen"] == b["tokens_seen"] == 1024 and a["step"] == b["step"] == 16
    for name, value in a["sae"].items():
        torch.testing.assert_close(b["sae"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    rows_a, rows_b = (read_log(tmp_path / d) for d in ("single", "ddp"))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert rb["fvu"] == pytest.approx(ra["fvu"], rel=1e-5)


def test_two_ranks_stop_together_when_the_stream_ends_before_the_budget(tmp_path, tiny_pythia):
    """The ranks' parts of a short stream differ in length; both stop at the same step."""
    from conftest import write_stream_params, write_text_corpus

    _, env = tiny_pythia
    corpus = write_text_corpus(tmp_path / "corpus", n_docs=12)
    kw = {"batch_tokens": 32, "dead_tokens": 128, "shuffle_tokens": 96, "grad_accum": 1}
    params = write_stream_params(tmp_path / "p.yaml", tmp_path, corpus, "r4-k4", 100_000, **kw)
    cmd = [*TORCHRUN, "-m", "mlsae", "train", "r4-k4", "--no-progress", "--params", str(params)]
    run([*cmd, "--run-dir", str(tmp_path / "ddp")], tmp_path, env, timeout=180)  # or it hangs
    state = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert 0 < state["tokens_seen"] < 100_000 and state["tokens_seen"] % 64 == 0
