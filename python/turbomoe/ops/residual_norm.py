"""The residual stream's adds, folded into the RMSNorms next to them.

Every decoder layer of the supported families runs

    residual = h;  y1 = input_layernorm(h);  a = attention(y1)
    h = residual + a;  y2 = post_attention_layernorm(h);  out = h + mlp(y2)

Each add is a memory-bound pass of its own (two rows read, one written), and in the backward
autograd adds the two gradients that reach h, and the two that reach the layer's input, in one
more pass each. Two ops fold three of those four passes into the norms beside them:

* ``add_rms_norm(x, residual, weight, eps) -> (residual + x, RMSNorm(residual + x))`` in one
  pass; its backward hands both inputs grad_sum + RMSNorm's backward, formed in one pass.
* ``rms_norm_keep_input(x, weight, eps) -> (x, RMSNorm(x))``: the norm, with x handed on as the
  layer's residual by this op, so that the gradient x gets through the residual arrives at this
  op's backward, where the RMSNorm backward kernel adds it (``turbomoe::rms_norm_backward``'s
  grad_residual) instead of autograd. An op that returns its input is not a torch custom op
  (whose outputs may not alias its inputs), so under ``torch.compile`` or a dispatch mode this
  is the plain norm and x.

Both give bitwise what turbomoe's ``rms_norm`` and torch's add give in turn.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, eager_ok
from turbomoe.ops.norm import _rms_norm_eager, norm_backward, rms_norm, rms_norm_rows


@torch.library.custom_op("turbomoe::add_rms_norm", mutates_args=())
def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual + x, y, rstd [R] float32) for x, residual [R,H] of one dtype."""
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty((x.shape[0],), dtype=torch.float32, device=x.device)
    _native.call(
        "tm_add_rmsnorm_forward",
        _native.describe(x),
        _native.describe(residual),
        _native.describe(weight),
        eps,
        _native.describe(total),
        _native.describe(y),
        _native.describe(rstd),
        _native.stream_for(x),
    )
    return total, y, rstd


@_add_rms_norm.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape),
        x.new_empty((x.shape[0],), dtype=torch.float32),
    )


def _add_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _x, _residual, weight, _eps = inputs
    total, _y, rstd = output
    ctx.save_for_backward(total, weight, rstd)
    ctx.need_weight_grad = weight is not None and ctx.needs_input_grad[2]
    ctx.mark_non_differentiable(rstd)


def _add_backward(
    ctx: Any, grad_sum: torch.Tensor | None, grad_y: torch.Tensor | None, _grad_rstd: Any
) -> tuple[Any, ...]:
    if grad_y is None:
        return grad_sum, grad_sum, None, None
    total, weight, rstd = ctx.saved_tensors
    grad, grad_weight = norm_backward(grad_y, grad_sum, total, weight, rstd, ctx.need_weight_grad)
    return grad, grad, grad_weight, None


_add_rms_norm_eager = differentiable(_add_rms_norm, _add_setup_context, _add_backward)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + x, RMSNorm(residual + x))``: the sum in x's dtype, as torch adds them, and
    the norm of that sum as :func:`turbomoe.ops.rms_norm` gives it. x and residual: one shape and
    dtype (any leading dims)."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    total, y, _rstd = _add_rms_norm_eager(
        rms_norm_rows(x), rms_norm_rows(residual), weight, float(eps)
    )
    return total.view(x.shape), y.view(x.shape)


class _KeepInput(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rms_norm_rows(x)
        y, rstd = _rms_norm_eager(rows, weight, eps)  # grad mode is off in here: the plain op
        ctx.save_for_backward(rows, weight, rstd)
        ctx.need_weight_grad = weight is not None and ctx.needs_input_grad[1]
        ctx.set_materialize_grads(False)
        return x, y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_x: torch.Tensor | None, grad_y: torch.Tensor | None
    ) -> tuple[Any, ...]:
        if grad_y is None:
            return grad_x, None, None
        rows, weight, rstd = ctx.saved_tensors
        grad, grad_weight = norm_backward(grad_y, grad_x, rows, weight, rstd, ctx.need_weight_grad)
        return grad.view(grad_y.shape), grad_weight, None


def rms_norm_keep_input(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, RMSNorm(x))``; use the first as x wherever the caller keeps using x (the residual),
    so that the gradient it gets there is added inside this norm's backward."""
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    if eager_ok((x, weight)) and torch.is_grad_enabled() and torch._C._any_requires_grad(x, weight):
        return _KeepInput.apply(x, weight, float(eps))
    return x, rms_norm(x, weight, eps)
