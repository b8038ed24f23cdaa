r"""An MLSAE optimizer step with explicit gradients, no host synchronisation and no fp32 copies.

`SyncFreeStep` trains the same `mlsae.sae.MLSAE` as `mlsae.train.train` (same loss, eqs. 1-7,
same AuxK, same Adam update, decoder constraint and dead-latent rule), computed differently:

* **Gradients by hand.** The loss is ``FVU + alpha * AuxK`` of sparse decodes, so its gradient is
  closed-form: with ``G = dL/d(W_dec h + b_pre)`` (the FVU's ``2 (x_hat - x) / total_l`` per
  layer, times ``sigma_x``) every weight gradient is a sum over the selected entries,
  computed by `mlsae.fast.sparse_ops.segment_grads` from one sort of the main and AuxK indices
  together. ``b_pre``'s gradient is ``sum_i G_i - s @ W_enc`` (``s``: each latent's summed value
  gradient), never the ``(vectors, d)`` input gradient. No autograd graph is kept.
* **Selection in the matmul's dtype.** In bf16 the top-k runs on the bf16 pre-activations
  (no float32 ``(vectors, n)`` copy), with the encoder's bf16 copy made once per step; AuxK
  masks those pre-activations in place, or gathers the dead columns first when few latents are
  dead (`GATHER_DEAD_BELOW`). In float32 an optional TF32 matmul is used on CUDA only.
* **One host read per step.** Whether ``b_pre`` is initialised is a Python flag; the dead mask
  and its count are computed once per step; non-finite inputs and losses set a device flag.
  At the end of the step, before Adam, one ``.item()`` reads the flag together with the next
  step's dead count: a non-finite step raises there, with the weights untouched.
  `tests/test_fast_step.py` counts the host reads of a whole step with a ``TorchDispatchMode``.

The values the SAE outputs are the reference's: ``GatherDot`` returns the selection's values
too, so in bf16 both carry the bf16 rounding and the gradients are exact (float32) in both.
Single process only (the DDP path stays in `mlsae.train`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch

from mlsae.fast import sparse_ops
from mlsae.sae import MLSAE
from mlsae.sparse import topk_rows

GATHER_DEAD_BELOW = 0.25
"""AuxK gathers the dead columns when fewer than this fraction of latents is dead."""


class StepResult(NamedTuple):
    """Means over a step's micro-batches, as device tensors (read them when logging)."""

    fvu: torch.Tensor
    auxk: torch.Tensor


class MicroBatch(NamedTuple):
    """One micro-batch's forward outputs (its gradients go into the step's accumulators)."""

    values: torch.Tensor
    indices: torch.Tensor
    fvu: torch.Tensor
    auxk: torch.Tensor


class NonFiniteStep(RuntimeError):
    """A step met NaN or inf in its inputs or its loss; the weights were not updated."""


