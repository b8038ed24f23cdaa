"""The sync-free SAE step (`mlsae.fast.step`) against a dense float64 loss and the reference step.

Three independent checks: (1) its hand-written gradients equal autograd's on a dense float64
implementation of eqs. 1-7 written here (dense latent vectors, no sparse code); (2) whole
optimizer steps equal `mlsae.sae.MLSAE`'s autograd forward/backward with the same Adam,
decoder constraint and dead-latent rule as `mlsae.train.train`; (3) a ``TorchDispatchMode``
counts the host reads (``item``, ``_local_scalar_dense``, ``nonzero``) of a whole step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlsae.fast.step import NonFiniteStep, SyncFreeStep, _DeadSet, _State, autograd_step
from mlsae.sae import MLSAE, standardize
from mlsae.train import adam

D, N, K, K_AUX, LAYERS, TOKENS = 24, 96, 4, 8, 3, 40


def make_sae(dead_fraction: float = 0.0, select_bf16: bool = False, seed: int = 0) -> MLSAE:
    torch.manual_seed(seed)
    sae = MLSAE(D, N, K, k_aux=K_AUX, dead_tokens=1000, select_bf16=select_bf16)
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.3)
        sae.W_enc.add_(0.3 * torch.randn(N, D))  # encoder no longer the decoder's transpose
    sae.b_pre_initialized.fill_(True)
    n_dead = int(dead_fraction * N)
    sae.tokens_since_fired[torch.randperm(N)[:n_dead]] = 5000
    return sae.train()


def batch(seed: int = 1, layers: int = LAYERS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, layers)[:, None, None]  # layers of different variance
    return torch.randn(layers, TOKENS, D, generator=g) * scale + 0.2


def dense_reference_grads(sae: MLSAE, x: torch.Tensor, idx: torch.Tensor, idx_a):
    """Autograd gradients of FVU + alpha AuxK in float64 with dense latents at the given picks."""
    w_enc = sae.W_enc.detach().double().requires_grad_()
    w_dec = sae.W_dec.detach().double().requires_grad_()
    b = sae.b_pre.detach().double().requires_grad_()
    x = x.double()
    x_std, mu, std = standardize(x)
    x_c = (x_std - b).reshape(-1, D)
    pre = x_c @ w_enc.T

    def picked(indices):
        mask = torch.zeros_like(pre).scatter_(1, indices, 1.0)
        return (pre * mask).relu()

    def fvu(target, approx):  # per layer, then the mean over layers
        per_layer = []
        for t, a in zip(target, approx, strict=True):
            per_layer.append(((t - a) ** 2).sum() / ((t - t.mean(0)) ** 2).sum())
        return torch.stack(per_layer).mean()

    recons_std = (picked(idx) @ w_dec + b).reshape(x.shape)
    loss = fvu(x, recons_std * std + mu)
    if idx_a is not None:
        error = (x_std - recons_std).detach()
        loss = loss + sae.aux_coef * fvu(error, (picked(idx_a) @ w_dec).reshape(x.shape))
    loss.backward()
    return w_enc.grad, w_dec.grad, b.grad


def fast_micro_batch(sae: MLSAE, x: torch.Tensor, scale: float = 1.0):
    step = SyncFreeStep(sae, adam(sae.parameters(), 1e-3, 1e-8))
    state = _State.zeros(sae)
    dead = _DeadSet.of(sae, step.n_dead)
    w_sel = sae.W_enc.detach().bfloat16() if sae.select_bf16 else sae.W_enc.detach()
    captured = {}
    original = step._aux_select
    step._aux_select = lambda pre, dead_set: _remember(captured, original(pre, dead_set))
    out = step.micro_batch(x, scale, w_sel, dead, state)
    return out, state, captured.get("idx_a")


def _remember(captured, result):
    captured["idx_a"] = result[1]
    return result


@pytest.mark.parametrize("dead_fraction", [0.0, 0.1, 0.5])
def test_gradients_equal_dense_float64_autograd(dead_fraction):
    # 0.1 dead takes the gathered-columns AuxK path, 0.5 the masked one; 0 has no AuxK term
    sae = make_sae(dead_fraction)
    x = batch()
    out, state, idx_a = fast_micro_batch(sae, x)
    flat_idx = out.indices.reshape(-1, K)
    assert (idx_a is not None) == (dead_fraction > 0)
    g_enc, g_dec, g_b = dense_reference_grads(sae, x, flat_idx, idx_a)
    for ours, ref in ((state.g_enc, g_enc), (state.g_dec, g_dec), (state.g_bias, g_b)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-6)
    assert state.g_enc.abs().sum() > 0 and state.g_dec.abs().sum() > 0


@pytest.mark.parametrize("dead_fraction", [0.1, 0.5])
def test_auxk_picks_the_top_dead_pre_activations(dead_fraction):
    sae = make_sae(dead_fraction)
    x = batch()
    _, _, idx_a = fast_micro_batch(sae, x)
    x_std, _, _ = standardize(x)
    pre = ((x_std - sae.b_pre).reshape(-1, D) @ sae.W_enc.T).detach()
    dead = sae.dead_mask()
    k_aux = min(K_AUX, int(dead.sum()))
    want = pre.masked_fill(~dead, float("-inf")).topk(k_aux).indices
    assert idx_a.shape == want.shape
    assert torch.equal(idx_a.sort(1).values, want.sort(1).values)
    assert dead[idx_a].all()


@pytest.mark.parametrize("dead_fraction", [0.0, 0.1, 0.5])
def test_whole_steps_follow_the_reference_trainer(dead_fraction):
    ref = make_sae(dead_fraction)
    fast = copy.deepcopy(ref)
    ref_opt, fast_opt = adam(ref.parameters(), 1e-3, 1e-8), adam(fast.parameters(), 1e-3, 1e-8)
    stepper = SyncFreeStep(fast, fast_opt)
    for s in range(3):
        batches = [batch(10 * s + 1), batch(10 * s + 2)]
        n_dead = int(ref.dead_mask().sum())  # latents revive as they fire
        assert s > 0 or n_dead == int(dead_fraction * N)
        autograd_step(ref, ref_opt, batches, lr=1e-3)
        result = stepper.step(batches, lr=1e-3)
        assert torch.isfinite(result.fvu) and result.fvu > 0
        assert (result.auxk > 0) == (n_dead > 0)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(
                dict(fast.named_parameters())[name], p, rtol=1e-4, atol=1e-6, msg=name
            )
        assert torch.equal(fast.tokens_since_fired, ref.tokens_since_fired)
    assert stepper.n_dead == int(ref.dead_mask().sum())


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read a device value back to the host (a sync on CUDA)."""

    OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(self.OPS):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dead_fraction", [0.1, 0.5])
