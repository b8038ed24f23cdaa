import ast
from pathlib import Path

import pytest
import torch

import mlsae.distributions
from mlsae.distributions import NextTokenDistribution, kl_from_logits


def _logits(seed=0, shape=(2, 7, 11)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 3


def test_ce_and_kl_equal_the_explicit_definitions():
    logits, other = _logits(0), _logits(1)
    targets = torch.randint(11, (2, 7), generator=torch.Generator().manual_seed(2))
    dist = NextTokenDistribution(logits, targets, rows=4)  # 14 positions: blocks of 4, 4, 4, 2
    logp, logq = logits.double().log_softmax(-1), other.double().log_softmax(-1)
    torch.testing.assert_close(dist.p.view(logits.shape), logp.exp(), rtol=1e-12, atol=0)
    torch.testing.assert_close(dist.ce, -logp.gather(-1, targets[..., None]).squeeze(-1))
    ce, kl = dist.ce_and_kl(other)
    assert ce.shape == kl.shape == (2, 7) and ce.dtype == kl.dtype == torch.float64
    torch.testing.assert_close(ce, -logq.gather(-1, targets[..., None]).squeeze(-1))
    torch.testing.assert_close(kl, (logp.exp() * (logp - logq)).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dist.kl(other), kl, rtol=1e-12, atol=1e-14)


def test_blocks_do_not_change_the_numbers():
    logits, other = _logits(3), _logits(4)
    targets = torch.randint(11, (2, 7), generator=torch.Generator().manual_seed(5))
    whole = NextTokenDistribution(logits, targets, rows=None)
    for rows in (1, 3, 64):
        dist = NextTokenDistribution(logits, targets, rows=rows)
        for a, b in ((dist.p, whole.p), (dist.neg_entropy, whole.neg_entropy), (dist.ce, whole.ce)):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
        for a, b in zip(dist.ce_and_kl(other), whole.ce_and_kl(other), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_kl_keeps_the_dtype_and_its_gradient_is_softmax_minus_p():
    logits = _logits(6, (5, 11))
    dist = NextTokenDistribution(logits, dtype=torch.float32, rows=None)
    assert dist.p.dtype == torch.float32 and dist.ce is None and not dist.p.requires_grad
    z = _logits(7, (5, 11)).requires_grad_()
    kl = dist.kl(z)
    assert kl.dtype == torch.float32 and kl.shape == (5,) and (kl > 0).all()
    kl.sum().backward()
    torch.testing.assert_close(z.grad, z.detach().softmax(-1) - dist.p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        kl, kl_from_logits(dist.p, dist.neg_entropy, z), rtol=0, atol=0, check_dtype=True
    )
    with pytest.raises(ValueError, match="needs the targets"):
        dist.ce_and_kl(z)


def test_distributions_module_imports_only_torch():
    tree = ast.parse(Path(mlsae.distributions.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= {"__future__", "torch"}, names
