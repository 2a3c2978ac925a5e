"""Expert-parallel layout as a torch custom op: which tokens each rank receives.

With the E experts owned in R contiguous blocks of E/R, ``ep_layout`` lists for every destination
rank the tokens that have at least one top-k slot on it, each token once per rank however many of
its slots that rank owns. An all-to-all can then send one hidden row per (token, destination rank)
instead of one per (token, slot) pair. Deterministic; not differentiable (integer outputs).
"""

from __future__ import annotations

import torch

from turbomoe import _native
from turbomoe.ops._eager import direct


@torch.library.custom_op("turbomoe::ep_layout", mutates_args=())
def _ep_layout(
    ids: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = ids.shape[0]
    rank_counts = torch.empty((num_ranks,), dtype=torch.int32, device=ids.device)
    expert_counts = torch.empty((num_experts,), dtype=torch.int32, device=ids.device)
    send_order = torch.empty((tokens * num_ranks,), dtype=torch.int32, device=ids.device)
    token_rank_slot = torch.empty((tokens, num_ranks), dtype=torch.int32, device=ids.device)
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
    return rank_counts, expert_counts, send_order, token_rank_slot


@_ep_layout.register_fake
def _(
    ids: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = ids.shape[0]
    return (
        ids.new_empty((num_ranks,), dtype=torch.int32),
        ids.new_empty((num_experts,), dtype=torch.int32),
        ids.new_empty((tokens * num_ranks,), dtype=torch.int32),
        ids.new_empty((tokens, num_ranks), dtype=torch.int32),
    )


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
