import pytest
import torch

from mlsae.sae import MLSAE, fvu, geometric_median, nearest_power_of_2, standardize


def make_sae(d=16, n=64, k=4, **kw):
    torch.manual_seed(0)
    return MLSAE(d, n, k, **kw)


def test_bad_k_is_a_clear_error():
    with pytest.raises(ValueError, match="k must be in"):
        MLSAE(8, 16, 17)
    with pytest.raises(ValueError, match="k_aux must be in"):
        MLSAE(8, 16, 4, k_aux=32)


def test_k_aux_default_is_nearest_power_of_two_of_half_d():
    assert nearest_power_of_2(288) == 256  # SmolLM2: d = 576
    assert nearest_power_of_2(256) == 256  # Pythia-70m: d = 512
    assert nearest_power_of_2(400) == 512
    assert MLSAE(576, 1152, 32).k_aux == 256


def test_standardize_formula():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    s, mu, std = standardize(x)
    # mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3)
    sd = (14 / 3) ** 0.5
    torch.testing.assert_close(mu, torch.tensor([[3.0]]))
    torch.testing.assert_close(s, torch.tensor([[-2.0, -1.0, 0.0, 3.0]]) / (sd + 1e-5))


def test_exactly_k_selected_and_at_most_k_nonzero():
    sae = make_sae()
    x = torch.randn(3, 10, 16)
    out = sae(x)
    assert out.indices.shape == (3, 10, 4) and out.values.shape == (3, 10, 4)
    # k distinct latents per vector, and they are the k largest pre-activations
    assert (out.indices.sort(-1).values.diff(dim=-1) > 0).all()
    pre = sae.pre_activations(standardize(x)[0])
    kth = pre.topk(4, dim=-1).values[..., -1:]
    assert (pre.gather(-1, out.indices) >= kth).all()
    dense = sae.dense_latents(out.values, out.indices)
    assert ((dense != 0).sum(-1) <= 4).all() and (dense >= 0).all()


def test_sparse_decode_equals_dense_reference():
    sae = make_sae()
    with torch.no_grad():
        sae.b_pre.normal_()
    x = torch.randn(2, 7, 16) * 3 + 1
    out = sae(x)
    dense = sae.dense_latents(out.values, out.indices)
    _, mu, std = standardize(x)
    ref = (dense @ sae.W_dec + sae.b_pre) * std + mu
    torch.testing.assert_close(out.recons, ref, rtol=1e-5, atol=1e-5)


def test_b_pre_is_geometric_median_in_standardized_space():
    sae = make_sae()
    x = torch.randn(2, 50, 16) * 10 + 5
    sae.train()
    sae(x)
    x_std = standardize(x)[0].reshape(-1, 16)
    torch.testing.assert_close(sae.b_pre.data, geometric_median(x_std), rtol=1e-4, atol=1e-4)
    assert sae.b_pre.abs().max() < 2  # standardized scale, not the raw offset of 5


def test_geometric_median_of_symmetric_points():
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(geometric_median(pts), torch.tensor([1.0, 1.0]))


def test_fvu_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    # error 1 + 1 = 2; mean (2, 1); total variance 1 + 1 + 1 + 1 = 4
    assert fvu(x, x_hat).item() == pytest.approx(0.5)


def test_dead_counter_counts_tokens_not_vectors():
    sae = make_sae(dead_tokens=12)
    indices = torch.tensor([[[0, 1, 2, 3]] * 5] * 3)  # 3 layers x 5 tokens
    sae.update_dead_(indices, n_tokens=5)
    assert sae.tokens_since_fired[:4].tolist() == [0, 0, 0, 0]
    assert (sae.tokens_since_fired[4:] == 5).all()  # 5 tokens, not 15 vectors
    sae.update_dead_(torch.tensor([[[5, 6, 7, 8]]]), n_tokens=5)
    assert sae.tokens_since_fired[0].item() == 5 and sae.tokens_since_fired[5].item() == 0
    assert sae.dead_fraction() == 0
    sae.update_dead_(torch.tensor([[[5, 6, 7, 8]]]), n_tokens=5)
    dead = sae.dead_mask()
    # 0-3: 10 tokens since firing; 5-8 just fired; 4 and 9+: 15 >= 12 tokens, dead
    assert dead.nonzero().flatten().tolist() == [4, *range(9, 64)]


