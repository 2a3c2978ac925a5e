"""Collectives for expert parallelism, with autograd.

``exchange_blocks`` is what the layers call: an equal-block exchange over NVLink peer buffers
(``nvlink.PeerExchange``) when the group's GPUs reach each other, else the all-to-all below.

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

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from turbomoe import _native
from turbomoe.parallel.nvlink import PeerExchange, peer_reachability

_log = logging.getLogger("turbomoe")
TRANSPORTS = ("auto", "nvlink", "nccl")


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


# Per process group: the NVLink exchange, or None for all_to_all_single. Keyed by the group's
# registered name, so that two handles of one group (a DeviceMesh may hand out either) share one
# set of peer buffers.
_chosen: dict[str, PeerExchange | None] = {}


def _choose(group: ProcessGroup, mode: str) -> PeerExchange | None:
    if mode not in TRANSPORTS:
        raise ValueError(f"TURBOMOE_EP_TRANSPORT={mode!r} must be one of {TRANSPORTS}")
    if mode == "nccl":
        return None
    why = None
    if dist.get_backend(group) != "nccl":
        why = f"the process group's backend is {dist.get_backend(group)}, not nccl"
    elif not _native.lib().tm_built_with_cuda():
        why = "libturbomoe was built without CUDA"
    else:
        why = peer_reachability(group)  # collective; the same verdict on every rank
    if why is not None:
        if mode == "nvlink":
            raise ValueError(f"the nvlink transport was asked for, but {why}")
        if dist.get_backend(group) == "nccl":
            _log.warning("turbomoe: expert-parallel exchange over NCCL all-to-all: %s", why)
        return None
    exchange = PeerExchange(group)
    _log.info(
        "turbomoe: expert-parallel exchange over NVLink (CUDA IPC), %d SMs per push", exchange.ctas
    )
    return exchange


def peer_exchange(group: ProcessGroup) -> PeerExchange | None:
    """The NVLink exchange of ``group``, or None when its exchanges use NCCL/gloo
    ``all_to_all_single`` (``TURBOMOE_EP_TRANSPORT``: auto (default), nvlink, nccl). Decided on
    the first call, collectively, and kept for the group."""
    if group.group_name not in _chosen:
        mode = os.environ.get("TURBOMOE_EP_TRANSPORT", "auto")
        _chosen[group.group_name] = _choose(group, mode)
    return _chosen[group.group_name]


def set_transport(group: ProcessGroup, mode: str) -> PeerExchange | None:
    """Decides ``group``'s transport again under ``mode`` (auto, nvlink or nccl), replacing the
    earlier choice: a collective, for benchmarks and tests that compare the transports."""
    previous = _chosen.pop(group.group_name, None)
    if previous is not None:
        previous.close()
    chosen = _choose(group, mode)
    _chosen[group.group_name] = chosen
    return chosen


class _PeerBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block_rows: int, peer: PeerExchange) -> torch.Tensor:
        ctx.block_rows = block_rows
        ctx.peer = peer
        return peer.exchange(x, block_rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Equal blocks make the exchange its own transpose.
        return ctx.peer.exchange(grad, ctx.block_rows), None, None


def exchange_blocks(x: torch.Tensor, block_rows: int, group: ProcessGroup) -> torch.Tensor:
    """Differentiable equal-block all-to-all: x [R·block_rows, ...] sends block j to rank j and
    returns, in block i, what rank i sent here. Over NVLink where the group allows it, else
    ``all_to_all``; every rank takes the same path (the choice and the shapes agree)."""
    peer = peer_exchange(group)
    if peer is not None and peer.fits(x, block_rows):
        if torch.is_grad_enabled() and x.requires_grad:
            return _PeerBlocks.apply(x, block_rows, peer)
        return peer.exchange(x, block_rows)
    splits = [block_rows] * dist.get_world_size(group)
    return all_to_all(x, splits, splits, group)
