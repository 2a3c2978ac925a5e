"""The expert-parallel MoE forward: route locally, send pairs to expert owners, compute, return.

Each rank routes its own tokens with its replica of the router; then for the experts of one
layer:

1. layout — the T·K (token, slot) pairs are sorted by destination rank (owner of the pair's
   expert) with ``permute_plan``, and the per-destination counts are exchanged;
2. dispatch — the hidden row of every pair goes to its owner, with the expert's local id. A
   token whose K experts share an owner is sent once per pair, not once per owner: per-owner
   deduplication (DeepEP's) is a later optimisation for the NVLink path;
3. the owner runs its local experts over the rows it received (``ops.moe_experts`` with one
   slot per row and weight 1);
4. combine — the expert outputs go back over the reverse exchange, and ``ops.combine`` sums each
   token's K outputs weighted by the routing weights, in ascending slot order, so the result is
   deterministic and the gradient to the routing weights is computed on the token's own rank.

The routing weights never cross the wire: the weighting happens where the router ran.
"""

from __future__ import annotations

import torch
from torch import nn

from turbomoe import ops
from turbomoe.parallel.comm import all_to_all, exchange_counts
from turbomoe.parallel.mesh import EP_ATTR, ExpertShard


def expert_shard(module: nn.Module) -> ExpertShard | None:
    """The expert-parallel state of an experts module, or None when it is not sharded."""
    shard = getattr(module, EP_ATTR, None)
    return shard if isinstance(shard, ExpertShard) else None


def _layout(
    shard: ExpertShard, top_k_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Sort pairs by owner and agree with every peer on the split sizes.

    Returns (sorted_pairs, pair_to_row, owner_offsets, local_ids in send order, send counts,
    receive counts). Invalid expert ids are reported to every rank through the count exchange,
    so all ranks raise together instead of leaving the others waiting in the next collective.
    """
    ids = top_k_index.to(torch.int64)
    num_local = shard.num_local
    bad = ((ids < 0) | (ids >= shard.num_experts)).any()  # stays on the device: no extra sync
    owner = torch.div(ids.clamp(0, shard.num_experts - 1), num_local, rounding_mode="floor")
    sorted_pairs, pair_to_row, offsets = ops.permute_plan(owner, shard.ep_size)
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    # Column 1 carries this rank's "bad ids" flag to every peer.
    flags = bad.to(torch.int64).expand_as(counts)
    send, recv = exchange_counts(torch.stack([counts, flags], dim=1).reshape(-1), shard.group)
    if any(recv[1::2]):
        raise ValueError(
            f"expert ids outside [0, {shard.num_experts}) reached the expert-parallel dispatch "
            "(on this rank or a peer)"
        )
    local_ids = ids.remainder(num_local).reshape(-1).index_select(0, sorted_pairs.to(torch.int64))
    return sorted_pairs, pair_to_row, offsets, local_ids.to(torch.int32), send[0::2], recv[0::2]


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
    sorted_pairs, pair_to_row, offsets, local_ids, send, recv = _layout(shard, top_k_index)

    rows = ops.gather_rows(hidden_states, sorted_pairs, offsets, top_k, pair_to_row=pair_to_row)
    received = all_to_all(rows, recv, send, group)
    received_ids = all_to_all(local_ids, recv, send, group)

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

    returned = all_to_all(outputs, send, recv, group)
    out = ops.combine(returned, pair_to_row, top_k_weights, top_k)
    return out.to(hidden_states.dtype)
