"""``turbomoe bench`` under torchrun: the multi-GPU protocol of DESIGN §6.

Stock transformers runs with per-layer FSDP2 (every decoder layer, then the root, bf16 parameters
and gradient reduction), turbomoe with expert parallelism over all ranks
(``turbomoe.parallelize(model, ep_size=world)``: each rank owns E / world experts; the dense rest
is replicated with averaged gradients, or sharded by FSDP2 under ``--ep-dense fsdp``). Every
rank builds the same random model (same seed) and trains on its own batches, the same ones in
both runs. Each rank times its own steps; rank 0 reports TPS/GPU as the mean over ranks of the
per-rank TPS and peak memory as the maximum over ranks, and checks its first-step loss (its own
batch) between the two runs.

On CPU the ranks use gloo (what CI tests, with the tiny shape); on CUDA, NCCL with one GPU per
rank (LOCAL_RANK).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def requested_world_size() -> int:
    """Ranks taking part: torch.distributed's when initialised, else torchrun's WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_type: str, timeout_s: float = 600.0) -> Ranks | None:
    """Joins torchrun's process group (NCCL on CUDA, gloo on CPU); None for a single process.

    The timeout turns a rank that died or never started into an error on the others, not a hang.
    """
    if requested_world_size() <= 1:
        return None
    from turbomoe.parallel import init_distributed

    init_distributed(timeout_s, backend="nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard_stock(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Per-layer FSDP2, as DESIGN §6's baseline: each decoder layer, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to shard per layer")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def shard_turbomoe(model: torch.nn.Module, world: int, dense_fsdp: bool) -> torch.nn.Module:
    """Expert parallelism over every rank (ep = world, dp = 1); the dense parameters under FSDP2
    over all ranks (per decoder layer and the root) or replicated."""
    import turbomoe

    return turbomoe.parallelize(model, ep_size=world, fsdp=dense_fsdp)


def ep_transport(model: torch.nn.Module) -> str:
    """How the expert-parallel exchange of a parallelized model travels: "nvlink" or "nccl"."""
    from turbomoe.parallel.comm import peer_exchange
    from turbomoe.parallel.shard import parallel_state

    group = parallel_state(model).mesh.get_group("ep")
    return "nvlink" if peer_exchange(group) is not None else dist.get_backend(group)


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list, on every rank (rank order)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def combine_ranks(tps: float, peak_gib: float | None) -> tuple[float, float | None, list[float]]:
    """(mean TPS over ranks, max peak GiB over ranks, per-rank TPS); collective."""
    rows = gather_floats([tps, -1.0 if peak_gib is None else peak_gib])
    per_rank = [r[0] for r in rows]
    peaks = [r[1] for r in rows if r[1] >= 0]
    return statistics.fmean(per_rank), (max(peaks) if peaks else None), per_rank


def all_ok(ok: bool) -> bool:
    """True when every rank says ok; collective."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
