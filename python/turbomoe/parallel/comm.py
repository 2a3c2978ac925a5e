"""Collectives for expert parallelism, with autograd.

The token exchange is ``all_to_all_single`` with variable splits: rank r sends ``in_splits[j]``
rows to rank j and receives ``out_splits[j]`` rows from it. Its backward is the same exchange in
reverse (the gradient of each received row goes back to the rank that sent it), so the autograd
Function below is its own transpose with the splits swapped.

Works on any backend that implements ``all_to_all_single`` with splits: gloo (CPU tests) and
NCCL (GPU). A peer that never joins makes the call fail after the process group's timeout
(``init_process_group(timeout=...)``): gloo raises at once; NCCL's watchdog aborts the
communicator (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default) and the next host sync raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """The raw exchange: rows of x grouped by destination rank → rows grouped by source rank."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: ProcessGroup,
    ) -> torch.Tensor:
        ctx.out_splits = out_splits
        ctx.in_splits = in_splits
        ctx.group = group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Every rank runs this backward (the layer graphs are identical across ranks), so the
        # reverse exchange pairs up exactly as the forward did.
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` over ``group`` with variable row splits.

    x [sum(in_splits), ...] holds the rows for rank j at [Σ in_splits[:j], +in_splits[j]); the
    result [sum(out_splits), ...] holds the rows from rank j in the same way.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, out_splits, in_splits, group)
    return _exchange(x, out_splits, in_splits, group)
