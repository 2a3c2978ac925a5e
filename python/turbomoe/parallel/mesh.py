"""The (dp, ep) device mesh and the expert-parallel state each sharded experts module carries.

Ranks are laid out row-major on a ``("dp", "ep")`` mesh: rank = dp_index · ep_size + ep_index,
so an expert-parallel group is a block of consecutive ranks (on one host under torchrun, where
NVLink lives). Expert-parallel rank r owns the contiguous block of experts
[r · E/ep, (r+1) · E/ep); experts are replicated over dp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# The attribute a sharded experts module carries (an ExpertShard); turbomoe.hf's experts function
# checks for it.
EP_ATTR = "_turbomoe_ep"

MESH_DIMS = ("dp", "ep")


class StepCapacity:
    """Rows each rank reserves per peer in the token exchange during one forward: the largest
    token count of any rank of the ep group, agreed once per model forward (a forward pre-hook
    installed by ``parallelize``) so that the layers themselves never wait on the host. Shared by
    every experts module of a model; None until the first agreement."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.chunks = 1  # token chunks per layer (TURBOMOE_EP_CHUNKS), agreed with the value
        # Set while a captured step runs: the value was agreed before it, outside the graph.
        self.frozen = False


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank holds and whom it exchanges tokens with."""

    group: ProcessGroup  # the expert-parallel group (token exchange)
    ep_size: int
    ep_rank: int
    num_experts: int  # global E
    world_size: int  # ep_size · dp_size: gradients are averaged over all of it
    capacity: StepCapacity = field(default_factory=StepCapacity)
    # Placement by load (turbomoe.parallel.placement): expert e sits at slot slot_of[e] ([E]
    # int64, on the experts' device), and this rank owns slots expert_range. None: expert e at
    # slot e (contiguous blocks).
    slot_of: torch.Tensor | None = field(default=None, compare=False)

    def __deepcopy__(self, memo: dict[int, object]) -> ExpertShard:
        return self  # a process group is a shared handle, never copied

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_range(self) -> tuple[int, int]:
        """Slots [first, last + 1) this rank owns: the global expert ids of its experts unless
        the experts were placed by load (slot_of)."""
        first = self.ep_rank * self.num_local
        return first, first + self.num_local


def device_type() -> str:
    """The device type of the default process group's backend: "cuda" for NCCL, else "cpu"."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> None:
    """``init_process_group`` from torchrun's environment if it has not been called yet.

    The timeout is what turns a missing or crashed peer into an error instead of a hang: every
    collective (the token exchange included) fails after it. NCCL when CUDA is available, else
    gloo; on CUDA the process's device is set to LOCAL_RANK first.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def build_mesh(ep_size: int, mesh: DeviceMesh | None = None) -> DeviceMesh:
    """The ("dp", "ep") mesh over all ranks, or ``mesh`` after checking it.

    Raises ValueError when ep_size is not a positive divisor of the world size or a given mesh
    does not have the dims ("dp", "ep") with ep of size ep_size.
    """
    if not dist.is_initialized():
        raise ValueError(
            "turbomoe.parallel needs torch.distributed: call torch.distributed.init_process_group "
            "(or turbomoe.parallel.init_distributed()) first, e.g. under torchrun"
        )
    world = dist.get_world_size()
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    if world % ep_size != 0:
        raise ValueError(
            f"ep_size={ep_size} does not divide the world size {world}: expert parallelism "
            f"needs world_size = dp_size × ep_size"
        )
    if mesh is not None:
        if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
            raise ValueError(
                f"mesh must have dims {MESH_DIMS}, got {mesh.mesh_dim_names} (shape {mesh.shape})"
            )
        if mesh.size(1) != ep_size or mesh.size() != world:
            raise ValueError(
                f"mesh has shape {tuple(mesh.shape)} over {mesh.size()} ranks; expected "
                f"({world // ep_size}, {ep_size}) over the world of {world}"
            )
        return mesh
    return init_device_mesh(device_type(), (world // ep_size, ep_size), mesh_dim_names=MESH_DIMS)


def check_experts_divide(num_experts: int, ep_size: int, where: str) -> None:
    if num_experts % ep_size != 0:
        raise ValueError(
            f"ep_size={ep_size} does not divide the {num_experts} experts of {where}: every "
            f"rank must own the same number of experts"
        )
