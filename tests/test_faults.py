"""Kill-and-resume, corrupt checkpoints and NaNs: nobody loses a run to a crash."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import make_cache, write_stream_params, write_text_corpus, write_train_params

from mlsae.train import load_checkpoint


def write_params(path, cache_root, tokens):
    return write_train_params(
        path,
        cache_root,
        "r8-k8",
        8,
        8,
        tokens=tokens,
        lr=1e-3,
        batch_tokens=32,
        dead_tokens=256,
        checkpoint_tokens=128,
    )


def command(params, run_dir):
    return [
        sys.executable,
        "-m",
        "mlsae",
        "train",
        "r8-k8",
        "--params",
        str(params),
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("source", ["cache", "stream"])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, source, request):
    """Killed at a random point and resumed, a run ends where an uninterrupted one does.

    The stream (the tiny Pythia run on a text corpus, shuffle blocks of 256 tokens) is
    regenerated at the checkpoint's position, block permutation included.
    """
    root = tmp_path / "cache"
    env = ENV
    if source == "cache":
        make_cache(root / "activations" / "train", n_tokens=16384, n_layers=3, d=64, shard=512)
        params = write_params(tmp_path / "p.yaml", root, tokens=16384)
    else:
        _, hub_env = request.getfixturevalue("tiny_pythia")
        env = {**ENV, **hub_env}
        corpus = write_text_corpus(tmp_path / "corpus", n_docs=400)
        params = write_stream_params(
            tmp_path / "p.yaml",
            root,
            corpus,
            "r8-k8",
            16384,
            lr=1e-3,
            batch_tokens=32,
            dead_tokens=256,
            checkpoint_tokens=128,
            shuffle_tokens=256,
        )
    subprocess.run(
        command(params, tmp_path / "full"), env=env, check=True, timeout=600, capture_output=True
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(params, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial = load_checkpoint(killed / "checkpoint.pt")
    assert 0 < partial["tokens_seen"] < 16384, "the run was not killed mid-way"
    subprocess.run(command(params, killed), env=env, check=True, timeout=600, capture_output=True)
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    resumed = load_checkpoint(killed / "checkpoint.pt")
    assert resumed["tokens_seen"] == full["tokens_seen"] == 16384
    for name, value in full["sae"].items():
        torch.testing.assert_close(resumed["sae"][name], value, rtol=1e-6, atol=1e-6, msg=name)
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (killed / "log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps))  # no duplicate log rows after the resume


def test_corrupt_checkpoint_gives_a_clear_error_and_is_kept(tmp_path):
    root = tmp_path / "cache"
    make_cache(root / "activations" / "train", n_tokens=1024, n_layers=2, d=16)
    params = write_params(tmp_path / "p.yaml", root, tokens=1024)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage")
    out = subprocess.run(
        command(params, run_dir), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode != 0
    assert "corrupt or unreadable" in out.stderr and "checkpoint.pt" in out.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == b"\x00garbage"


def test_nan_activations_stop_naming_the_step(tmp_path):
    root = tmp_path / "cache"
    make_cache(root / "activations" / "train", n_tokens=2048, n_layers=2, d=16, shard=256, nan_at=3)
    params = write_params(tmp_path / "p.yaml", root, tokens=2048)
    out = subprocess.run(
        command(params, tmp_path / "run"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode != 0
    assert "NaN/inf in activations at step 24 (tokens 768)" in out.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["tokens_seen"] == 768


@pytest.mark.parametrize("bad", ["k", "key"])
def test_bad_params_fail_before_any_compute(tmp_path, bad):
    root = tmp_path / "cache"
    params = write_params(tmp_path / "p.yaml", root, tokens=1024)
    raw = yaml.safe_load(params.read_text())
    if bad == "k":
        raw["sweep"]["r8-k8"]["k"] = 0
    else:
        raw["train"]["batch_token"] = 1
    params.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        command(params, tmp_path / "run"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode != 0
    assert (
        "sweep.r8-k8.k must be positive" if bad == "k" else "Did you mean 'train.batch_tokens'"
    ) in out.stderr
    assert not (tmp_path / "run").exists()
