"""RMSNorm as a torch custom op: one read and one write of x instead of HF's five element-wise ops.

The forward saves the per-row float32 rstd so that the backward neither recomputes the reduction
nor keeps a float32 copy of x; the weight's gradient is reduced deterministically in float32.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct


@torch.library.custom_op("turbomoe::rms_norm", mutates_args=())
def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [R,H] in x's dtype, rstd [R] float32) for x [R,H]."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty((x.shape[0],), dtype=torch.float32, device=x.device)
    _native.call(
        "tm_rmsnorm_forward",
        _native.describe(x),
        _native.describe(weight),
        eps,
        _native.describe(y),
        _native.describe(rstd),
        _native.stream_for(x),
    )
    return y, rstd


@_rms_norm.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


def backward_buffers(
    x: torch.Tensor, rows: int, hidden: int, need_weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_x like x, grad_weight [hidden] float32 (empty when not wanted) and the workspace of
    the RMSNorm backward kernel's weight-gradient partial sums over `rows` rows, which
    tm_rmsnorm_backward and tm_qk_norm_rope_backward share."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_weight = torch.empty(
        (hidden if need_weight_grad else 0,), dtype=torch.float32, device=x.device
    )
    nbytes = 0
    if need_weight_grad:
        nbytes = _native.workspace_size(
            "tm_rmsnorm_backward_workspace_size", rows, hidden, _native.device_code(x)
        )
    return grad_x, grad_weight, _native.workspace(nbytes, x)


@torch.library.custom_op("turbomoe::rms_norm_backward", mutates_args=())
def _rms_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    need_weight_grad: bool,
    grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [R,H], grad_weight [H] float32, or an empty tensor when not wanted).

    grad_residual [R,H] (grad_x's dtype), when given, is a gradient that reaches x by another
    path (the residual stream, ops/residual_norm.py): it is added to each row of grad_x inside
    the kernel (``tm_rmsnorm_backward_add``), bitwise the backward followed by the add."""
    grad_x, grad_weight, workspace = backward_buffers(x, x.shape[0], x.shape[1], need_weight_grad)
    _native.call(
        "tm_rmsnorm_backward_add",
        _native.describe(grad_y),
        _native.describe(x),
        _native.describe(weight),
        _native.describe(rstd),
        _native.describe(grad_residual),
        _native.describe(grad_x),
        _native.describe(grad_weight) if need_weight_grad else None,
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(x),
    )
    return grad_x, grad_weight


@_rms_norm_backward.register_fake
def _(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    need_weight_grad: bool,
    grad_residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x.shape[1] if need_weight_grad else 0
    return x.new_empty(x.shape), x.new_empty((hidden,), dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.need_weight_grad = weight is not None and ctx.needs_input_grad[1]
    ctx.mark_non_differentiable(rstd)


def norm_backward(
    grad_y: torch.Tensor,
    grad_residual: torch.Tensor | None,
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the gradient of the norm's input rows [R,H], plus grad_residual when given; the weight's
    gradient in its dtype, or None). grad_y / grad_residual: any shape of R*H elements."""
    shape = rows.shape
    grad_x, grad_weight = _rms_norm_backward_eager(
        grad_y.reshape(shape).contiguous(),
        rows,
        weight,
        rstd,
        need_weight_grad,
        None if grad_residual is None else grad_residual.reshape(shape).contiguous(),
    )
    if not need_weight_grad or weight is None:
        return grad_x, None
    return grad_x, grad_weight.to(weight.dtype)


def _backward(ctx: Any, grad_y: torch.Tensor | None, _grad_rstd: Any) -> tuple[Any, ...]:
    if grad_y is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = norm_backward(grad_y, None, x, weight, rstd, ctx.need_weight_grad)
    return grad_x, grad_weight, None


_rms_norm_eager = differentiable(_rms_norm, _setup_context, _backward)
_rms_norm_backward_eager = direct(_rms_norm_backward)


def rms_norm_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the [R,H] rows the kernels take: a view where its last dim is contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    return rows.contiguous() if rows.numel() == 0 or rows.stride(-1) != 1 else rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight · (x / sqrt(mean(x², -1) + eps)) over the last dim, statistics in float32.

    Same shape and dtype as x (any leading dims); weight [H] or None. Differentiable with respect
    to x and weight; weight's gradient is reduced in float32 and returned in weight's dtype.
    """
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    shape = x.shape
    y, _rstd = _rms_norm_eager(rms_norm_rows(x), weight, float(eps))
    return y.view(shape)