def test_a_whole_step_reads_the_device_once(dead_fraction):
    sae = make_sae(dead_fraction)
    opt = adam(sae.parameters(), 1e-3, 1e-8)
    SyncFreeStep(sae, opt).step([batch(1), batch(2)], lr=1e-3)  # warm-up: Adam's state
    sae.tokens_since_fired.copy_(make_sae(dead_fraction).tokens_since_fired)  # dead again
    stepper = SyncFreeStep(sae, opt)
    assert stepper.n_dead == int(dead_fraction * N)
    with HostReads() as reads:
        result = stepper.step([batch(3), batch(4)], lr=1e-3)
    assert result.auxk > 0
    assert len(reads.seen) <= 1, reads.seen


def test_the_reference_step_reads_the_device_several_times():
    # the counter can fail: the autograd trainer's step syncs in AuxK and the fired mask
    sae = make_sae(0.5)
    opt = adam(sae.parameters(), 1e-3, 1e-8)
    autograd_step(sae, opt, [batch(1), batch(2)], lr=1e-3)
    with HostReads() as reads:
        autograd_step(sae, opt, [batch(3), batch(4)], lr=1e-3)
    assert len(reads.seen) > 1


def test_a_non_finite_step_raises_and_leaves_the_weights():
    sae = make_sae(0.5)
    stepper = SyncFreeStep(sae, adam(sae.parameters(), 1e-3, 1e-8))
    before = copy.deepcopy(sae.state_dict())
    bad = batch(2)
    bad[1, 3, 5] = float("nan")
    with pytest.raises(NonFiniteStep, match="NaN/inf"):
        stepper.step([batch(1), bad], lr=1e-3)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_two_dimensional_batches_are_one_layer():
    sae = make_sae(0.5)
    x = batch(layers=1)
    out3, state3, _ = fast_micro_batch(copy.deepcopy(sae), x)
    out2, state2, _ = fast_micro_batch(copy.deepcopy(sae), x[0])
    assert out2.values.shape == (TOKENS, K)
    torch.testing.assert_close(out2.fvu, out3.fvu)
    torch.testing.assert_close(state2.g_enc, state3.g_enc)


def test_bf16_selection_has_the_reference_loss_and_exact_gradients():
    sae = make_sae(0.5, select_bf16=True)
    x = batch()
    out, state, idx_a = fast_micro_batch(sae, x)
    ref = sae(x)  # the autograd path with the same bf16 selection
    assert torch.equal(out.indices.sort(-1).values, ref.indices.sort(-1).values)
    torch.testing.assert_close(out.fvu, ref.fvu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.auxk, ref.auxk_loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    torch.testing.assert_close(state.g_enc, sae.W_enc.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state.g_dec, sae.W_dec.grad, rtol=1e-4, atol=1e-6)
