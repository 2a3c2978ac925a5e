"""The expert-parallel MoE forward: route locally, send tokens to expert owners, compute, return.

Each rank routes its own tokens with its replica of the router; then for the experts of one
layer:

1. layout — ``ep_layout`` lists, for every destination rank, the tokens with at least one slot
   on it (each token once per rank), and ``permute_plan`` sorts the T·K (token, slot) pairs by
   destination rank (owner of the pair's expert); the per-destination token and pair counts are
   exchanged;
2. dispatch — the hidden row of every token goes once to each rank that owns one of its
   experts (deduplicated per destination rank), with the K local expert ids of that rank's
   slots (the sentinel for slots owned elsewhere);
3. the owner expands each received row into one row per local slot — in (source rank, token,
   slot) order, the order the pairs were sorted in on the source — and runs its local experts
   over them (``ops.moe_experts`` with one slot per row and weight 1);
4. combine — the per-pair expert outputs go back over the reverse exchange, and ``ops.combine``
   sums each token's K outputs weighted by the routing weights, in ascending slot order, so the
   result is deterministic and the gradient to the routing weights is computed on the token's
   own rank. (The return direction still carries one row per pair: deduplicating it needs the
   weights on the owner.)

The routing weights never cross the wire: the weighting happens where the router ran. Every row
copy is a ``gather_rows`` whose backward is a fixed-order ``combine``, so gradients are
deterministic too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from turbomoe import ops
from turbomoe.parallel.comm import all_to_all, exchange_counts
from turbomoe.parallel.mesh import EP_ATTR, ExpertShard


def expert_shard(module: nn.Module) -> ExpertShard | None:
    """The expert-parallel state of an experts module, or None when it is not sharded."""
    shard = getattr(module, EP_ATTR, None)
    return shard if isinstance(shard, ExpertShard) else None


class _Layout(NamedTuple):
    pair_to_row: torch.Tensor  # [T*K]: row of pair t*K+k among the returned per-pair outputs
    send_pairs: torch.Tensor  # [T*R]: (token, destination) cells t*R+r in send order, -1 past
    send_offsets: torch.Tensor  # [R+1]: exclusive prefix of the tokens sent to each rank
    cell_to_row: torch.Tensor  # [T*R]: inverse of send_pairs (-1 where t sends nothing to r)
    send_ids: torch.Tensor  # [sent tokens, K] int32: local ids on the destination, else sentinel
    token_send: list[int]  # tokens sent to each rank
    token_recv: list[int]  # tokens received from each rank
    pair_send: list[int]  # pairs sent to each rank
    pair_recv: list[int]  # pairs received from each rank


def _layout(shard: ExpertShard, top_k_index: torch.Tensor) -> _Layout:
    """Where each token and each pair goes, agreed with every peer.

    Invalid expert ids are reported to every rank through the count exchange, so all ranks raise
    together instead of leaving the others waiting in the next collective.
    """
    ids = top_k_index.to(torch.int64)
    tokens, top_k = ids.shape
    num_local, num_experts, ranks = shard.num_local, shard.num_experts, shard.ep_size
    invalid = (ids < 0) | (ids >= num_experts)
    bad = invalid.any()  # stays on the device: no extra sync
    owner = torch.div(ids.clamp(0, num_experts - 1), num_local, rounding_mode="floor")
    _sorted_pairs, pair_to_row, offsets = ops.permute_plan(owner, ranks)
    pair_counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    # Invalid ids become the dropped sentinel here: ep_layout would reject them on this rank only.
    safe = torch.where(invalid, num_experts, ids)
    rank_counts, _expert_counts, send_order, token_rank_slot = ops.ep_layout(
        safe, num_experts, ranks
    )
    token_counts = rank_counts.to(torch.int64)
    # Column 2 carries this rank's "bad ids" flag to every peer.
    flags = bad.to(torch.int64).expand_as(token_counts)
    send, recv = exchange_counts(
        torch.stack([token_counts, pair_counts, flags], dim=1).reshape(-1), shard.group
    )
    if any(recv[2::3]):
        raise ValueError(
            f"expert ids outside [0, {num_experts}) reached the expert-parallel dispatch "
            "(on this rank or a peer)"
        )
    token_send, token_recv = send[0::3], recv[0::3]
    sent = sum(token_send)
    send_offsets = torch.cat([token_counts.new_zeros(1), token_counts.cumsum(0)]).to(torch.int32)
    # The destination rank of each sent row, without a host sync.
    cells = torch.arange(tokens * ranks, dtype=torch.int32, device=ids.device)
    row_rank = torch.searchsorted(send_offsets[1:], cells, right=True)
    in_use = cells < sent
    tokens_of_rows = send_order.to(torch.int64).clamp_min(0)
    send_pairs = torch.where(in_use, tokens_of_rows * ranks + row_rank, -1).to(torch.int32)
    cell_to_row = torch.where(
        token_rank_slot >= 0, token_rank_slot + send_offsets[:-1].unsqueeze(0), -1
    ).reshape(-1)
    row_owner = safe.index_select(0, tokens_of_rows[:sent]) // num_local  # sentinel → ranks
    mine = row_owner == row_rank[:sent].unsqueeze(1).to(torch.int64)
    row_ids = safe.index_select(0, tokens_of_rows[:sent]).remainder(num_local)
    send_ids = torch.where(mine, row_ids, num_local).to(torch.int32).reshape(sent, top_k)
    return _Layout(
        pair_to_row,
        send_pairs,
        send_offsets,
        cell_to_row.to(torch.int32).contiguous(),
        send_ids,
        token_send,
        token_recv,
        send[1::3],
        recv[1::3],
    )


def _expand(
    received: torch.Tensor, received_ids: torch.Tensor, num_local: int, pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per local slot of each received token row, in (row, slot) order, with its id."""
    rows, top_k = received_ids.shape
    flat_ids = received_ids.reshape(-1)
    valid = flat_ids < num_local
    # The valid cells row*K + k ascending (a stable sort puts them first), without a host sync.
    cells = torch.argsort((~valid).to(torch.int8), stable=True).to(torch.int32)
    cells = torch.where(torch.arange(rows * top_k, device=cells.device) < pairs, cells, -1)
    offsets = torch.tensor([0, pairs], dtype=torch.int32, device=cells.device)
    expanded = ops.gather_rows(received, cells, offsets, top_k)[:pairs]
    expanded_ids = flat_ids.index_select(0, cells[:pairs].clamp_min(0).to(torch.int64))
    return expanded, expanded_ids


