"""add_rms_norm and rms_norm_keep_input (the residual adds folded into the RMSNorms): bitwise the
composition of torch's add and turbomoe's rms_norm, forward and backward, on the CPU; the
custom ops' registrations; argument errors; the composition they turn into under torch.compile."""

from __future__ import annotations

import pytest
import torch

from turbomoe import ops

DTYPES = [torch.float32, torch.bfloat16]


def _leaf(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).requires_grad_()


def _grads(out: torch.Tensor, grad: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    for leaf in leaves:
        leaf.grad = None
    out.backward(grad)
    return [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_add_rms_norm_is_the_add_then_the_norm(dtype: torch.dtype, with_weight: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x, residual = _leaf((2, 7, 72), dtype, gen), _leaf((2, 7, 72), dtype, gen)
    weight = (
        (torch.rand(72, generator=gen) + 0.5).to(dtype).requires_grad_() if with_weight else None
    )
    leaves = [x, residual] + ([weight] if weight is not None else [])
    # Both outputs carry a gradient, as in a decoder layer (the sum is the next residual).
    g_sum, g_y = torch.randn(2, 7, 72, generator=gen), torch.randn(2, 7, 72, generator=gen)

    total, y = ops.add_rms_norm(x, residual, weight, 1e-6)
    fused = _grads(total * g_sum.to(dtype) + y * g_y.to(dtype), torch.ones_like(y), leaves)
    want_total = residual + x
    want_y = ops.rms_norm(want_total, weight, 1e-6)
    plain = _grads(
        want_total * g_sum.to(dtype) + want_y * g_y.to(dtype), torch.ones_like(y), leaves
    )
    assert torch.equal(total, want_total) and torch.equal(y, want_y)
    for got, want in zip(fused, plain, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_without_a_gradient_on_the_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x, residual = _leaf((5, 16), dtype, gen), _leaf((5, 16), dtype, gen)
    weight = torch.rand(16, generator=gen).to(dtype).requires_grad_()
    total, _y = ops.add_rms_norm(x, residual, weight, 1e-6)
    grad = torch.randn(5, 16, generator=gen).to(dtype)
    total.backward(grad)
    assert torch.equal(x.grad, grad) and torch.equal(residual.grad, grad)
    assert weight.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_input_adds_the_residual_gradient_in_the_norm_backward(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = _leaf((3, 5, 40), dtype, gen)
    weight = (torch.rand(40, generator=gen) + 0.5).to(dtype).requires_grad_()
    other = torch.randn(3, 5, 40, generator=gen).to(dtype)

    kept, y = ops.rms_norm_keep_input(x, weight, 1e-6)
    assert kept.data_ptr() == x.data_ptr() and torch.equal(kept, x)  # x itself, not a copy
    fused = _grads(kept * other + y, torch.ones_like(y), [x, weight])
    plain = _grads(x * other + ops.rms_norm(x, weight, 1e-6), torch.ones_like(y), [x, weight])
    assert torch.equal(y, ops.rms_norm(x, weight, 1e-6))
    for got, want in zip(fused, plain, strict=True):
        assert torch.equal(got, want)


def test_keep_input_when_only_one_output_is_used() -> None:
    gen = torch.Generator().manual_seed(3)
    x = _leaf((4, 24), torch.float32, gen)
    weight = torch.rand(24, generator=gen).requires_grad_()
    kept, _y = ops.rms_norm_keep_input(x, weight, 1e-6)
    kept.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and weight.grad is None
    x.grad = None
    _kept, y = ops.rms_norm_keep_input(x, weight, 1e-6)
    y.sum().backward()
    want = torch.autograd.grad(ops.rms_norm(x, weight, 1e-6).sum(), x)[0]
    assert torch.equal(x.grad, want)


def test_keep_input_without_autograd_returns_x() -> None:
    x = torch.randn(4, 24)
    kept, y = ops.rms_norm_keep_input(x, None, 1e-6)
    assert kept is x and torch.equal(y, ops.rms_norm(x, None, 1e-6))
    with torch.no_grad():
        leaf = x.clone().requires_grad_()
        kept, _ = ops.rms_norm_keep_input(leaf, None, 1e-6)
        assert kept is leaf


def test_non_contiguous_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(6, 80, generator=gen)
    x = base[:, :72].requires_grad_()  # padded rows: a view, not contiguous
    residual = torch.randn(6, 72, generator=gen, requires_grad=True)
    weight = torch.rand(72, generator=gen)
    total, y = ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, residual + x)
    assert torch.equal(y, ops.rms_norm(residual + x, weight, 1e-6))
    kept, y2 = ops.rms_norm_keep_input(x, weight, 1e-6)
    (kept.sum() + y2.sum()).backward()
    want = 1 + torch.autograd.grad(ops.rms_norm(x, weight, 1e-6).sum(), x)[0]
    assert torch.equal(x.grad, want)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ops.add_rms_norm(torch.randn(4, 8), torch.randn(4, 9), None, 1e-6)
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8).to(torch.bfloat16), None, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        ops.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="one dimension"):
        ops.rms_norm_keep_input(torch.tensor(1.0), None, 1e-6)


def test_opcheck() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(13, 72, generator=gen, requires_grad=True)
    residual = torch.randn(13, 72, generator=gen, requires_grad=True)
    weight = torch.rand(72, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.turbomoe.add_rms_norm.default, (x, residual, weight, 1e-6))
    torch.library.opcheck(torch.ops.turbomoe.add_rms_norm.default, (x, residual, None, 1e-6))
    _total, _y, rstd = torch.ops.turbomoe.add_rms_norm(x.detach(), residual.detach(), None, 1e-6)
    grad_y, grad_res = torch.randn(13, 72, generator=gen), torch.randn(13, 72, generator=gen)
    args = (grad_y, x.detach(), weight.detach(), rstd, True, grad_res)
    torch.library.opcheck(torch.ops.turbomoe.rms_norm_backward.default, args)
    args = (grad_y, x.detach(), None, rstd, False, None)
    torch.library.opcheck(torch.ops.turbomoe.rms_norm_backward.default, args)


def test_compiled_layer_matches_eager() -> None:
    gen = torch.Generator().manual_seed(6)
    w1, w2 = torch.rand(32, generator=gen), torch.rand(32, generator=gen)

    def layer(h: torch.Tensor) -> torch.Tensor:
        residual, y = ops.rms_norm_keep_input(h, w1, 1e-6)
        residual, y = ops.add_rms_norm(y * 2, residual, w2, 1e-6)
        return residual + y

    h = torch.randn(3, 32, generator=gen, requires_grad=True)
    eager = layer(h)
    (want,) = torch.autograd.grad(eager.sum(), h)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(h)
    (got,) = torch.autograd.grad(out.sum(), h)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(got, want)
