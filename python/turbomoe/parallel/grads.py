"""Gradient reduction for a parallelized model.

Convention: after a backward, every gradient is the *average over all ranks* of the gradient of
each rank's own loss (the DDP/FSDP convention). So a loss that is a mean over the tokens of the
local batch gives the gradient of the mean over the global batch when every rank has the same
number of tokens; with uneven counts, divide each rank's summed loss by the global count and
multiply by the world size (what HF Trainer does with ``num_items_in_batch``).

- Dense parameters under FSDP2: FSDP's reduce-scatter (average over the world) does it.
- Dense parameters left replicated: all-reduce, average over the world.
- Expert parameters (sharded over ep, replicated over dp): the token exchange's backward already
  *sums* every ep peer's contribution on the owner. A hook on each expert parameter scales its
  incoming gradient by 1/ep_size as it accumulates, and the sync averages over dp; the result is
  Σ_all ranks / world. Because the scaling happens per backward and the sync is an average of
  values that are already equal across the group, :func:`sync_grads` is idempotent and
  gradient accumulation over several backwards stays exact whether it syncs after each
  backward or once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from turbomoe.parallel.buckets import average
from turbomoe.parallel.knobs import env_int, env_switch
from turbomoe.parallel.overlap import DenseGradOverlap

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = ()  # type: ignore[assignment,misc]

STATE_ATTR = "_turbomoe_parallel"
# grad_sync="auto": "1" averages the replicated dense gradients during the backward (bucket by
# bucket, on a communicator of its own) instead of once at its end; the second caps the SMs of
# that overlapped all-reduce (NCCL's max_ctas). Off by default: on 4 H200s at 48 layers, with the
# attention replayed from graphs, two interleaved launches each measured 10,154 and 10,175
# TPS/GPU with the all-reduce at the end against 9,842 and 9,814 overlapped (its kernels spin
# beside the backward's, waiting for the ranks that are still computing).
_OVERLAP_ENV = "TURBOMOE_DENSE_OVERLAP"
_OVERLAP_CTAS_ENV = "TURBOMOE_DENSE_OVERLAP_CTAS"

# Gradients are reduced in flat buckets of at most this many elements (one collective each).
_BUCKET_ELEMENTS = 1 << 25


@dataclass
class ParallelState:
    """What a parallelized model needs to reduce its gradients and save its checkpoint."""

    mesh: DeviceMesh  # ("dp", "ep")
    ep_size: int
    fsdp: bool
    expert_params: list[nn.Parameter] = field(default_factory=list)
    sync_queued: bool = False
    # grad_sync="auto" with replicated dense parameters: their all-reduce runs in the backward.
    overlap: DenseGradOverlap | None = None
    # parallelize(..., attention_graphs=True): the attention replayed from CUDA graphs.
    attention_graphs: Any = None

    @property
    def world_group(self) -> ProcessGroup:
        return dist.group.WORLD  # type: ignore[return-value]

    @property
    def dp_group(self) -> ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)


def parallel_state(model: nn.Module) -> ParallelState:
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, ParallelState):
        raise ValueError("the model was not parallelized with turbomoe.parallel.parallelize")
    return state


def _average(params: list[nn.Parameter], group: ProcessGroup) -> None:
    """Average the gradients of params over group, in flat buckets (buckets.average)."""
    average(params, group, _BUCKET_ELEMENTS)


def _replicated_dense(model: nn.Module, experts: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters that are neither expert shards nor FSDP-managed (DTensors)."""
    skip = {id(p) for p in experts}
    return [
        p
        for p in model.parameters()
        if p.requires_grad and id(p) not in skip and not isinstance(p, DTensor)
    ]


def sync_grads(model: nn.Module) -> None:
    """Reduce the gradients FSDP does not: replicated dense ones over the world, expert shards
    over dp. A collective: every rank calls it, after backward and before clipping/stepping.

    With ``parallelize(..., grad_sync="auto")`` (the default) it runs by itself at the end of
    every backward that reaches the model's output; calling it again is harmless (idempotent).
    """
    state = parallel_state(model)
    _average(_replicated_dense(model, state.expert_params), state.world_group)
    if state.dp_size > 1:
        _average([p for p in state.expert_params if p.requires_grad], state.dp_group)


# The brief's name for the dense half; sync_grads does both halves.
sync_dense_grads = sync_grads


def sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The float32 sum of squares of all elements: per-tensor norms from one multi-tensor pass
    that reads each gradient once (``grad.float().pow(2).sum()`` per tensor wrote a float32 copy
    and its square: ~18 bytes an element moved instead of 2 for bf16 gradients)."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() > 0:
            by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        total += torch.stack(norms).square().sum().to(device)
    return total


