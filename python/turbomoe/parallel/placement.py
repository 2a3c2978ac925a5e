"""Expert placement by load: which expert-parallel rank should own which experts.

Today rank r owns the contiguous block of experts [r·E/R, (r+1)·E/R). Real routing is skewed (the
bench model sends ~15× the mean rows to its hottest experts and none to most), so the rank that
owns the hot experts receives 1.3–2.4× the mean rows at EP 4 and every other rank waits for it at
each layer's exchange (docs/perf-notes.md). A placement that spreads the load evens that out.

``plan_placement`` is the planner: longest-processing-time-first with equal capacity, i.e. the
experts in descending order of rows, each to the least-loaded rank that still has a free slot.
The result keeps every rank's expert count at E/R, so the sharded weights keep their shapes.
"""

from __future__ import annotations

import heapq

import torch


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
