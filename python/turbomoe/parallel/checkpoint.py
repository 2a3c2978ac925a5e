"""Full Hugging Face checkpoints from a parallelized model.

Expert shards are gathered over the ep group and FSDP shards over all ranks; rank 0 then hands
the full state dict to transformers' own ``save_pretrained`` (which writes the standard
per-expert keys, ``model.layers.{L}.mlp.experts.{e}.gate_proj.weight`` etc.), so stock
transformers loads the result. The directory appears atomically: rank 0 writes a temporary
sibling directory and renames it into place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from turbomoe.parallel.dispatch import expert_shard
from turbomoe.parallel.grads import DTensor
from turbomoe.parallel.mesh import ExpertShard
from turbomoe.parallel.shard import EXPERT_WEIGHTS, find_experts


def gather_experts(local: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """The full [E, ...] tensor of one expert weight (or its gradient) from every rank's block,
    in expert order (a collective over the ep group: every rank calls it)."""
    parts = [torch.empty_like(local) for _ in range(shard.ep_size)]
    dist.all_gather(parts, local.contiguous(), group=shard.group)
    full = torch.cat(parts, dim=0)  # in slot order
    if shard.slot_of is not None:
        full = full.index_select(0, shard.slot_of.to(full.device))
    return full


def full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the unsharded model, on the CPU (a collective: every rank calls it).

    Keys are the model's own (fused experts ``...experts.gate_up_proj [E,2I,H]``). With
    rank0_only, ranks other than 0 get an empty dict and never hold more than one full tensor.
    """
    keep = not rank0_only or dist.get_rank() == 0
    expert_keys: dict[str, ExpertShard] = {}
    for name, module in find_experts(model):
        shard = expert_shard(module)
        if shard is not None and shard.ep_size > 1:
            prefix = f"{name}." if name else ""
            for weight in EXPERT_WEIGHTS:
                expert_keys[prefix + weight] = shard
    full: dict[str, torch.Tensor] = {}
    # state_dict() order is the same on every rank, so the collectives pair up.
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        elif key in expert_keys:
            value = gather_experts(value.detach(), expert_keys[key])
        if keep:
            full[key] = value.detach().cpu()
    return full


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move tmp to final; an existing final is swapped out first and removed after."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike[str], **kwargs: Any
) -> None:
    """Write the full standard HF checkpoint of a parallelized model (collective; rank 0 writes).

    kwargs go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``); ``state_dict`` and
    ``is_main_process`` are set here. Returns once the directory is complete on every rank.
    """
    for reserved in ("state_dict", "is_main_process"):
        if reserved in kwargs:
            raise ValueError(f"turbomoe.parallel.save_pretrained sets {reserved} itself")
    final = Path(save_directory)
    state = full_state_dict(model, rank0_only=True)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            # The class's own method: the instance's save_pretrained is this function.
            type(model).save_pretrained(model, tmp, state_dict=state, **kwargs)
            _replace_dir(tmp, final)
        except BaseException as exc:  # report after the barrier so no rank is left waiting
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
    failed = torch.tensor([error is not None], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        failed = failed.cuda()
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed.item()):
        raise RuntimeError(f"saving the checkpoint to {final} failed on rank 0")