def clip_grad_norm_(model: nn.Module, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for a parallelized model; returns the norm.

    The stock function cannot be used as is: it rejects a mix of DTensors (FSDP) and plain
    tensors, and on expert shards each rank would see a different local norm and clip its
    (replicated) dense gradients by a different factor. Here the squared norms are summed per
    kind (replicated dense: local; FSDP shards: over all ranks; expert shards: over ep, as
    they are replicated over dp), so every rank gets the norm of the full gradient. Call it
    after the gradients are synced (automatic with grad_sync="auto"). A collective.
    """
    state = parallel_state(model)
    experts = {id(p) for p in state.expert_params}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    device = (
        torch.device("cuda", torch.cuda.current_device()) if _on_nccl() else torch.device("cpu")
    )
    kinds: dict[str, list[torch.Tensor]] = {"replicated": [], "fsdp": [], "expert": []}
    for p in model.parameters():
        grad = p.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            kinds["fsdp"].append(grad.to_local())
        elif id(p) in experts:
            kinds["expert"].append(grad)
        else:
            kinds["replicated"].append(grad)
    replicated, fsdp, expert = (sum_of_squares(kinds[k], device) for k in kinds)
    if state.fsdp:
        dist.all_reduce(fsdp, group=state.world_group)
    if state.ep_size > 1:
        dist.all_reduce(expert, group=state.mesh.get_group("ep"))
    norm = (replicated + fsdp + expert).sqrt()
    # One host sync for the factor: DTensor gradients take a Python scalar, not a plain tensor.
    coef = float(max_norm / (norm + eps))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def _on_nccl() -> bool:
    return dist.get_backend() == "nccl"


def scale_expert_grads(params: list[nn.Parameter], ep_size: int) -> None:
    """Register the 1/ep_size scaling on each expert parameter's incoming gradients."""
    if ep_size == 1:
        return
    factor = 1.0 / ep_size
    for p in params:
        # Frozen experts (e.g. LoRA on attention only) take no hook; unfreezing them after
        # parallelize would skip the scaling, so freeze/unfreeze before calling it.
        if p.requires_grad:
            p.register_hook(lambda grad: grad * factor)


def install_auto_sync(model: nn.Module) -> None:
    """Reduce the gradients by the end of every backward that reaches the model.

    The gradients are averaged in a callback that the autograd engine calls once the whole
    backward has finished (how DDP and FSDP schedule their final reductions). With
    ``TURBOMOE_DENSE_OVERLAP=1`` the replicated dense gradients are instead averaged bucket by
    bucket during the backward (:class:`~turbomoe.parallel.overlap.DenseGradOverlap`, on a
    communicator of its own), and what is left (expert shards over dp) runs in the callback.
    The callback is queued by the first accumulated dense gradient, or by a hook on the model's
    output (the loss when labels were given, else the logits). Without the overlap, the callback
    runs :func:`sync_grads`.
    """
    state = parallel_state(model)

    def run() -> None:
        state.sync_queued = False
        if state.overlap is None:
            sync_grads(model)
            return
        state.overlap.finish()
        # Parameters made trainable after parallelize are not in the overlap's buckets.
        covered = state.overlap.covered
        late = [p for p in _replicated_dense(model, state.expert_params) if id(p) not in covered]
        _average(late, state.world_group)
        if state.dp_size > 1:
            _average([p for p in state.expert_params if p.requires_grad], state.dp_group)

    def queue() -> None:
        if not state.sync_queued:
            state.sync_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(run)  # type: ignore[attr-defined]

    dense = _replicated_dense(model, state.expert_params)
    if dense and dist.get_world_size() > 1 and env_switch(_OVERLAP_ENV, False):
        # Its own communicator: the expert exchange's all-to-alls keep their stream and order.
        group = dist.new_group(ranks=list(range(dist.get_world_size())), pg_options=_pg_options())
        state.overlap = DenseGradOverlap(dense, group, _BUCKET_ELEMENTS, queue)

    def on_grad(grad: torch.Tensor) -> torch.Tensor:
        queue()
        return grad

    def hook(module: nn.Module, args: object, output: object) -> None:
        if state.sync_queued or (state.overlap is not None and state.overlap.in_backward):
            # The last backward raised before its end-of-backward callback ran.
            state.sync_queued = False
            if state.overlap is not None:
                state.overlap.reset()
        if not torch.is_grad_enabled():
            return
        anchor = _output_anchor(output)
        if anchor is not None:
            anchor.register_hook(on_grad)

    model.register_forward_hook(hook)


def _pg_options() -> Any:
    """NCCL options of the overlap's communicator: at most ``TURBOMOE_DENSE_OVERLAP_CTAS`` thread
    blocks (SMs) for its kernels (default 4; 0 leaves it to NCCL), since they run beside the
    backward's kernels. 48 layers on 4 H200s, one launch, 6 steps each: fastest step 373 ms
    with 4, 434 ms without the overlap, 473 ms with NCCL's own choice."""
    ctas = env_int(_OVERLAP_CTAS_ENV, 4, 0, 1024)
    if ctas <= 0 or dist.get_backend() != "nccl":
        return None
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options.config.max_ctas = ctas
    return options


def _output_anchor(output: object) -> torch.Tensor | None:
    """The tensor of a model output that the backward reaches: loss first, then logits."""
    candidates: list[object] = []
    for name in ("loss", "logits"):
        value = getattr(output, name, None)
        if value is None and isinstance(output, dict):
            value = output.get(name)
        candidates.append(value)
    if isinstance(output, (tuple, list)):
        candidates.extend(output)
    elif isinstance(output, torch.Tensor):
        candidates.append(output)
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return value
    return None