def test_auxk_is_zero_with_no_dead_latents():
    sae = make_sae()
    sae.train()
    out = sae(torch.randn(2, 10, 16))
    assert out.auxk_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.fvu)


def test_auxk_uses_dead_latents_only():
    sae = make_sae(k_aux=3, dead_tokens=100)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:50] = True
    sae.tokens_since_fired[dead] = 1000
    sae.train()
    x = torch.randn(2, 10, 16)
    out = sae(x)
    assert out.auxk_loss.item() > 0
    # reference: error in standardized space, top-3 dead pre-activations, no bias, normalised
    x_std = standardize(x)[0]
    pre = sae.pre_activations(x_std)
    recons_std = sae.dense_latents(out.values, out.indices) @ sae.W_dec + sae.b_pre
    e = (x_std - recons_std).detach()
    masked = pre.masked_fill(~dead, float("-inf"))
    v, i = masked.topk(3, dim=-1)
    e_hat = sae.dense_latents(v.relu(), i) @ sae.W_dec
    per_layer = [
        (e[ly] - e_hat[ly]).pow(2).sum() / (e[ly] - e[ly].mean(0)).pow(2).sum() for ly in range(2)
    ]
    ref = torch.stack(per_layer).mean()
    torch.testing.assert_close(out.auxk_loss, ref, rtol=1e-4, atol=1e-6)
    # its gradient reaches only dead decoder rows
    sae.zero_grad()
    out.auxk_loss.backward()
    grad_rows = sae.W_dec.grad.abs().sum(-1) > 0
    assert grad_rows[dead].any() and not grad_rows[~dead].any()


def test_decoder_unit_norm_and_orthogonal_gradient_after_step():
    sae = make_sae()
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    out = sae(torch.randn(3, 20, 16))
    out.loss.backward()
    sae.remove_parallel_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec.data).sum(-1)
    assert parallel.abs().max() < 1e-6
    assert sae.W_dec.grad.abs().sum() > 0
    opt.step()
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() > 1e-4  # the step moved the norms
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_decoder_initialised_as_encoder_transpose_with_unit_norm():
    sae = make_sae()
    torch.testing.assert_close(sae.W_dec.data, sae.W_enc.data)  # both (n, d): W_dec = W_enc^T
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_fvu_is_the_mean_of_per_layer_fvus():
    x = torch.randn(3, 20, 8)
    x_hat = x + 0.1 * torch.randn(3, 20, 8)
    per_layer = [fvu(x[ly], x_hat[ly]) for ly in range(3)]
    torch.testing.assert_close(fvu(x, x_hat), torch.stack(per_layer).mean())


def test_loss_does_not_weight_layers_by_their_variance():
    """Scaling one layer's vectors by 100 changes nothing: every layer counts equally."""
    sae = make_sae()
    sae.eval()
    x = torch.randn(3, 20, 16)
    scaled = x.clone()
    scaled[1] *= 100
    torch.testing.assert_close(sae(scaled).fvu, sae(x).fvu, rtol=1e-4, atol=1e-6)


