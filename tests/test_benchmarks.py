"""The CPU benchmark's peers run as they would on a new user's CPU machine."""

from __future__ import annotations

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
