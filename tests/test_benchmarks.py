"""The CPU benchmark's peers run as they would on a new user's CPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, torch
sys.path.insert(0, "benchmarks")
import train_throughput as tt
x = torch.randn(64, 16)
trainer = tt.Sparsify(16, 64, 4, 1e-4, 0, x, "cpu")
trainer.step(x)
import sparsify.utils
print(os.environ.get("SPARSIFY_DISABLE_TRITON"), sparsify.utils.decoder_impl.__name__)
"""


def test_sparsify_on_cpu_uses_its_eager_decoder():
    """sparsify takes its Triton decoder whenever triton imports (it comes with PyPI's CUDA build
    of torch, on a machine without a GPU too) and then fails on CPU tensors; the benchmark's CPU
    peer must choose the eager one before sparsify is imported (a fresh interpreter here)."""
    pytest.importorskip("sparsify")
    env = {k: v for k, v in os.environ.items() if k != "SPARSIFY_DISABLE_TRITON"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        check=True, timeout=300,
    )  # fmt: skip
    assert out.stdout.split()[-2:] == ["1", "eager_decode"]


def test_the_gpu_benchmark_runs_every_section_at_toy_sizes(tmp_path):
    """benchmarks/gpu_step.py is ready before a GPU is lent: --quick runs all of its sections on
    the CPU (the ops take their torch references there) and writes the JSON it will write there."""
    out = tmp_path / "gpu_step.json"
    subprocess.run(
        [sys.executable, "benchmarks/gpu_step.py", "--quick", "--device", "cpu", "--out", out],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    sections = ("card", "kernels", "sae_step", "profile", "forward", "whole_step", "learning")
    errors = {s: report[s].get("error") for s in sections if isinstance(report[s], dict)}
    assert not any(errors.values()), errors
    assert report["kernels"]["fp32"]["g_enc"] < 1e-5
    steps = {(r["step"], r["precision"], r["auxk"]) for r in report["sae_step"]}
    assert ("new", "bf16", "half dead") in steps and ("old", "fp32", "off") in steps
    assert all(r["vectors_per_s"] > 0 for r in report["sae_step"])
    assert report["profile"]["new"] and report["whole_step"]["tokens_per_s"] > 0
    assert report["forward"]["parity_rel_err"] < 2e-2  # SDPA bf16 against TransformerLens
    assert 0.8 < report["learning"]["new_over_old"] < 1.25