def fvu_and_grad(x3: torch.Tensor, y3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mlsae.sae.fvu` of ``(layer, token, d)`` tensors and its gradient with respect to ``y3``.

    The gradient needs the per-layer totals the value divides by, so both come from one pass.
    """
    total = (x3 - x3.mean(dim=1, keepdim=True)).pow(2).sum((1, 2))
    total = total.clamp_min(torch.finfo(x3.dtype).tiny)
    diff = y3 - x3
    fvu = (diff.pow(2).sum((1, 2)) / total).mean()
    return fvu, diff * (2 / (x3.shape[0] * total))[:, None, None]


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 inside the block when ``enabled``; the setting is restored."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    if enabled:
        matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def autograd_step(sae: MLSAE, optimizer, batches, lr: float | None = None) -> None:
    """One optimizer step as `mlsae.train.train` takes it (single process), for comparisons.

    Autograd through `MLSAE.forward` on each micro-batch (loss divided by their number), the
    parallel-gradient removal, the optimizer, the decoder renormalisation and the dead counters
    advanced by the step's tokens: the reference `SyncFreeStep` is tested and timed against.
    """
    optimizer.zero_grad(set_to_none=True)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=sae.W_enc.device)
    for x in batches:
        out = sae(x)
        (out.loss / len(batches)).backward()
        fired |= sae.fired_mask(out.indices, out.values)
    sae.remove_parallel_grad_()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()
    sae.normalize_decoder_()
    sae.advance_dead_(fired, sum(x.shape[-2] for x in batches))


class SyncFreeStep:
    """Optimizer steps of ``sae`` with ``optimizer`` (Adam on ``sae.parameters()``).

    Args:
        sae: the SAE (its ``select_bf16`` chooses the selection dtype).
        optimizer: the optimizer of its parameters (`mlsae.train.adam`).
        tf32: allow TF32 for the float32 selection matmul (CUDA only; ignored elsewhere).
    """

    def __init__(self, sae: MLSAE, optimizer: torch.optim.Optimizer, tf32: bool = False):
        self.sae, self.optimizer = sae, optimizer
        self.tf32 = tf32 and sae.W_enc.device.type == "cuda"
        self.b_pre_initialized = bool(sae.b_pre_initialized)  # read once, kept in Python
        self.n_dead = int(sae.dead_mask().sum())  # updated by each step's one host read

    # -- one micro-batch ------------------------------------------------------------------------
    def _select(self, x_c: torch.Tensor, w_sel: torch.Tensor) -> torch.Tensor:
        """``(vectors, n)`` selection pre-activations in ``w_sel``'s dtype (bf16 or float32)."""
        with tf32_matmuls(self.tf32 and w_sel.dtype == torch.float32):
            return x_c.to(w_sel.dtype) @ w_sel.T

    @staticmethod
    def _topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_rows(pre, k) if pre.device.type == "cpu" else pre.topk(k, sorted=False)

    def _aux_select(self, pre: torch.Tensor, dead: _DeadSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``min(k_aux, n_dead)`` pre-activations among the dead latents."""
        k_aux = min(self.sae.k_aux, dead.count)
        if dead.columns is not None:  # few dead: select among their columns only
            top, pos = pre.index_select(1, dead.columns).topk(k_aux, sorted=False)
            return top, dead.columns[pos]
        pre.masked_fill_(~dead.mask, float("-inf"))  # pre is not needed after the main top-k
        return pre.topk(k_aux, sorted=False)

    def micro_batch(
        self, x: torch.Tensor, scale: float, w_sel: torch.Tensor, dead: _DeadSet, state: _State
    ) -> MicroBatch:
        """Forward one ``(layer, token, d)`` or ``(token, d)`` batch; add ``scale`` * gradients."""
        sae = self.sae
        x = x.float()
        state.nonfinite |= ~torch.isfinite(x).all()
        x3 = x.reshape(-1, *x.shape[-2:])  # (layer, token, d)
        x_std, mu, std = sae.preprocess(x3)
        if not self.b_pre_initialized:
            sae.init_b_pre_(x_std)
            self.b_pre_initialized = True
        b_pre, w_dec = sae.b_pre.detach(), sae.W_dec.detach()
        x_c = (x_std - b_pre).reshape(-1, sae.d_model)  # (vectors, d)
        vectors = x_c.shape[0]

        pre = self._select(x_c, w_sel)
        top, idx = self._topk(pre, sae.k)
        values = top.float().relu()
        recons_std = sparse_ops.decode(idx, values, w_dec) + b_pre
        recons = recons_std.reshape(x3.shape) * std + mu
        fvu, grad_recons = fvu_and_grad(x3, recons)
        grads = [(grad_recons * std).reshape(vectors, -1) * scale]
        index_sets, value_sets = [idx], [values]

        auxk = fvu.new_zeros(())
        if dead.count:
            top_a, idx_a = self._aux_select(pre, dead)
            values_a = top_a.float().relu()
            error = x_std - recons_std.reshape(x3.shape)  # the target: no gradient through it
            e_hat = sparse_ops.decode(idx_a, values_a, w_dec).reshape(x3.shape)
            auxk, grad_e_hat = fvu_and_grad(error, e_hat)
            grads.append(grad_e_hat.reshape(vectors, -1) * (sae.aux_coef * scale))
            index_sets.append(idx_a)
            value_sets.append(values_a)
        del pre
        state.nonfinite |= ~torch.isfinite(fvu) | ~torch.isfinite(auxk)

        entries = sparse_ops.sort_entries(index_sets, sae.n_latents)
        grad = torch.cat(grads)
        g_dec, g_enc, s, _ = sparse_ops.segment_grads(
            *entries[:4], sparse_ops.sorted_values(entries, value_sets), grad, x_c, w_dec
        )
        state.g_dec += g_dec
        state.g_enc += g_enc
        state.g_bias += grad[:vectors].sum(0) - s @ sae.W_enc.detach()
        state.fired.index_add_(0, idx.reshape(-1), (values.reshape(-1) > 0).to(torch.int32))
        shape = (*x.shape[:-1], sae.k)
        return MicroBatch(values.reshape(shape), idx.reshape(shape), fvu, auxk)

    # -- one optimizer step -----------------------------------------------------------------------
    def step(self, batches, lr: float | None = None) -> StepResult:
        """One optimizer step over the micro-batches ``batches`` (an iterable of ``x``).

        Every micro-batch's loss is divided by their number, as `mlsae.train.train` does with
        ``grad_accum``; ``lr`` (when given) is set on every parameter group first. The dead
        counters advance by the step's tokens (``x.shape[-2]`` per micro-batch).
        """
        sae, batches = self.sae, list(batches)
        scale = 1 / len(batches)
        state = _State.zeros(sae)
        dead = _DeadSet.of(sae, self.n_dead)
        w_sel = sae.W_enc.detach()
        w_sel = w_sel.bfloat16() if sae.select_bf16 else w_sel
        losses = torch.zeros(2, device=sae.W_enc.device)
        tokens = 0
        for x in batches:
            out = self.micro_batch(x, scale, w_sel, dead, state)
            losses += torch.stack([out.fvu, out.auxk])
            tokens += x.shape[-2]
        counters = (sae.tokens_since_fired + tokens).masked_fill_(state.fired > 0, 0)
        n_dead_next = (counters >= sae.dead_tokens).sum()
        flag = int((n_dead_next * 2 + state.nonfinite.long()).item())  # the step's one host read
        if flag & 1:
            raise NonFiniteStep("NaN/inf in this step's activations or loss; weights unchanged.")
        sae.W_enc.grad, sae.W_dec.grad, sae.b_pre.grad = state.g_enc, state.g_dec, state.g_bias
        sae.remove_parallel_grad_()
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        sae.normalize_decoder_()
        sae.tokens_since_fired.copy_(counters)
        self.n_dead = flag >> 1
        return StepResult(losses[0] * scale, losses[1] * scale)


class _State:
    """A step's accumulators: gradients, latents fired, the non-finite flag."""

    def __init__(self, g_enc, g_dec, g_bias, fired, nonfinite):
        self.g_enc, self.g_dec, self.g_bias = g_enc, g_dec, g_bias
        self.fired, self.nonfinite = fired, nonfinite

    @classmethod
    def zeros(cls, sae: MLSAE) -> _State:
        dev = sae.W_enc.device
        return cls(
            torch.zeros_like(sae.W_enc, dtype=torch.float32),
            torch.zeros_like(sae.W_dec, dtype=torch.float32),
            torch.zeros_like(sae.b_pre, dtype=torch.float32),
            torch.zeros(sae.n_latents, dtype=torch.int32, device=dev),
            torch.zeros((), dtype=torch.bool, device=dev),
        )


class _DeadSet(NamedTuple):
    """The dead latents of a step: mask, count (known on the host), and columns when few."""

    mask: torch.Tensor
    count: int
    columns: torch.Tensor | None

    @classmethod
    def of(cls, sae: MLSAE, count: int) -> _DeadSet:
        mask = sae.dead_mask()
        columns = None
        if 0 < count < GATHER_DEAD_BELOW * sae.n_latents:
            # the count is known, so the dead columns come without a data-dependent shape
            columns = torch.argsort(mask.to(torch.int8), descending=True, stable=True)[:count]
        return cls(mask, count, columns)
