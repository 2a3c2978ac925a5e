"""torchrun support: one process per GPU, expert-parallel through turbomoe.parallel; only
rank 0 prints, writes metrics, plots and checkpoint metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> Ranks:
    """Joins the process group torchrun describes (WORLD_SIZE > 1); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def parallelize(model: Any, ep_size: int, ranks: Ranks) -> Any:
    if ranks.world <= 1:
        return model
    from turbomoe.parallel import parallelize as tm_parallelize

    return tm_parallelize(model, ep_size)


def balance_experts(
    model: Any, inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
) -> list[torch.Tensor]:
    """Experts placed on the ranks by this batch's routing (turbomoe.parallel.placement), the
    optimizer's moments moving with them; returns the slots placed."""
    from turbomoe.parallel.placement import balance_experts as tm_balance_experts

    return tm_balance_experts(model, inputs, optimizer)


def expert_slots(model: Any) -> list[torch.Tensor] | None:
    from turbomoe.parallel.placement import expert_slots as tm_expert_slots

    return tm_expert_slots(model)


def place_experts(model: Any, slots: list[torch.Tensor]) -> None:
    from turbomoe.parallel.placement import place_experts as tm_place_experts

    tm_place_experts(model, slots)


def is_parallelized(model: Any) -> bool:
    from turbomoe.parallel import is_parallelized as tm_is_parallelized

    return bool(tm_is_parallelized(model))


def all_mean(value: float, ranks: Ranks, device: torch.device) -> float:
    """The mean of a per-rank scalar (the step loss) over ranks."""
    if ranks.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / ranks.world


def all_sum(value: float, ranks: Ranks, device: torch.device) -> float:
    if ranks.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def any_true(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Whether any rank says so: a stop request seen by one rank stops all of them together."""
    if ranks.world <= 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t)
    return bool(int(t))


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()
