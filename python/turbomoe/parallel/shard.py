"""``parallelize``: lay a model every rank built identically out over the ("dp", "ep") mesh.

- Each MoE layer's expert weights (``gate_up_proj [E,2I,H]``, ``down_proj [E,H,I]``) are
  replaced by plain parameters holding this rank's contiguous block of E/ep experts, and the
  experts module gets an :class:`ExpertShard` (attribute ``_turbomoe_ep``) and a forward that
  runs the expert-parallel dispatch. The forward is set on the instance, so the dispatch runs
  whatever experts implementation the config names (a stock one would index global expert ids
  into the local block).
- Dense parameters: FSDP2 ``fully_shard`` over all ranks per decoder layer and at the root when
  there is a dp dimension (dp > 1), else left replicated with averaged gradients (see
  :mod:`turbomoe.parallel.grads`). Expert shards are never handed to FSDP.

Call it before creating the optimizer (it replaces parameters).
"""

from __future__ import annotations

import types
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from turbomoe.hf.attention_graphs import enable_attention_graphs
from turbomoe.parallel.comm import peer_exchange
from turbomoe.parallel.dispatch import ep_experts_forward, install_capacity_hook
from turbomoe.parallel.grads import (
    STATE_ATTR,
    ParallelState,
    install_auto_sync,
    parallel_state,
    scale_expert_grads,
)
from turbomoe.parallel.mesh import (
    EP_ATTR,
    ExpertShard,
    StepCapacity,
    build_mesh,
    check_experts_divide,
    device_type,
)

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def find_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module holding 3-D ``gate_up_proj``/``down_proj``."""
    found = []
    for name, module in model.named_modules():
        weights = [getattr(module, w, None) for w in EXPERT_WEIGHTS]
        if all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights):
            found.append((name, module))
    return found


def global_experts(module: nn.Module) -> int:
    """Experts of an experts module, all ranks' together (its own count before sharding)."""
    shard = getattr(module, EP_ATTR, None)
    if isinstance(shard, ExpertShard):
        return shard.num_experts
    return int(module.gate_up_proj.shape[0])