def test_a_selected_latent_with_zero_value_did_not_fire():
    sae = make_sae(dead_tokens=5)
    indices = torch.tensor([[0, 1, 2, 3]])
    sae.update_dead_(indices, n_tokens=5, values=torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    assert sae.tokens_since_fired[:4].tolist() == [0, 5, 0, 5]


def test_training_gradients_equal_a_dense_reference():
    """The sparse-gradient forward gives the gradients of the plain dense formulation."""
    sae = make_sae(dead_tokens=100, k_aux=8)
    sae.tokens_since_fired[30:50] = 1000  # some dead latents, so AuxK contributes
    sae.train()
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_pre_initialized.fill_(True)
    x = torch.randn(3, 20, 16) * 2 + 1
    dead = sae.dead_mask().clone()  # forward updates the counters
    sae(x).loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # dense reference: pre-activations with autograd, masked top-k, dense decode
    x_std, mu, std = standardize(x)
    pre = (x_std - sae.b_pre) @ sae.W_enc.T
    v, i = pre.topk(sae.k, dim=-1)
    h = torch.zeros_like(pre).scatter(-1, i, v.relu())
    recons_std = h @ sae.W_dec + sae.b_pre
    loss_fvu = fvu(x, recons_std * std + mu)
    va, ia = pre.masked_fill(~dead, float("-inf")).topk(8, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, ia, va.relu()) @ sae.W_dec
    loss = loss_fvu + sae.aux_coef * fvu((x_std - recons_std).detach(), e_hat)
    loss.backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_selection_in_training_only():
    torch.manual_seed(0)
    sae = MLSAE(64, 512, 8, select_bf16=True)
    x = torch.randn(2, 30, 64)
    x_std = standardize(x)[0]
    sae.train()
    values, indices = sae.encode(x)
    exact = sae.pre_activations(x_std).gather(-1, indices).relu()
    torch.testing.assert_close(values, exact, rtol=2e-2, atol=2e-2)  # bf16 rounding
    assert not torch.equal(values, exact)
    fp32 = MLSAE(64, 512, 8)
    fp32.load_state_dict(sae.state_dict())
    same = (fp32.encode(x)[1].sort(-1).values == indices.sort(-1).values).float().mean()
    assert same > 0.9  # bf16 may only reorder near-ties at the k-th place
    sae.eval()  # evaluation is exact float32
    values, indices = sae.encode(x)
    torch.testing.assert_close(values, sae.pre_activations(x_std).gather(-1, indices).relu())


def test_standardize_matches_torch_std():
    x = torch.randn(8, 3, 576) * 40 + 3
    _, mu, std = standardize(x)
    assert torch.allclose(std, x.std(dim=-1, keepdim=True), rtol=1e-6)


def test_training_fvu_equals_the_evaluation_definition():
    """The fused per-batch loss is `mlsae.reconstruction`'s FVU of that batch, mean over layers."""
    from mlsae.reconstruction import ReconstructionStats

    gen = torch.Generator().manual_seed(0)
    offsets = torch.randn(3, 1, 16, generator=gen) * 10  # per-dimension offsets, as in residuals
    x = offsets + torch.randn(3, 50, 16, generator=gen) * 4
    x_hat = x + torch.randn(3, 50, 16, generator=gen)
    stats = ReconstructionStats(3, 16, 4)
    stats.update(x, x_hat, torch.ones(3, 50, 1))
    per_layer = stats.compute()["fvu"]
    mean = sum(per_layer) / 3
    assert fvu(x.double(), x_hat.double()).item() == pytest.approx(mean, rel=1e-12)
    assert fvu(x, x_hat).item() == pytest.approx(mean, rel=1e-5)  # float32, as in training
    for layer in range(3):
        assert fvu(x[layer], x_hat[layer]).item() == pytest.approx(per_layer[layer], rel=1e-5)
    # the loss term of a forward pass, against the evaluation of its reconstruction
    sae = make_sae().eval()
    out = sae(x)
    stats = ReconstructionStats(3, 16, 64)
    stats.update(x, out.recons, out.values, out.indices)
    assert out.fvu.item() == pytest.approx(sum(stats.compute()["fvu"]) / 3, rel=1e-5)


def test_sae_imports_no_evaluation_module():
    """Training code must not go stale in DVC when evaluation code changes."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, mlsae.sae; print(sorted(m for m in sys.modules if m.startswith('mlsae.')))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['mlsae.sae', 'mlsae.sparse']", out.stdout