def ep_experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts computation of a sharded experts module: [T,H] → [T,H].

    Same contract as transformers' experts functions: top_k_index [T,K] holds global expert ids
    (from this rank's router), top_k_weights [T,K] the routing weights. Every rank of the
    expert-parallel group must call this for the same layer at the same time (it is a
    collective); a rank with no tokens still calls it with T = 0.
    """
    shard = expert_shard(module)
    if shard is None:
        raise ValueError(f"{type(module).__name__} is not sharded by turbomoe.parallel")
    if hidden_states.dim() != 2 or top_k_index.dim() != 2:
        raise ValueError(
            f"hidden_states must be [T, H] and top_k_index [T, K], got "
            f"{tuple(hidden_states.shape)} and {tuple(top_k_index.shape)}"
        )
    top_k = top_k_index.shape[1]
    group = shard.group
    lay = _layout(shard, top_k_index)

    sent = sum(lay.token_send)
    rows = ops.gather_rows(
        hidden_states, lay.send_pairs, lay.send_offsets, shard.ep_size, pair_to_row=lay.cell_to_row
    )[:sent]
    received_rows = all_to_all(rows, lay.token_recv, lay.token_send, group)
    received_row_ids = all_to_all(lay.send_ids, lay.token_recv, lay.token_send, group)
    received, received_ids = _expand(
        received_rows, received_row_ids, shard.num_local, sum(lay.pair_recv)
    )

    gate_up, down = module.gate_up_proj, module.down_proj
    if gate_up.dtype != received.dtype:  # e.g. autocast over float32 master weights
        gate_up, down = gate_up.to(received.dtype), down.to(received.dtype)
    count = received.shape[0]
    outputs = ops.moe_experts(
        received,
        received_ids.view(count, 1),
        received.new_ones((count, 1), dtype=top_k_weights.dtype),
        gate_up,
        down,
        activation="silu",
        interleaved=not getattr(module, "is_concatenated", True),
    )

    returned = all_to_all(outputs, lay.pair_send, lay.pair_recv, group)
    out = ops.combine(returned, lay.pair_to_row, top_k_weights, top_k)
    return out.to(hidden_states.dtype)
