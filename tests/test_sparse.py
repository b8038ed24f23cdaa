import pytest
import torch

from mlsae.sparse import GatherDot, topk_rows


def test_gather_dot_gradients_equal_dense_autograd():
    torch.manual_seed(0)
    x = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    idx = torch.stack([torch.randperm(64)[:5] for _ in range(50)])
    g = torch.randn(50, 5)
    (GatherDot.apply(x, w, idx, None) * g).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ((x @ w.T).gather(1, idx) * g).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,k", [((64, 4608), 32), ((50, 512), 16), ((7, 100), 3), ((9, 96), 4)]
)
def test_topk_rows_equals_torch_topk(shape, k):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, : shape[1] // 2] = 5.0  # a row of ties at the top
    x[1] = torch.arange(shape[1], dtype=torch.float32)  # all of the top in the last block
    x[2] = -torch.arange(shape[1], dtype=torch.float32)  # ... and in the first block
    values, indices = topk_rows(x, k)
    ref = x.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, ref)
    assert torch.equal(x.gather(1, indices), values)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct latents per row
