"""shared_input_linears (q/k/v projections whose input gradients are summed inside the GEMMs):
the stock forward, the stock weight gradients, the input gradient's sum, argument errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from turbomoe import ops


def _weights(gen: torch.Generator, outs: tuple[int, ...], hidden: int) -> list[torch.Tensor]:
    return [torch.randn(n, hidden, generator=gen, requires_grad=True) for n in outs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_separate_linears(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 40, generator=gen).to(dtype).requires_grad_()
    weights = [w.detach().to(dtype).requires_grad_() for w in _weights(gen, (48, 16, 16), 40)]
    grads = [torch.randn(2, 9, n, generator=gen).to(dtype) for n in (48, 16, 16)]

    outs = ops.shared_input_linears(x, tuple(weights))
    fused = torch.autograd.grad(outs, [x, *weights], grads)
    stock_outs = [F.linear(x, w) for w in weights]
    stock = torch.autograd.grad(stock_outs, [x, *weights], grads)

    for got, want in zip(outs, stock_outs, strict=True):
        assert torch.equal(got, want)  # the forward is F.linear itself
    for got, want in zip(fused[1:], stock[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The input gradient is rounded once per GEMM instead of once per add: against the exact
    # sum (float64), as close as stock's, or closer.
    exact = sum(
        g.double().reshape(-1, g.shape[-1]) @ w.double()
        for g, w in zip(grads, weights, strict=True)
    )
    exact = exact.reshape(x.shape)

    def err(t: torch.Tensor) -> float:
        return ((t.double() - exact).norm() / exact.norm()).item()

    assert err(fused[0]) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert err(fused[0]) <= err(stock[0]) * 1.5 + 1e-7


def test_unused_outputs_and_frozen_weights() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 24, generator=gen, requires_grad=True)
    wq, wk, wv = _weights(gen, (8, 4, 4), 24)
    wk.requires_grad_(False)
    q, k, _v = ops.shared_input_linears(x, (wq, wk, wv))
    (q.sum() + k.sum()).backward()
    want_x = torch.autograd.grad((F.linear(x, wq).sum() + F.linear(x, wk).sum()), x)[0]
    torch.testing.assert_close(x.grad, want_x, rtol=1e-6, atol=1e-6)
    assert wv.grad is None and wk.grad is None
    torch.testing.assert_close(wq.grad, torch.ones(5, 8).t() @ x.detach())


def test_without_autograd_it_is_plain_linear() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 24, generator=gen)
    weights = tuple(w.detach() for w in _weights(gen, (8, 4), 24))
    outs = ops.shared_input_linears(x, weights)
    assert all(o.grad_fn is None for o in outs)
    assert torch.equal(outs[0], F.linear(x, weights[0]))


def test_bad_arguments() -> None:
    x = torch.randn(5, 24)
    with pytest.raises(ValueError, match="at least one weight"):
        ops.shared_input_linears(x, ())
    with pytest.raises(ValueError, match="does not take inputs of 24"):
        ops.shared_input_linears(x, (torch.randn(8, 23),))
    with pytest.raises(TypeError, match=r"weight in torch\.bfloat16"):
        ops.shared_input_linears(x, (torch.randn(8, 24).to(torch.bfloat16),))
