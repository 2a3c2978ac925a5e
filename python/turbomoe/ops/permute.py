"""Token permutation for the grouped expert GEMMs, as torch custom ops.

``permute_plan`` sorts the T*K (token, slot) pairs by expert with a stable counting sort, so each
expert's rows are contiguous and the grouped GEMM needs only the offsets; ``gather_rows`` copies
token rows into that order and ``combine`` sums each token's K expert outputs back (weighted by
the routing weights). Each is the other's backward, and combine sums in a fixed slot order, so
results are deterministic (unlike an ``index_add_`` scatter).
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct


@torch.library.custom_op("turbomoe::permute_plan", mutates_args=())
def _permute_plan(
    ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = ids.numel()
    sorted_pairs = torch.empty((pairs,), dtype=torch.int32, device=ids.device)
    pair_to_row = torch.empty((pairs,), dtype=torch.int32, device=ids.device)
    offsets = torch.empty((num_experts + 1,), dtype=torch.int32, device=ids.device)
    nbytes = _native.workspace_size(
        "tm_permute_plan_workspace_size", pairs, num_experts, _native.device_code(ids)
    )
    workspace = _native.workspace(nbytes, ids)
    _native.call(
        "tm_permute_plan",
        _native.describe(ids),
        num_experts,
        _native.describe(sorted_pairs),
        _native.describe(pair_to_row),
        _native.describe(offsets),
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(ids),
    )
    return sorted_pairs, pair_to_row, offsets


@_permute_plan.register_fake
def _(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = ids.numel()
    return (
        ids.new_empty((pairs,), dtype=torch.int32),
        ids.new_empty((pairs,), dtype=torch.int32),
        ids.new_empty((num_experts + 1,), dtype=torch.int32),
    )


_permute_plan_eager = direct(_permute_plan)


def permute_plan(
    ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs of ids [T,K] by expert.

    Returns (sorted_pairs int32 [T*K], pair_to_row int32 [T*K], expert_offsets int32 [E+1]):
    row r of the permuted layout holds pair sorted_pairs[r] (pair p = t*K + k), pair_to_row is the
    inverse (-1 for dropped pairs), and expert e owns rows [offsets[e], offsets[e+1]). An id equal
    to num_experts is Hugging Face's expert-parallel "not on this rank" sentinel: the pair is
    dropped. Not differentiable.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, K], got shape {tuple(ids.shape)}")
    return _permute_plan_eager(ids.contiguous(), int(num_experts))


# ------------------------------------------------------------------------------------- combine


@torch.library.custom_op("turbomoe::combine", mutates_args=())
def _combine(
    rows: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor | None,
    top_k: int,
    expert_offsets: torch.Tensor | None,
) -> torch.Tensor:
    # expert_offsets is for the backward only (see combine).
    tokens = pair_to_row.shape[0] // top_k
    out = torch.empty((tokens, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    _native.call(
        "tm_combine_forward",
        _native.describe(rows),
        _native.describe(pair_to_row),
        _native.describe(weights),
        _native.describe(out),
        _native.stream_for(rows),
    )
    return out


@_combine.register_fake
def _(
    rows: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor | None,
    top_k: int,
    expert_offsets: torch.Tensor | None,
) -> torch.Tensor:
    return rows.new_empty((pair_to_row.shape[0] // top_k, rows.shape[1]))


@torch.library.custom_op("turbomoe::combine_backward", mutates_args=())
def _combine_backward(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor,
    expert_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_rows [M,H], grad_weights [T,K]) of a weighted combine."""
    grad_rows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    grad_weights = torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
    _native.call(
        "tm_combine_backward",
        _native.describe(grad_out),
        _native.describe(rows),
        _native.describe(pair_to_row),
        _native.describe(weights),
        _native.describe(expert_offsets),
        _native.describe(grad_rows),
        _native.describe(grad_weights),
        _native.stream_for(grad_out),
    )
    return grad_rows, grad_weights


