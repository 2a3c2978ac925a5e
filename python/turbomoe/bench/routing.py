"""How the benchmark's router spread one step's tokens over the experts.

The expert GEMMs' speed depends on how many rows each expert gets, and expert parallelism on how
many each rank gets, so the bench reports the routing it trained on next to its timings: per
layer, the largest expert's rows over the mean, the experts that got none, and for expert
parallelism over R ranks (rank r owning a contiguous block of E / R experts) the busiest rank's
rows over the mean, which every other rank waits for at that layer's exchange, and the same under
a placement by load planned from these very counts (turbomoe.parallel.placement): what placing
experts by load could recover at best.

The counts come from :class:`turbomoe.parallel.routing_counts.RoutingRecorder`, active for one
eager warm-up step, outside the timed window; under torchrun they are summed over the ranks.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from turbomoe.parallel.placement import plan_placement, rank_loads
from turbomoe.parallel.routing_counts import RoutingRecorder


def routing_summary(
    recorder: RoutingRecorder, ep_sizes: tuple[int, ...] = (4, 8)
) -> dict[str, Any] | None:
    """The recorder's counts (a collective under torch.distributed), summarised; None if it
    recorded nothing."""
    table = recorder.counts()
    return None if table is None else summarise(table, ep_sizes)


def summarise(table: torch.Tensor, ep_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Per-layer figures of a [layers, experts] count table (see the module docstring)."""
    experts = table.shape[1]
    mean = table.sum(1) / experts
    out: dict[str, Any] = {
        "layers": table.shape[0],
        "experts": experts,
        "largest_over_mean": [round(float(v), 3) for v in table.max(1).values / mean],
        "empty_experts": [int(v) for v in (table == 0).sum(1)],
        "ep_busiest_over_mean": {},
        "ep_placed_busiest_over_mean": {},
    }
    for ranks in ep_sizes:
        if ranks <= 1 or experts % ranks != 0:
            continue
        blocks, placed = [], []
        for rows in table:
            blocks.append(_busiest(rank_loads(rows, ranks)))
            placed.append(_busiest(rank_loads(rows, ranks, plan_placement(rows, ranks))))
        out["ep_busiest_over_mean"][str(ranks)] = blocks
        out["ep_placed_busiest_over_mean"][str(ranks)] = placed
    return out


def _busiest(loads: torch.Tensor) -> float:
    mean = float(loads.mean())
    return round(float(loads.max()) / mean, 3) if mean > 0 else 1.0


def describe(summary: dict[str, Any]) -> str:
    """One line: medians over the layers."""
    parts = [
        f"largest expert {statistics.median(summary['largest_over_mean']):.1f}x the mean",
        f"{statistics.median(summary['empty_experts']):.0f}/{summary['experts']} experts empty",
    ]
    for ranks, values in summary["ep_busiest_over_mean"].items():
        placed = summary["ep_placed_busiest_over_mean"][ranks]
        parts.append(
            f"EP {ranks} busiest rank {statistics.median(values):.2f}x "
            f"({statistics.median(placed):.2f}x placed by load)"
        )
    return "routing (median over layers): " + ", ".join(parts)