def _unsupported(name: str, module: nn.Module) -> str | None:
    """Why the expert-parallel forward cannot run this experts module, or None."""
    if getattr(module, "has_bias", False):
        return f"{name}: expert biases"
    if getattr(module, "is_transposed", False):
        return f"{name}: transposed expert weights"
    if not getattr(module, "has_gate", True):
        return f"{name}: experts without a gate projection"
    act = getattr(module, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLUActivation", "SiLU"):
        return f"{name}: activation {type(act).__name__} (the expert-parallel path runs SiLU)"
    for pname in dict(module.named_parameters(recurse=False)):
        if pname not in EXPERT_WEIGHTS:
            return f"{name}: extra expert parameter {pname!r}"
    return None


def _local_block(weight: nn.Parameter, first: int, count: int) -> nn.Parameter:
    # clone: the full [E, ...] storage must be freed, not kept alive by a view.
    block = weight.detach()[first : first + count].clone()
    return nn.Parameter(block, requires_grad=weight.requires_grad)


def _sharded_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    slot_of = getattr(self, EP_ATTR).slot_of
    if slot_of is not None:
        top_k_index = slots_of_ids(top_k_index, slot_of)
    return ep_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def slots_of_ids(ids: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """Router expert ids -> the slots that hold those experts (placement by load). Ids outside
    [0, E) pass through unchanged, so that the dispatch's own check reports them."""
    experts = slot_of.shape[0]
    valid = (ids >= 0) & (ids < experts)
    slots = slot_of.to(ids.dtype)[ids.clamp(0, experts - 1)]
    return torch.where(valid, slots, ids)


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace every experts module's weights by this rank's block; returns the new parameters.

    Works on meta-device models too (the loader shards before materialising). Validates every
    module before changing any, so a ValueError leaves the model as it was.
    """
    ep_size = mesh.size(1)
    experts = find_experts(model)
    if not experts:
        raise ValueError(
            f"{type(model).__name__} has no experts module with 3-D gate_up_proj/down_proj "
            "weights: nothing to shard over ep"
        )
    for name, module in experts:
        if isinstance(getattr(module, EP_ATTR, None), ExpertShard):
            raise ValueError(f"{name} is already sharded (parallelize was called twice)")
        check_experts_divide(global_experts(module), ep_size, name)
        reason = _unsupported(name, module)
        if reason is not None:
            raise ValueError(f"expert parallelism does not support {reason}")
    ep_rank = mesh.get_local_rank("ep")
    group = mesh.get_group("ep")
    capacity = StepCapacity()  # one per model: every layer exchanges the same token count
    params: list[nn.Parameter] = []
    for _, module in experts:
        shard = ExpertShard(
            group=group,
            ep_size=ep_size,
            ep_rank=ep_rank,
            num_experts=global_experts(module),
            world_size=mesh.size(),
            capacity=capacity,
        )
        first, last = shard.expert_range
        for weight_name in EXPERT_WEIGHTS:
            local = _local_block(getattr(module, weight_name), first, last - first)
            setattr(module, weight_name, local)
            params.append(local)
        setattr(module, EP_ATTR, shard)
        module.forward = types.MethodType(_sharded_forward, module)
    return params


def sharded_expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights of every sharded experts module (the current parameter objects)."""
    return [
        getattr(module, weight)
        for _, module in find_experts(model)
        if isinstance(getattr(module, EP_ATTR, None), ExpertShard)
        for weight in EXPERT_WEIGHTS
    ]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules HF never splits across devices (its decoder layers): the FSDP units."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_dense(
    model: nn.Module,
    mesh: DeviceMesh,
    expert_params: list[nn.Parameter],
    *,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 over all ranks for every decoder layer and the root; expert shards ignored."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world_mesh = init_device_mesh(device_type(), (mesh.size(),), mesh_dim_names=("fsdp",))
    ignored = set(expert_params)
    kwargs: dict[str, Any] = {
        "mesh": world_mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
    }
    for layer in _decoder_layers(model):
        local_ignored = {p for p in layer.parameters() if p in ignored}
        fully_shard(layer, ignored_params=local_ignored or None, **kwargs)
    fully_shard(model, ignored_params=ignored or None, **kwargs)


def parallelize(
    model: nn.Module,
    ep_size: int = 1,
    *,
    mesh: DeviceMesh | None = None,
    fsdp: bool | None = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    grad_sync: Literal["auto", "manual"] = "auto",
    attention_graphs: bool = False,
) -> nn.Module:
    """Shard the experts over ep, replicate them over dp, and shard or replicate the rest.

    Every rank must have built the same model (same seed or checkpoint) and call this
    collectively. ``mesh``: a ("dp", "ep") DeviceMesh to use instead of the default row-major
    one over all ranks. ``fsdp``: FSDP2 for the dense parameters (default: when dp > 1); give a
    fused or foreach optimizer ``split_param_groups(model.parameters())`` then.
    ``mp_policy``/``reshard_after_forward`` go to ``fully_shard``. ``grad_sync="auto"`` reduces
    gradients at the end of every backward; "manual" leaves it to
    :func:`turbomoe.parallel.sync_grads`. ``attention_graphs``: replay each layer's attention
    from CUDA graphs from the second training step on (``turbomoe.hf.attention_graphs``; needs
    replicated dense parameters). With ep_size = 1 on one rank, or without a process
    group, this returns the model unchanged. Raises ValueError when ep_size does not divide the
    world size or the experts, or ep_size > 1 without a process group.
    """
    if grad_sync not in ("auto", "manual"):
        raise ValueError(f"grad_sync must be 'auto' or 'manual', got {grad_sync!r}")
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("the model is already parallelized")
    if ep_size == 1 and mesh is None and not dist.is_initialized():
        return model  # a single-process script: nothing to do
    mesh = build_mesh(ep_size, mesh)
    if mesh.size() == 1:
        return model  # one rank, ep = 1: nothing to shard or reduce
    expert_params = shard_experts(model, mesh) if ep_size > 1 else []
    finish(
        model,
        mesh,
        expert_params,
        fsdp=fsdp,
        mp_policy=mp_policy,
        reshard_after_forward=reshard_after_forward,
        grad_sync=grad_sync,
        attention_graphs=attention_graphs,
    )
    return model


def finish(
    model: nn.Module,
    mesh: DeviceMesh,
    expert_params: list[nn.Parameter],
    *,
    fsdp: bool | None,
    mp_policy: Any,
    reshard_after_forward: bool,
    grad_sync: str,
    attention_graphs: bool = False,
) -> None:
    """Everything after the experts are sharded (and, for the loader, filled)."""
    use_fsdp = mesh.size(0) > 1 if fsdp is None else fsdp
    if attention_graphs and use_fsdp:
        raise ValueError(
            "attention_graphs needs replicated dense parameters: FSDP's sharded ones move "
            "between steps (pass fsdp=False, or attention_graphs=False)"
        )
    if use_fsdp:
        wrap_dense(
            model,
            mesh,
            expert_params,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
        )
    scale_expert_grads(expert_params, mesh.size(1))
    state = ParallelState(
        mesh=mesh, ep_size=mesh.size(1), fsdp=use_fsdp, expert_params=expert_params
    )
    setattr(model, STATE_ATTR, state)
    if attention_graphs:
        state.attention_graphs = enable_attention_graphs(model)
    if grad_sync == "auto":
        install_auto_sync(model)
    if expert_params:
        install_capacity_hook(model)
        # The exchange's transport is chosen here, collectively, rather than in the first forward.
        peer_exchange(mesh.get_group("ep"))
    _hook_save_pretrained(model)


def _hook_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the full checkpoint (a collective on every rank)."""
    if not callable(getattr(model, "save_pretrained", None)):
        return
    from turbomoe.parallel.checkpoint import save_pretrained

    def save(self: nn.Module, save_directory: Any, **kwargs: Any) -> None:
        save_pretrained(self, save_directory, **kwargs)

    model.save_pretrained = types.MethodType(save, model)  # type: ignore[method-assign]


def is_parallelized(model: nn.Module) -> bool:
    try:
        parallel_state(model)
    except ValueError:
        return False
    return True
