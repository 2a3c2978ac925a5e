"""Grouped GEMM over experts, as a torch custom op: y[rows of e] = x[rows of e] · w[e]ᵀ.

All experts run in one call (no Python loop over experts, no per-expert launch), with the rows
grouped by the offsets of ``permute_plan``. w follows nn.Linear's [E, N, K] convention; a
transposed parameter (GPT-OSS stores [E, K, N]) is passed as a strided view without a copy
where the backend can read it.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops import empty_experts
from turbomoe.ops._eager import differentiable, direct

FORWARD = 1
GRAD_INPUT = 2
GRAD_WEIGHT = 3


def _weight_operand(w: torch.Tensor) -> torch.Tensor:
    """w as the backend reads it.

    The CPU reference takes any strides; the CUDA kernels want the reduction (last) dimension
    contiguous, so only there a view with another layout is copied once per call. Deciding up
    front keeps the CUDA path free of a failed call and a retry.
    """
    if w.device.type == "cuda" and w.stride(-1) != 1:
        return w.contiguous()
    return w


_FUNCTIONS = {
    FORWARD: "tm_grouped_gemm_forward",
    GRAD_INPUT: "tm_grouped_gemm_backward_input",
    GRAD_WEIGHT: "tm_grouped_gemm_backward_weight",
}


def _run(
    pass_: int,
    a: torch.Tensor,
    b: torch.Tensor,
    expert_offsets: torch.Tensor,
    out: torch.Tensor,
    shape: tuple[int, int, int, int],
    function: str | None = None,
) -> torch.Tensor:
    """One pass through the C ABI (the three share a signature); shape is (M, N, K, E).
    function: the pass's entry point unless given (the routed grad-weight shares its signature
    and workspace)."""
    nbytes = _native.workspace_size(
        "tm_grouped_gemm_workspace_size", pass_, *shape, _native.device_code(a)
    )
    workspace = _native.workspace(nbytes, a)
    _native.call(
        function or _FUNCTIONS[pass_],
        _native.describe(a),
        _native.describe(b),
        _native.describe(expert_offsets),
        _native.describe(out),
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(a),
    )
    return out


@torch.library.custom_op("turbomoe::grouped_gemm", mutates_args=())
def _grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    rows, n, k, experts = x.shape[0], w.shape[1], w.shape[2], w.shape[0]
    w = _weight_operand(w)
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    return _run(FORWARD, x, w, expert_offsets, y, (rows, n, k, experts))


@_grouped_gemm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[1]))


@torch.library.custom_op("turbomoe::grouped_gemm_backward_input", mutates_args=())
def _grouped_gemm_backward_input(
    dy: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor
) -> torch.Tensor:
    """dx [M,K] = dy [M,N] · w[e] per expert."""
    rows, n, k, experts = dy.shape[0], w.shape[1], w.shape[2], w.shape[0]
    w = _weight_operand(w)
    dx = torch.empty((rows, k), dtype=dy.dtype, device=dy.device)
    return _run(GRAD_INPUT, dy, w, expert_offsets, dx, (rows, n, k, experts))


@_grouped_gemm_backward_input.register_fake
def _(dy: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    return dy.new_empty((dy.shape[0], w.shape[2]))


@torch.library.custom_op("turbomoe::grouped_gemm_backward_weight", mutates_args=())
def _grouped_gemm_backward_weight(
    dy: torch.Tensor, x: torch.Tensor, expert_offsets: torch.Tensor, w_dtype: torch.dtype
) -> torch.Tensor:
    """dw [E,N,K] = dy_eᵀ · x_e per expert (zero for experts without rows), in w's dtype."""
    return _weight_pass(dy, x, expert_offsets, w_dtype, _FUNCTIONS[GRAD_WEIGHT])


def _weight_pass(
    dy: torch.Tensor, x: torch.Tensor, expert_offsets: torch.Tensor, w_dtype: torch.dtype, fn: str
) -> torch.Tensor:
    """A fresh dw [E,N,K] in w_dtype filled by the grad-weight entry point fn."""
    rows, n, k, experts = x.shape[0], dy.shape[1], x.shape[1], expert_offsets.shape[0] - 1
    dw = torch.empty((experts, n, k), dtype=w_dtype, device=x.device)
    return _run(GRAD_WEIGHT, dy, x, expert_offsets, dw, (rows, n, k, experts), fn)


@_grouped_gemm_backward_weight.register_fake
def _(
    dy: torch.Tensor, x: torch.Tensor, expert_offsets: torch.Tensor, w_dtype: torch.dtype
) -> torch.Tensor:
    return x.new_empty((expert_offsets.shape[0] - 1, dy.shape[1], x.shape[1]), dtype=w_dtype)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, w, expert_offsets = inputs
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # dx needs w, dw needs x: keep each alive only when its gradient is wanted.
    ctx.save_for_backward(x if need_w else None, w if need_x else None, expert_offsets)
    ctx.need_x, ctx.need_w = need_x, need_w
    ctx.w_dtype = w.dtype
    ctx.weight_leaf = empty_experts.track_weight(w) if need_w else None


def _backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
    x, w, expert_offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _backward_input_eager(dy, w, expert_offsets) if ctx.need_x else None
    dw = None
    if ctx.need_w:
        dw = weight_gradient(dy, x, expert_offsets, ctx.w_dtype, ctx.weight_leaf)
    return dx, dw, None


_grouped_gemm_eager = differentiable(_grouped_gemm, _setup_context, _backward)
_backward_input_eager = direct(_grouped_gemm_backward_input)
_backward_weight_eager = direct(_grouped_gemm_backward_weight)


def weight_gradient(
    dy: torch.Tensor,
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    w_dtype: torch.dtype,
    weight_leaf: torch.Tensor | None = None,
) -> torch.Tensor:
    """dw [E,N,K] = dy_eᵀ · x_e, for a backward: with TURBOMOE_DW_ZEROS_ASIDE=1 on CUDA, and
    where nothing reads the gradient before the backward ends (weight_leaf: the weight when it
    is a leaf; see empty_experts.can_defer), the empty experts' zeros are written on a side
    stream beside the next kernels (ops/empty_experts.py); the values are the same either way."""
    if not empty_experts.defer_zeros(x, weight_leaf):
        return _backward_weight_eager(dy, x, expert_offsets, w_dtype)
    dw = _weight_pass(dy, x, expert_offsets, w_dtype, "tm_grouped_gemm_backward_weight_routed")
    empty_experts.zero_empty_experts_aside(expert_offsets, dw)
    return dw


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """y [M,N] = x [M,K] · w[e]ᵀ for the rows [offsets[e], offsets[e+1]) of each expert e.

    w is [E,N,K] and may be a strided view; rows past offsets[E] come out zero. Differentiable
    with respect to x and w.
    """
    return _grouped_gemm_eager(x.contiguous(), w, expert_offsets.contiguous())
