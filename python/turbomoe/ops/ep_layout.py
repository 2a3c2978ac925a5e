"""Expert-parallel layout as a torch custom op: which tokens each rank receives.

With the E experts owned in R contiguous blocks of E/R, ``ep_layout`` lists for every destination
rank the tokens that have at least one top-k slot on it, each token once per rank however many of
its slots that rank owns. An all-to-all can then send one hidden row per (token, destination rank)
instead of one per (token, slot) pair. Deterministic; not differentiable (integer outputs).

``ep_send_plan`` turns that placement into the send side of a fixed-block exchange (C rows per
destination rank): which token each send row carries, the inverse map, and each row's local
expert ids and routing weights in one float32 tensor, in one kernel. It is differentiable with
respect to the routing weights (their gradient comes back through the exchange).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct


def _layout_outputs(
    ids: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (rank_counts, expert_counts, send_order, token_rank_slot); also the fake."""
    tokens = ids.shape[0]
    return (
        ids.new_empty((num_ranks,), dtype=torch.int32),
        ids.new_empty((num_experts,), dtype=torch.int32),
        ids.new_empty((tokens * num_ranks,), dtype=torch.int32),
        ids.new_empty((tokens, num_ranks), dtype=torch.int32),
    )


@torch.library.custom_op("turbomoe::ep_layout", mutates_args=())
def _ep_layout(
    ids: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = ids.shape[0]
    outputs = _layout_outputs(ids, num_experts, num_ranks)
    rank_counts, expert_counts, send_order, token_rank_slot = outputs
    nbytes = _native.workspace_size(
        "tm_ep_layout_workspace_size", tokens, num_experts, num_ranks, _native.device_code(ids)
    )
    workspace = _native.workspace(nbytes, ids)
    _native.call(
        "tm_ep_layout",
        _native.describe(ids),
        num_experts,
        num_ranks,
        _native.describe(rank_counts),
        _native.describe(expert_counts),
        _native.describe(send_order),
        _native.describe(token_rank_slot),
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(ids),
    )
    return outputs


_ep_layout.register_fake(_layout_outputs)


_ep_layout_eager = direct(_ep_layout)


def ep_layout(
    ids: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert-parallel send layout of ids [T,K] (int32/int64), experts in blocks of E/R.

    Returns (rank_counts int32 [R], expert_counts int32 [E], send_order int32 [T*R],
    token_rank_slot int32 [T,R]): rank_counts[r] tokens go to rank r (each token once);
    expert_counts[e] is the number of (token, slot) pairs routed to expert e; send_order lists,
    rank after rank, the token ids sent to each rank in ascending order (rank r's block starts at
    the exclusive prefix of rank_counts; the tail is -1); token_rank_slot[t, r] is token t's
    position inside rank r's block, or -1. An id equal to num_experts is the dropped sentinel.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, K], got shape {tuple(ids.shape)}")
    return _ep_layout_eager(ids.contiguous(), int(num_experts), int(num_ranks))


# ------------------------------------------------------------------------------ send plan


def _send_plan_outputs(
    ids: torch.Tensor, rank_counts: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (send_pairs, pair_to_row, meta, bad_ids); also the fake's outputs."""
    ranks, top_k = rank_counts.shape[0], ids.shape[1]
    cells = (capacity + 1) * ranks
    return (
        ids.new_empty((cells,), dtype=torch.int32),
        ids.new_empty((cells,), dtype=torch.int32),
        ids.new_empty((ranks * capacity, 2 * top_k), dtype=torch.float32),
        ids.new_empty((1,), dtype=torch.int32),
    )


@torch.library.custom_op("turbomoe::ep_send_plan", mutates_args=())
def _ep_send_plan(
    ids: torch.Tensor,
    weights: torch.Tensor,
    rank_counts: torch.Tensor,
    send_order: torch.Tensor,
    token_rank_slot: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = _send_plan_outputs(ids, rank_counts, capacity)
    send_pairs, pair_to_row, meta, bad = outputs
    _native.call(
        "tm_ep_send_plan",
        _native.describe(ids),
        _native.describe(weights),
        _native.describe(rank_counts),
        _native.describe(send_order),
        _native.describe(token_rank_slot),
        num_experts,
        capacity,
        _native.describe(send_pairs),
        _native.describe(pair_to_row),
        _native.describe(meta),
        _native.describe(bad),
        _native.stream_for(ids),
    )
    return outputs


@_ep_send_plan.register_fake
def _(
    ids: torch.Tensor,
    weights: torch.Tensor,
    rank_counts: torch.Tensor,
    send_order: torch.Tensor,
    token_rank_slot: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _send_plan_outputs(ids, rank_counts, capacity)


@torch.library.custom_op("turbomoe::ep_send_plan_backward", mutates_args=())
def _ep_send_plan_backward(
    grad_meta: torch.Tensor,
    ids: torch.Tensor,
    token_rank_slot: torch.Tensor,
    num_experts: int,
    capacity: int,
    weights_dtype: torch.dtype,
) -> torch.Tensor:
    grad_weights = torch.empty(ids.shape, dtype=weights_dtype, device=ids.device)
    _native.call(
        "tm_ep_send_plan_backward",
        _native.describe(grad_meta),
        _native.describe(ids),
        _native.describe(token_rank_slot),
        num_experts,
        capacity,
        _native.describe(grad_weights),
        _native.stream_for(ids),
    )
    return grad_weights


@_ep_send_plan_backward.register_fake
def _(
    grad_meta: torch.Tensor,
    ids: torch.Tensor,
    token_rank_slot: torch.Tensor,
    num_experts: int,
    capacity: int,
    weights_dtype: torch.dtype,
) -> torch.Tensor:
    return ids.new_empty(ids.shape, dtype=weights_dtype)


def _send_plan_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ids, weights, _counts, _order, token_rank_slot, num_experts, capacity = inputs
    ctx.save_for_backward(ids, token_rank_slot)
    ctx.num_experts, ctx.capacity, ctx.weights_dtype = num_experts, capacity, weights.dtype
    send_pairs, pair_to_row, _meta, bad = output
    ctx.mark_non_differentiable(send_pairs, pair_to_row, bad)


def _send_plan_backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
    grad_meta = grads[2]
    none = (None,) * 5
    if grad_meta is None or not ctx.needs_input_grad[1]:
        return (None, None, *none)
    ids, token_rank_slot = ctx.saved_tensors
    grad_weights = _ep_send_plan_backward_eager(
        grad_meta.float(), ids, token_rank_slot, ctx.num_experts, ctx.capacity, ctx.weights_dtype
    )
    return (None, grad_weights, *none)


_ep_send_plan_eager = differentiable(_ep_send_plan, _send_plan_setup, _send_plan_backward)
_ep_send_plan_backward_eager = direct(_ep_send_plan_backward)


class SendPlan(NamedTuple):
    send_pairs: torch.Tensor  # [(C+1)·R] int32: the cell t·R + r each send row reads
    pair_to_row: torch.Tensor  # [(C+1)·R] int32: the send row of each cell, -1 where none
    meta: torch.Tensor  # [R·C, 2K] float32: local expert ids (E/R elsewhere), then weights
    bad_ids: torch.Tensor  # [1] int32: ids outside [0, E) (treated as dropped)
    token_rank_slot: torch.Tensor  # [T, R] int32: token t's position in rank r's block, or -1


def ep_send_plan(
    ids: torch.Tensor, weights: torch.Tensor, num_experts: int, num_ranks: int, capacity: int
) -> SendPlan:
    """The send side of a fixed-block expert-parallel exchange of ids/weights [T,K].

    Every destination rank r receives ``capacity`` rows (C >= T): row r·C + s carries the token
    at position s of r's block (``ep_layout``'s placement), later rows are padding. Cells are the
    (token, rank) pairs t·R + r of the tokens padded to C+1 (cell T·R, a zero token, feeds every
    padding row, so ``gather_rows`` over the padded tokens fills the send buffer). ``meta`` holds
    per send row its K slots' expert ids local to the destination (E/R where a slot's expert
    lives elsewhere, and on padding rows) and then their routing weights (0 there), as float32:
    one tensor for one exchange. Differentiable with respect to ``weights`` through ``meta``.
    Ids outside [0, E) are counted in ``bad_ids`` and dropped.
    """
    if ids.dim() != 2 or weights.shape != ids.shape:
        raise ValueError(
            f"ids and weights must both be [T, K], got {tuple(ids.shape)} and "
            f"{tuple(weights.shape)}"
        )
    ids = ids.contiguous()
    counts, _experts, order, slot = _ep_layout_eager(ids, int(num_experts), int(num_ranks))
    pairs, to_row, meta, bad = _ep_send_plan_eager(
        ids, weights.contiguous(), counts, order, slot, int(num_experts), int(capacity)
    )
    return SendPlan(pairs, to_row, meta, bad, slot)
