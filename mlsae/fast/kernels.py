"""Triton kernels behind `mlsae.fast.sparse_ops` on CUDA tensors.

Three kernels, each over the entries of a top-k selection (see `mlsae.fast.sparse_ops` for the
formulas):

* `decode`: each vector's weighted sum of its ``k`` decoder rows, one program per
  (vector, column block), the rows read once and accumulated in float32.
* the value gradients ``gv``: one dot product per entry, ``<G[r], W_dec[n]> * [v > 0]``, a
  block of entries per program (no load imbalance: every entry costs the same).
* `segment_grads`' sums: one program per (latent, column block) walks that latent's run of the
  sorted entries in blocks and accumulates ``sum v * G[r]`` (decoder gradient), ``sum gv * X[q]``
  (encoder gradient) and ``sum gv`` (for ``b_pre``) in registers, then writes each output row
  once: no atomics, since a latent's run belongs to exactly one program per column block.

Everything is accumulated in float32 whatever the inputs' dtype. The kernels read raw
pointers and so accept CPU tensors under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how `tests/test_fast_kernels.py` checks them without a GPU; the interpreter
is exact in float32, so bf16 inputs are checked on a GPU only (`benchmarks/gpu_step.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128
"""Columns per program in the decode and segment-sum kernels."""
BLOCK_E = 32
"""Entries per iteration of the segment-sum loop and per program of the dot kernel."""


@triton.jit
def _decode_kernel(idx_ptr, val_ptr, w_ptr, out_ptr, k, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, k):
        n = tl.load(idx_ptr + row * k + j)
        v = tl.load(val_ptr + row * k + j).to(tl.float32)
        w = tl.load(w_ptr + n * d + cols, mask=mask, other=0.0).to(tl.float32)
        acc += v * w
    tl.store(out_ptr + row * d + cols, acc, mask=mask)


def decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(vectors, d)`` float32: ``sum_j values[i, j] * weight[indices[i, j]]``."""
    vectors, k = indices.shape
    d = weight.shape[1]
    out = torch.empty(vectors, d, dtype=torch.float32, device=weight.device)
    if vectors == 0:
        return out
    grid = (vectors, triton.cdiv(d, BLOCK_D))
    _decode_kernel[grid](
        indices.contiguous(), values.contiguous(), weight.contiguous(), out, k, d, BLOCK=BLOCK_D
    )
    return out


@triton.jit
def _entry_dot_kernel(
    lat_ptr, row_ptr, val_ptr, g_ptr, w_ptr, gv_ptr, n_entries, d,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < n_entries
    n = tl.load(lat_ptr + e, mask=emask, other=0)
    r = tl.load(row_ptr + e, mask=emask, other=0)
    v = tl.load(val_ptr + e, mask=emask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for c in range(0, d, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        m = emask[:, None] & (cols < d)[None, :]
        g = tl.load(g_ptr + r[:, None] * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * w, axis=1)
    tl.store(gv_ptr + e, tl.where(v > 0, acc, 0.0), mask=emask)


@triton.jit
def _segment_sum_kernel(
    off_ptr, grow_ptr, irow_ptr, val_ptr, gv_ptr, g_ptr, x_ptr,
    gdec_ptr, genc_ptr, s_ptr, d,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    start = tl.load(off_ptr + n)
    end = tl.load(off_ptr + n + 1)
    acc_dec = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_enc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_E], dtype=tl.float32)
    for p in range(start, end, BLOCK_E):
        e = p + tl.arange(0, BLOCK_E)
        emask = e < end
        r = tl.load(grow_ptr + e, mask=emask, other=0)
        q = tl.load(irow_ptr + e, mask=emask, other=0)
        v = tl.load(val_ptr + e, mask=emask, other=0.0).to(tl.float32)
        gv = tl.load(gv_ptr + e, mask=emask, other=0.0)
        m = emask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + r[:, None] * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + q[:, None] * d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc_dec += tl.sum(v[:, None] * g, axis=0)
        acc_enc += tl.sum(gv[:, None] * x, axis=0)
        acc_s += gv
    tl.store(gdec_ptr + n * d + cols, acc_dec, mask=cmask)
    tl.store(genc_ptr + n * d + cols, acc_enc, mask=cmask)
    if cb == 0:
        tl.store(s_ptr + n, tl.sum(acc_s, axis=0))


def segment_grads(latent, offsets, grad_row, input_row, values, grad, inputs, w_dec):
    """`mlsae.fast.sparse_ops.segment_grads` in two kernels: the entry dots, then the sums."""
    n, d = w_dec.shape
    entries = latent.shape[0]
    f32 = dict(dtype=torch.float32, device=w_dec.device)
    g_dec, g_enc = torch.empty(n, d, **f32), torch.empty(n, d, **f32)
    s, gv = torch.empty(n, **f32), torch.empty(entries, **f32)
    latent, grad_row, input_row = latent.contiguous(), grad_row.contiguous(), input_row.contiguous()
    values, grad, inputs = values.contiguous(), grad.contiguous(), inputs.contiguous()
    w_dec = w_dec.contiguous()
    if entries:
        _entry_dot_kernel[(triton.cdiv(entries, BLOCK_E),)](
            latent, grad_row, values, grad, w_dec, gv, entries, d,
            BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D,
        )  # fmt: skip
    _segment_sum_kernel[(n, triton.cdiv(d, BLOCK_D))](
        offsets.contiguous(), grad_row, input_row, values, gv, grad, inputs,
        g_dec, g_enc, s, d,
        BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return g_dec, g_enc, s, gv
