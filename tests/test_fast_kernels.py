"""The Triton kernels of `mlsae.fast.kernels`, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` is set before the kernel module is (re)imported, so ``@triton.jit`` gives
interpreted kernels that read CPU memory; they are checked against the CPU references of
`mlsae.fast.sparse_ops` and against dense float64 products written here. The interpreter is
exact in float32 (bf16 is checked on a GPU by ``benchmarks/gpu_step.py``).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from mlsae.fast import sparse_ops  # noqa: E402
from mlsae.fast import step as fast_step  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    """The kernel module, interpreted: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` first."""
    from triton.runtime.interpreter import InterpretedFunction

    from mlsae.fast import kernels

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert isinstance(kernels._segment_sum_kernel, InterpretedFunction)
    return kernels


def selection(vectors, k, n, seed, crowd=None):
    """Random picks (distinct per row), values with some zeros (the ReLU's), optional crowd.

    ``crowd`` latent is put in every row, so its run is longer than a kernel block.
    """
    g = torch.Generator().manual_seed(seed)
    others = (
        torch.arange(n)
        if crowd is None
        else torch.cat([torch.arange(crowd), torch.arange(crowd + 1, n)])
    )
    rows = [others[torch.randperm(len(others), generator=g)[:k]] for _ in range(vectors)]
    idx = torch.stack(rows)
    if crowd is not None:
        idx[:, 0] = crowd
    values = torch.randn(vectors, k, generator=g).relu()
    return idx, values


@pytest.mark.parametrize("d", [7, 128, 200])
def test_decode_kernel_equals_the_dense_product(kernels, d):
    vectors, k, n = 37, 5, 60
    idx, values = selection(vectors, k, n, seed=d)
    weight = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    dense = torch.zeros(vectors, n, dtype=torch.float64).scatter_(1, idx, values.double())
    want = dense @ weight.double()
    got = kernels.decode(idx, values, weight)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_ops.decode(idx, values, weight), got, rtol=1e-5, atol=1e-5)


def dense_segment_grads(index_sets, value_sets, grad, inputs, w_dec):
    """The four outputs as dense float64 products over one-hot selection matrices."""
    vectors, n = inputs.shape[0], w_dec.shape[0]
    g_dec = torch.zeros(n, w_dec.shape[1], dtype=torch.float64)
    g_enc, s = torch.zeros_like(g_dec), torch.zeros(n, dtype=torch.float64)
    gvs = []
    for i, (idx, val) in enumerate(zip(index_sets, value_sets, strict=True)):
        g = grad[i * vectors : (i + 1) * vectors].double()
        h = torch.zeros(vectors, n, dtype=torch.float64).scatter_(1, idx, val.double())
        picked = torch.zeros_like(h).scatter_(1, idx, 1.0)
        gv_dense = (g @ w_dec.double().T) * picked * (h > 0)  # (vectors, n)
        g_dec += h.T @ g
        g_enc += gv_dense.T @ inputs.double()
        s += gv_dense.sum(0)
        gvs.append(gv_dense.gather(1, idx).reshape(-1))
    return g_dec, g_enc, s, torch.cat(gvs)


@pytest.mark.parametrize("d,crowd", [(24, None), (200, 3)])
def test_segment_kernel_equals_dense_products(kernels, d, crowd):
    vectors, n = 45, 400  # with crowd, latent 3's run (45 + AuxK picks) spans two entry blocks
    idx, val = selection(vectors, 4, n, seed=1, crowd=crowd)
    idx_a, val_a = selection(vectors, 3, n, seed=2)
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(2 * vectors, d, generator=g)
    inputs, w_dec = torch.randn(vectors, d, generator=g), torch.randn(n, d, generator=g)
    entries = sparse_ops.sort_entries([idx, idx_a], n)
    assert (entries.offsets[1:] == entries.offsets[:-1]).any()  # some latents have no entry
    values = sparse_ops.sorted_values(entries, [val, val_a])
    args = (*entries[:4], values, grad, inputs, w_dec)
    want = dense_segment_grads([idx, idx_a], [val, val_a], grad, inputs, w_dec)
    got = kernels.segment_grads(*args)
    ref = sparse_ops.segment_grads(*args)
    for name, w, a, b in zip(("g_dec", "g_enc", "s", "gv"), want, got, ref, strict=True):
        if name == "gv":  # entries come back in sorted order
            w = w[entries.order]
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(b.double(), w, rtol=1e-5, atol=1e-4, msg=name)


def test_a_whole_micro_batch_through_the_kernels_has_the_dense_gradients(kernels, monkeypatch):
    from test_fast_step import batch, dense_reference_grads, fast_micro_batch, make_sae

    monkeypatch.setattr(fast_step.sparse_ops, "decode", kernels.decode)
    monkeypatch.setattr(fast_step.sparse_ops, "segment_grads", kernels.segment_grads)
    sae = make_sae(0.5)
    x = batch()
    out, state, idx_a = fast_micro_batch(sae, x)
    want = dense_reference_grads(sae, x, out.indices.reshape(-1, sae.k), idx_a)
    for ours, ref in zip((state.g_enc, state.g_dec, state.g_bias), want, strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)


def test_cpu_tensors_never_reach_a_triton_kernel(kernels, monkeypatch):
    # triton imports here, yet the ops dispatch CPU tensors to their torch references
    def refuse(*args):
        raise AssertionError("a Triton kernel was called on CPU tensors")

    monkeypatch.setattr(kernels, "decode", refuse)
    monkeypatch.setattr(kernels, "segment_grads", refuse)
    idx, val = selection(8, 3, 20, seed=0)
    w = torch.randn(20, 16)
    out = sparse_ops.decode(idx, val, w)
    entries = sparse_ops.sort_entries([idx], 20)
    sparse_ops.segment_grads(*entries[:4], val.reshape(-1)[entries.order], out, out, w)