@_combine_backward.register_fake
def _(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor,
    expert_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.new_empty(rows.shape), weights.new_empty(weights.shape)


@torch.library.custom_op("turbomoe::combine_backward_rows", mutates_args=())
def _combine_backward_rows(
    grad_out: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor | None,
    num_rows: int,
    expert_offsets: torch.Tensor | None,
) -> torch.Tensor:
    """grad_rows [M,H] only: the routing weights are absent or need no gradient."""
    grad_rows = torch.empty(
        (num_rows, grad_out.shape[1]), dtype=grad_out.dtype, device=grad_out.device
    )
    _native.call(
        "tm_combine_backward",
        _native.describe(grad_out),
        None,
        _native.describe(pair_to_row),
        _native.describe(weights),
        _native.describe(expert_offsets),
        _native.describe(grad_rows),
        None,
        _native.stream_for(grad_out),
    )
    return grad_rows


@_combine_backward_rows.register_fake
def _(
    grad_out: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor | None,
    num_rows: int,
    expert_offsets: torch.Tensor | None,
) -> torch.Tensor:
    return grad_out.new_empty((num_rows, grad_out.shape[1]))


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    rows, pair_to_row, weights, _top_k, expert_offsets = inputs
    ctx.num_rows = rows.shape[0]
    ctx.weights_grad = weights is not None and ctx.needs_input_grad[2]
    # rows are only needed for the weights' gradient; keep them alive only then.
    ctx.save_for_backward(rows if ctx.weights_grad else None, pair_to_row, weights, expert_offsets)


def _combine_backward_fn(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    rows, pair_to_row, weights, expert_offsets = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    if ctx.weights_grad:
        grad_rows, grad_weights = _combine_backward_eager(
            grad_out, rows, pair_to_row, weights, expert_offsets
        )
        return grad_rows, None, grad_weights, None, None
    grad_rows = _combine_backward_rows_eager(
        grad_out, pair_to_row, weights, ctx.num_rows, expert_offsets
    )
    return grad_rows, None, None, None, None


_combine_eager = differentiable(_combine, _combine_setup, _combine_backward_fn)
_combine_backward_eager = direct(_combine_backward)
_combine_backward_rows_eager = direct(_combine_backward_rows)


def combine(
    rows: torch.Tensor,
    pair_to_row: torch.Tensor,
    weights: torch.Tensor | None,
    top_k: int,
    *,
    expert_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = Σ_k weights[t,k] · rows[pair_to_row[t*K+k]] → [T,H] (dropped pairs skipped).

    weights None means all ones (then this is the backward of gather_rows). Differentiable with
    respect to rows and weights; the k-sum runs in ascending slot order, so it is deterministic.
    ``expert_offsets``: permute_plan's offsets when pair_to_row is its plan's. They promise that
    the pairs fill rows [0, offsets[-1]) exactly, so the backward clears only the rows after
    those instead of writing zeros over the whole [M, H] gradient before the mapped rows (the
    CPU checks the promise; CUDA cannot without a host sync).
    """
    if top_k <= 0:
        raise ValueError(f"top_k must be > 0, got {top_k}")
    return _combine_eager(
        rows.contiguous(),
        pair_to_row.contiguous(),
        None if weights is None else weights.contiguous(),
        int(top_k),
        None if expert_offsets is None else expert_offsets.contiguous(),
    )


# ------------------------------------------------------------------------------------- gather


@torch.library.custom_op("turbomoe::gather_rows", mutates_args=())
def _gather_rows(
    x: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_offsets: torch.Tensor,
    pair_to_row: torch.Tensor,
    top_k: int,
    num_rows: int,
) -> torch.Tensor:
    """dst[r] = x[sorted_pairs[r] // top_k] for num_rows rows; pair_to_row is only carried for
    the backward."""
    out = torch.empty((num_rows, x.shape[1]), dtype=x.dtype, device=x.device)
    _native.call(
        "tm_gather_rows",
        _native.describe(x),
        _native.describe(sorted_pairs),
        _native.describe(expert_offsets),
        top_k,
        _native.describe(out),
        _native.stream_for(x),
    )
    return out


@_gather_rows.register_fake
def _(
    x: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_offsets: torch.Tensor,
    pair_to_row: torch.Tensor,
    top_k: int,
    num_rows: int,
) -> torch.Tensor:
    return x.new_empty((num_rows, x.shape[1]))


def _gather_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _x, _sorted_pairs, _offsets, pair_to_row, top_k, _num_rows = inputs
    ctx.save_for_backward(pair_to_row)
    ctx.top_k = top_k


def _gather_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    (pair_to_row,) = ctx.saved_tensors
    # The adjoint of a row gather is an unweighted combine (each token sums its K rows).
    grad_x = _combine_eager(grad_out.contiguous(), pair_to_row, None, ctx.top_k, None)
    return grad_x, None, None, None, None, None


_gather_rows_eager = differentiable(_gather_rows, _gather_setup, _gather_backward)


def invert_sorted_pairs(sorted_pairs: torch.Tensor) -> torch.Tensor:
    """pair_to_row from sorted_pairs (rows holding -1 are ignored), without a host sync."""
    pairs = sorted_pairs.shape[0]
    target = torch.where(sorted_pairs < 0, pairs, sorted_pairs).to(torch.int64)
    inverse = torch.full((pairs + 1,), -1, dtype=torch.int32, device=sorted_pairs.device)
    rows = torch.arange(pairs, dtype=torch.int32, device=sorted_pairs.device)
    inverse.scatter_(0, target, rows)
    return inverse[:pairs].contiguous()


def gathered_rows(sorted_pairs: torch.Tensor, rows: int | None) -> int:
    """The rows a gather over ``sorted_pairs`` returns: all its pairs, or the ``rows`` a caller
    that knows how many are routed asks for (checked against the pairs)."""
    pairs = sorted_pairs.shape[0]
    if rows is None:
        return pairs
    if not 0 <= rows <= pairs:
        raise ValueError(f"rows must be in [0, {pairs}] (the pairs of sorted_pairs), got {rows}")
    return rows


def gather_rows(
    x: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    *,
    pair_to_row: torch.Tensor | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """Token rows in expert order: out[r] = x[sorted_pairs[r] // top_k] → [P, H].

    Rows past expert_offsets[E] (dropped pairs) are zero, and so are rows whose pair names a
    token past x (sorted_pairs may have P >= T*K entries: the expert-parallel dispatch pads its
    blocks that way). ``rows``: return only that many rows instead of P, for a caller that knows
    how many pairs are routed (it must be at least expert_offsets[E]; the CPU checks it, on CUDA
    the copy stops at ``rows``). Differentiable with respect to x; the backward is an unweighted
    combine, which needs pair_to_row for x's T*K pairs: pass the one permute_plan returned (or
    its first T*K entries), or it is rebuilt from sorted_pairs.
    """
    if top_k <= 0:
        raise ValueError(f"top_k must be > 0, got {top_k}")
    rows = gathered_rows(sorted_pairs, rows)
    if pair_to_row is None:
        pair_to_row = invert_sorted_pairs(sorted_pairs)[: x.shape[0] * top_k]
    if pair_to_row.shape[0] != x.shape[0] * top_k:
        raise ValueError(
            f"pair_to_row has {pair_to_row.shape[0]} entries; x's {x.shape[0]} tokens have "
            f"{x.shape[0] * top_k} pairs"
        )
    return _gather_rows_eager(
        x.contiguous(),
        sorted_pairs.contiguous(),
        expert_offsets.contiguous(),
        pair_to_row.contiguous(),
        int(top_k),
        int(rows),
    )
