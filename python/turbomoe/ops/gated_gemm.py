"""The experts' gate/up projection and its gated activation as one op.

``grouped_gemm_gated(x, w, offsets)`` returns ``(gate_up, act)``: gate_up [M, 2I] = x · w[e]ᵀ
(w [E, 2I, K], the gate rows then the up rows) and act [M, I] = act(gate) · up of gate_up's two
halves as stored. With ``TURBOMOE_HOPPER_GEMM_SWIGLU=1`` on Hopper (bf16, I a multiple of 64) the
activation runs in the grouped GEMM's epilogue, so the [M, 2I] output is written once and never
read back in the forward; otherwise (the default while the two kernels in turn measure faster,
docs/perf-notes.md) the library runs the GEMM and the activation kernel, with the same result.

The backward is the composed one: d(gate_up) from the activation's backward on the saved gate_up
(plus gate_up's own gradient, where a caller used it), then the grouped GEMM's grad-input and
grad-weight passes.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops import empty_experts
from turbomoe.ops._eager import differentiable
from turbomoe.ops.gated import _backward_eager as gated_activation_backward_eager
from turbomoe.ops.grouped_gemm import _backward_input_eager, _weight_operand, weight_gradient


def _outputs(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (gate_up [M, 2I], act [M, I]) in x's dtype and device (also the fake's)."""
    rows, n = x.shape[0], w.shape[1]
    return x.new_empty((rows, n)), x.new_empty((rows, n // 2))


@torch.library.custom_op("turbomoe::grouped_gemm_gated", mutates_args=())
def _grouped_gemm_gated(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up, act = _outputs(x, w)
    _native.call(
        "tm_grouped_gemm_swiglu_forward",
        _native.make_params(_native.SwigluParams, variant=variant, alpha=alpha, limit=limit),
        _native.describe(x),
        _native.describe(_weight_operand(w)),
        _native.describe(expert_offsets),
        _native.describe(gate_up),
        _native.describe(act),
        _native.stream_for(x),
    )
    return gate_up, act


@_grouped_gemm_gated.register_fake
def _(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _outputs(x, w)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, w, expert_offsets, variant, alpha, limit = inputs
    gate_up, _ = output
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # dx needs w, dw needs x: keep each alive only when its gradient is wanted.
    ctx.save_for_backward(x if need_w else None, w if need_x else None, expert_offsets, gate_up)
    ctx.need_x, ctx.need_w = need_x, need_w
    ctx.w_dtype = w.dtype
    ctx.args = (variant, alpha, limit)
    ctx.weight_leaf = empty_experts.track_weight(w) if need_w else None


def _backward(
    ctx: Any, grad_gate_up: torch.Tensor | None, grad_act: torch.Tensor | None
) -> tuple[Any, ...]:
    x, w, expert_offsets, gate_up = ctx.saved_tensors
    if grad_act is None and grad_gate_up is None:
        return None, None, None, None, None, None
    if grad_act is None:
        grad = grad_gate_up.contiguous()
    else:
        grad = gated_activation_backward_eager(grad_act.contiguous(), gate_up, *ctx.args, False)
        if grad_gate_up is not None:
            grad = grad + grad_gate_up
    dx = _backward_input_eager(grad, w, expert_offsets) if ctx.need_x else None
    dw = None
    if ctx.need_w:
        dw = weight_gradient(grad, x, expert_offsets, ctx.w_dtype, ctx.weight_leaf)
    return dx, dw, None, None, None, None


_grouped_gemm_gated_eager = differentiable(_grouped_gemm_gated, _setup_context, _backward)


def grouped_gemm_gated(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    variant: int,
    alpha: float = 1.0,
    limit: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [M, 2I], act [M, I]) for x [M, K], w [E, 2I, K] (gate rows, then up rows).

    variant: ``ops.activation.SILU`` or ``CLAMPED`` (GPT-OSS, with alpha and limit). Rows past
    offsets[E] come out zero. Differentiable with respect to x and w through both outputs.
    """
    if x.dim() != 2 or w.dim() != 3 or w.shape[1] % 2 != 0:
        raise ValueError(
            f"expected x [M, K] and w [E, 2I, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    return _grouped_gemm_gated_eager(
        x.contiguous(), w, expert_offsets.contiguous(), variant, alpha, limit
    )
