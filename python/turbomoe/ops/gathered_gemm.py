"""The experts' first grouped GEMM with the token gather folded into its operand loads.

``grouped_gemm_gathered(src, ...)`` equals ``grouped_gemm(gather_rows(src, ...), w, offsets)``
without the permuted copy of the activations: the forward reads each row of x straight from the
token rows (on Hopper in the GEMM's A load), and the backward's weight gradient reads them the
same way (the B load of the grad-weight pass), so the [rows, K] copy is neither written in the
forward nor kept for the backward. The input's gradient is the grad-input GEMM followed by the
gather's adjoint (an unweighted combine), as in the unfused pair.

The lean experts' backward (ops/moe_lean.py) also needs the other two passes with a per-token
operand: the down projection's grad-input and grad-weight read the token gradient g[t(r)] as
their dy (``backward_input_gathered``, ``backward_weight_gathered`` with gather_dy), so that
the gathered copy of g is never written either.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct
from turbomoe.ops.grouped_gemm import _backward_input_eager, _weight_operand
from turbomoe.ops.permute import _combine_eager


def _call(name: str, *args: torch.Tensor | int) -> torch.Tensor:
    """The C ABI function `name` over args (tensors described, ints as they are) on the stream
    of the last tensor, the output, which it returns."""
    out = args[-1]
    assert isinstance(out, torch.Tensor)
    described = [_native.describe(a) if isinstance(a, torch.Tensor) else a for a in args]
    _native.call(name, *described, _native.stream_for(out))
    return out


def forward_gathered_into(
    src: torch.Tensor,
    sorted_pairs: torch.Tensor,
    top_k: int,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """The C ABI's forward into y (float32 or src's dtype; [rows, N] with rows <= the pairs),
    without autograd. Every tensor must stay alive until the call returns (pass named ones)."""
    return _call("tm_grouped_gemm_forward_gathered", src, sorted_pairs, top_k, w, expert_offsets, y)


@torch.library.custom_op("turbomoe::grouped_gemm_gathered", mutates_args=())
def _grouped_gemm_gathered(
    src: torch.Tensor,
    sorted_pairs: torch.Tensor,
    pair_to_row: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    rows: int,
) -> torch.Tensor:
    """y [rows, N]: row r = src[sorted_pairs[r] // top_k] · w[e]ᵀ (pair_to_row: backward only)."""
    w = _weight_operand(w)
    y = torch.empty((rows, w.shape[1]), dtype=src.dtype, device=src.device)
    return forward_gathered_into(src, sorted_pairs, top_k, w, expert_offsets, y)


@_grouped_gemm_gathered.register_fake
def _(
    src: torch.Tensor,
    sorted_pairs: torch.Tensor,
    pair_to_row: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    rows: int,
) -> torch.Tensor:
    return src.new_empty((rows, w.shape[1]))


@torch.library.custom_op("turbomoe::grouped_gemm_backward_weight_gathered", mutates_args=())
def _backward_weight_gathered(
    dy: torch.Tensor,
    x: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    w_dtype: torch.dtype,
    gather_dy: bool,
) -> torch.Tensor:
    """dw [E,N,K] = dy_eᵀ · x_e in w's dtype, with one operand's row r read from its token rows
    at sorted_pairs[r] // top_k: x's (x holds the tokens, dy the rows) or, with gather_dy, dy's
    (dy holds the tokens, x the rows)."""
    experts = expert_offsets.shape[0] - 1
    dw = torch.empty((experts, dy.shape[1], x.shape[1]), dtype=w_dtype, device=dy.device)
    name = "tm_grouped_gemm_backward_weight_gathered" + ("_dy" if gather_dy else "")
    return _call(name, dy, x, sorted_pairs, top_k, expert_offsets, dw)


@_backward_weight_gathered.register_fake
def _(
    dy: torch.Tensor,
    x: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    w_dtype: torch.dtype,
    gather_dy: bool,
) -> torch.Tensor:
    experts = expert_offsets.shape[0] - 1
    return dy.new_empty((experts, dy.shape[1], x.shape[1]), dtype=w_dtype)


@torch.library.custom_op("turbomoe::grouped_gemm_backward_input_gathered", mutates_args=())
def _backward_input_gathered(
    dy_src: torch.Tensor,
    sorted_pairs: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    rows: int,
) -> torch.Tensor:
    """dx [rows, K]: row r = dy_src[sorted_pairs[r] // top_k] · w[e] (w [E, N, K])."""
    w = _weight_operand(w)
    dx = torch.empty((rows, w.shape[2]), dtype=dy_src.dtype, device=dy_src.device)
    return _call(
        "tm_grouped_gemm_backward_input_gathered",
        dy_src,
        sorted_pairs,
        top_k,
        w,
        expert_offsets,
        dx,
    )


@_backward_input_gathered.register_fake
def _(
    dy_src: torch.Tensor,
    sorted_pairs: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    rows: int,
) -> torch.Tensor:
    return dy_src.new_empty((rows, w.shape[2]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    src, sorted_pairs, pair_to_row, w, expert_offsets, top_k, _rows = inputs
    need_src, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    # src's gradient needs w and pair_to_row; w's needs src and sorted_pairs: the token rows,
    # not a permuted copy, are what the backward keeps.
    ctx.save_for_backward(
        src if need_w else None,
        sorted_pairs,
        pair_to_row if need_src else None,
        w if need_src else None,
        expert_offsets,
    )
    ctx.need_src, ctx.need_w = need_src, need_w
    ctx.top_k, ctx.w_dtype = top_k, w.dtype


def _backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
    src, sorted_pairs, pair_to_row, w, expert_offsets = ctx.saved_tensors
    dy = dy.contiguous()
    grad_src = grad_w = None
    if ctx.need_src:
        grad_rows = _backward_input_eager(dy, w, expert_offsets)
        grad_src = _combine_eager(grad_rows, pair_to_row, None, ctx.top_k, None)
    if ctx.need_w:
        grad_w = _backward_weight_gathered_eager(
            dy, src, sorted_pairs, expert_offsets, ctx.top_k, ctx.w_dtype, False
        )
    return grad_src, None, None, grad_w, None, None, None


_grouped_gemm_gathered_eager = differentiable(_grouped_gemm_gathered, _setup_context, _backward)
_backward_weight_gathered_eager = direct(_backward_weight_gathered)
_backward_input_gathered_eager = direct(_backward_input_gathered)


def grouped_gemm_gathered(
    src: torch.Tensor,
    sorted_pairs: torch.Tensor,
    pair_to_row: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    rows: int,
) -> torch.Tensor:
    """``grouped_gemm(gather_rows(src, sorted_pairs, expert_offsets, top_k, rows=rows), w,
    expert_offsets)`` without the permuted copy of src, differentiable with respect to src and w.

    pair_to_row: permute_plan's, for src's T*top_k pairs (the gather's adjoint needs it).
    """
    if top_k <= 0:
        raise ValueError(f"top_k must be > 0, got {top_k}")
    if pair_to_row.shape[0] != src.shape[0] * top_k:
        raise ValueError(
            f"pair_to_row has {pair_to_row.shape[0]} entries, expected {src.shape[0] * top_k} "
            "(tokens * top_k)"
        )
    return _grouped_gemm_gathered_eager(
        src.contiguous(),
        sorted_pairs.contiguous(),
        pair_to_row.contiguous(),
        w,
        expert_offsets.contiguous(),
        top_k,
        rows,
    )
