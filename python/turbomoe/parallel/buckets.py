"""Gradients averaged over a process group in flat buckets: one all-reduce per bucket.

Each bucket carries one extra value per parameter, 1 where this rank has a gradient, so that a
gradient that is None on some ranks counts as zeros there, and one that is None on every rank
stays None. The flags are read on the host only when some gradient of the bucket is None on this
rank (only then does the answer decide anything here): the common case costs no host sync.
Used at the end of a backward (``sync_grads``) and, launched bucket by bucket, during it
(``overlap.DenseGradOverlap``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup


@dataclass
class Bucket:
    params: list[nn.Parameter]
    ready: int = 0  # for the overlap: parameters whose gradient this backward has finished


def make_buckets(params: list[nn.Parameter], bucket_elements: int) -> list[Bucket]:
    """Consecutive runs of one dtype and device, closed once they reach ``bucket_elements``."""
    buckets: list[Bucket] = []
    elements = 0
    for p in params:
        last = buckets[-1].params if buckets else None
        same_kind = last is not None and (last[0].dtype, last[0].device) == (p.dtype, p.device)
        if not same_kind or elements >= bucket_elements:
            buckets.append(Bucket([p]))
            elements = p.numel()
        else:
            buckets[-1].params.append(p)
            elements += p.numel()
    return buckets


def pack(params: list[nn.Parameter]) -> tuple[torch.Tensor, bool]:
    """(the gradients, zeros where None, then one presence flag per parameter, as one flat
    tensor; whether some gradient is None on this rank)."""
    first = params[0]
    grads = [p.grad for p in params]
    parts = [
        g.reshape(-1) if g is not None else first.new_zeros(p.numel())
        for p, g in zip(params, grads, strict=True)
    ]
    flags = first.new_ones(len(grads))  # a fill, not a host-to-device copy (which would sync)
    for i, g in enumerate(grads):
        if g is None:
            flags[i] = 0
    return torch.cat([*parts, flags]), any(g is None for g in grads)


def unpack(params: list[nn.Parameter], summed: torch.Tensor, missing: bool, size: int) -> None:
    """Writes the averages of an all-reduced (summed) ``pack`` back into the gradients."""
    values = summed[: summed.numel() - len(params)]
    values.div_(size)
    present = summed[values.numel() :].tolist() if missing else [1.0] * len(params)
    views = values.split([p.numel() for p in params])
    for p, view, anywhere in zip(params, views, present, strict=True):
        if not anywhere:
            continue  # None on every rank: stays None
        if p.grad is None:
            p.grad = view.view_as(p).clone()
        else:
            p.grad.copy_(view.view_as(p))


def average(params: list[nn.Parameter], group: ProcessGroup, bucket_elements: int) -> None:
    """Average the gradients of ``params`` over ``group`` now (a collective)."""
    size = dist.get_world_size(group)
    if size == 1 or not params:
        return
    for bucket in make_buckets(params, bucket_elements):
        flat, missing = pack(bucket.params)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        unpack(bucket.params, flat, missing, size)
