"""Rows per expert of each MoE layer, counted from the router's choices.

A forward pre-hook on each experts module (:func:`turbomoe.parallel.shard.find_experts`) counts
its ``top_k_index`` (global expert ids, before any dispatch or placement) while the recorder is
active. Under ``torch.distributed`` the counts are summed over the ranks. Used to place experts by
load (:mod:`turbomoe.parallel.placement`) and by the benchmark's routing report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turbomoe.parallel.shard import find_experts, global_experts


def _top_k_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The experts call's ``(hidden, top_k_index, top_k_weights)``, positional or by name."""
    index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        return index
    return None


class RoutingRecorder:
    """Counts the rows each expert of each MoE layer receives while ``active`` is true."""

    def __init__(self, model: nn.Module) -> None:
        self.active = False
        self._counts: list[torch.Tensor | None] = []
        self._handles: list[Any] = []
        for _, module in find_experts(model):
            hook = self._hook(len(self._counts), global_experts(module))
            self._counts.append(None)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _hook(self, slot: int, experts: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active:
                return
            index = _top_k_index(args, kwargs)
            if index is None:
                return
            # Counted through a sort (bincount on CUDA refuses deterministic mode); ids past the
            # last expert (a dropped slot's sentinel) are rows of no expert.
            ids = index.detach().reshape(-1).sort().values
            bounds = torch.arange(experts + 1, device=ids.device, dtype=ids.dtype)
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
