"""Expert placement by load: which expert-parallel rank should own which experts.

By default rank r owns the contiguous block of experts [r·E/R, (r+1)·E/R). Real routing is skewed
(the bench model sends ~15× the mean rows to its hottest experts and none to most), so the rank
that owns the hot experts receives 1.3–2.4× the mean rows at EP 4 and every other rank waits for
it at each layer's exchange (docs/perf-notes.md). A placement that spreads the load evens it out.

- :func:`plan_placement`: longest-processing-time-first with equal capacity, i.e. the experts in
  descending order of rows, each to the least-loaded rank that still has a free slot. Every rank
  keeps E/R experts, so the sharded weights keep their shapes.
- :func:`place_experts`: moves a parallelized model's experts to given slots (per layer). The
  experts module then maps the router's expert ids to slots before the dispatch; checkpoints and
  gathered weights stay in expert order (HF's keys and layout are unchanged).
- :func:`balance_experts`: counts one batch's routing and places every layer's experts by it.

Place experts before the first backward, or between steps with the optimizer passed along: the
parameters keep their identity while their contents move between ranks, and an optimizer's
per-parameter states (AdamW's moments) must move with them.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from turbomoe.parallel.checkpoint import gather_experts
from turbomoe.parallel.dispatch import expert_shard
from turbomoe.parallel.mesh import EP_ATTR, ExpertShard
from turbomoe.parallel.routing_counts import RoutingRecorder
from turbomoe.parallel.shard import EXPERT_WEIGHTS, find_experts


def plan_placement(rows: torch.Tensor, ranks: int) -> torch.Tensor:
    """Slot of each expert (int64 [E]): rank ``slot // (E // ranks)`` owns expert e.

    ``rows``: rows (or any load) per expert, [E]. Experts in descending order of load (ties by
    index) go to the least-loaded rank with room (ties by rank), and take that rank's slots in
    order. Deterministic, so every rank computes the same placement from the same counts.
    """
    if rows.dim() != 1:
        raise ValueError(f"rows must be [E], got shape {tuple(rows.shape)}")
    experts = rows.shape[0]
    if ranks < 1 or experts % ranks != 0:
        raise ValueError(f"{experts} experts cannot be split evenly over {ranks} ranks")
    per_rank = experts // ranks
    load = [float(v) for v in rows.detach().to(torch.float64).cpu()]
    if any(v < 0 or v != v for v in load):
        raise ValueError("rows must be finite and non-negative")
    order = sorted(range(experts), key=lambda e: (-load[e], e))
    heap = [(0.0, r) for r in range(ranks)]  # (load so far, rank) of ranks with a free slot
    used = [0] * ranks
    slot = torch.empty(experts, dtype=torch.int64)
    for e in order:
        total, r = heapq.heappop(heap)
        slot[e] = r * per_rank + used[r]
        used[r] += 1
        if used[r] < per_rank:
            heapq.heappush(heap, (total + load[e], r))
    return slot


def rank_loads(rows: torch.Tensor, ranks: int, slot: torch.Tensor | None = None) -> torch.Tensor:
    """Rows each rank receives ([ranks], float64) when expert e sits at ``slot[e]`` (None: the
    contiguous blocks)."""
    experts = rows.shape[-1]
    if experts % ranks != 0:
        raise ValueError(f"{experts} experts cannot be split evenly over {ranks} ranks")
    owner = (torch.arange(experts) if slot is None else slot.cpu()) // (experts // ranks)
    loads = torch.zeros(ranks, dtype=torch.float64)
    return loads.index_add_(0, owner, rows.detach().to(torch.float64).cpu())


def _sharded_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in find_experts(model) if expert_shard(m) is not None]


def place_experts(
    model: nn.Module,
    slots: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Put expert e of the i-th sharded MoE layer at slot ``slots[i][e]`` (a collective: every
    rank calls it with the same slots). Validates everything before moving anything.

    With ``optimizer``, its per-parameter states shaped like an expert weight (AdamW's moments)
    move with the weights, so placement can be planned again between steps; without one, call it
    before the optimizer holds any state. Never with gradients pending (between a backward and
    ``zero_grad(set_to_none=True)``)."""
    experts = _sharded_experts(model)
    if not experts:
        raise ValueError("place_experts needs a model parallelized with ep_size > 1")
    if len(slots) != len(experts):
        raise ValueError(f"{len(slots)} placements for {len(experts)} sharded MoE layers")
    for (name, module), slot in zip(experts, slots, strict=True):
        count = expert_shard(module).num_experts  # type: ignore[union-attr]
        if slot.shape != (count,) or sorted(slot.tolist()) != list(range(count)):
            raise ValueError(f"{name}: the slots must be a permutation of 0..{count - 1}")
        for weight in EXPERT_WEIGHTS:
            param = getattr(module, weight)
            if param.grad is not None:
                raise ValueError(
                    f"{name}.{weight} has a gradient: place experts before the first backward, "
                    "or between steps after zero_grad(set_to_none=True)"
                )
    for (_, module), slot in zip(experts, slots, strict=True):
        shard = expert_shard(module)
        assert shard is not None
        first, last = shard.expert_range
        held = torch.argsort(slot)[first:last]  # the experts of my new slots, in slot order
        for weight in EXPERT_WEIGHTS:
            param = getattr(module, weight)
            param.data = _moved(param.detach(), shard, held)
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = _moved(value, shard, held)
        placed = slot.to(device=getattr(module, EXPERT_WEIGHTS[0]).device, dtype=torch.int64)
        setattr(module, EP_ATTR, dataclasses.replace(shard, slot_of=placed))


def _moved(local: torch.Tensor, shard: ExpertShard, held: torch.Tensor) -> torch.Tensor:
    """This rank's block of a [E, ...] expert tensor after the move: every rank's block gathered
    in expert order, then the experts ``held`` (a collective)."""
    full = gather_experts(local, shard)
    return full.index_select(0, held.to(full.device)).contiguous()


def expert_slots(model: nn.Module) -> list[torch.Tensor] | None:
    """Each sharded MoE layer's slots (CPU int64 [E]), as :func:`place_experts` takes them, or
    None while every layer keeps its contiguous blocks."""
    shards = [expert_shard(m) for _, m in _sharded_experts(model)]
    if not any(s is not None and s.slot_of is not None for s in shards):
        return None
    return [
        torch.arange(s.num_experts) if s.slot_of is None else s.slot_of.detach().cpu()
        for s in shards
        if s is not None
    ]


@torch.no_grad()
def balance_experts(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
) -> list[torch.Tensor]:
    """Run one forward of ``batch`` (this rank's model inputs; labels are ignored), count every
    layer's routing over all ranks, and place each layer's experts by it
    (:func:`plan_placement`, :func:`place_experts`, which moves ``optimizer``'s states too).
    A collective. Returns the slots placed."""
    experts = _sharded_experts(model)
    if not experts:
        raise ValueError("balance_experts needs a model parallelized with ep_size > 1")
    ranks = expert_shard(experts[0][1]).ep_size  # type: ignore[union-attr]
    recorder = RoutingRecorder(model)
    recorder.active = True
    try:
        model(**{key: value for key, value in batch.items() if key != "labels"})
    finally:
        recorder.close()
    table = recorder.counts()
    if table is None or table.shape[0] != len(experts):
        raise RuntimeError("the forward did not route through every sharded MoE layer")
    slots = [plan_placement(rows, ranks) for rows in table]
    place_experts(model, slots, optimizer)
    return slots
