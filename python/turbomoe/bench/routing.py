"""How the benchmark's router spread one step's tokens over the experts.

The expert GEMMs' speed depends on how many rows each expert gets, and expert parallelism on how
many each rank gets, so the bench reports the routing it trained on next to its timings: per
layer, the largest expert's rows over the mean, the experts that got none, and for expert
parallelism over R ranks (rank r owning a contiguous block of E / R experts) the busiest rank's
rows over the mean, which every other rank waits for at that layer's exchange, and the same under
a placement by load planned from these very counts (turbomoe.parallel.placement): what placing
experts by load could recover at best.

A forward pre-hook on each experts module counts its ``top_k_index`` (global expert ids, before
any dispatch) while the recorder is active: one eager warm-up step, outside the timed window.
Under torchrun the counts are summed over the ranks.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from turbomoe.parallel.placement import plan_placement, rank_loads

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def _num_experts(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _top_k_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The experts call's ``(hidden, top_k_index, top_k_weights)``, positional or by name."""
    index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        return index
    return None


class RoutingRecorder:
    """Counts the rows each expert of each MoE layer receives while ``active`` is true."""

    def __init__(self, model: nn.Module) -> None:
        self.num_experts = _num_experts(model)
        self.active = False
        self._counts: list[torch.Tensor | None] = []
        self._handles: list[Any] = []
        if self.num_experts is None:
            return
        for module in model.modules():
            weight = getattr(module, EXPERT_WEIGHTS[0], None)
            if not (isinstance(weight, torch.Tensor) and weight.dim() == 3):
                continue
            slot = len(self._counts)
            self._counts.append(None)
            self._handles.append(
                module.register_forward_pre_hook(self._hook(slot), with_kwargs=True)
            )

    def _hook(self, slot: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active or self.num_experts is None:
                return
            index = _top_k_index(args, kwargs)
            if index is None:
                return
            # Counted through a sort (bincount on CUDA refuses deterministic mode); ids past the
            # last expert (a dropped slot's sentinel) are rows of no expert.
            ids = index.detach().reshape(-1).sort().values
            bounds = torch.arange(self.num_experts + 1, device=ids.device, dtype=ids.dtype)
            edges = torch.searchsorted(ids, bounds)
            counts = edges[1:] - edges[:-1]
            previous = self._counts[slot]
            self._counts[slot] = counts if previous is None else previous + counts

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def counts(self) -> torch.Tensor | None:
        """[layers, experts] rows per expert (float64 on CPU), summed over the ranks of an
        initialised process group (every rank must call this); None if nothing was recorded."""
        recorded = [c for c in self._counts if c is not None]
        if not recorded or len(recorded) != len(self._counts):
            return None
        table = torch.stack(recorded).to(torch.float64)  # on the device that counted
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(table)
        return table.cpu()

    def summary(self, ep_sizes: tuple[int, ...] = (4, 8)) -> dict[str, Any] | None:
        table = self.counts()
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
