"""The expert-parallel layer in token chunks, its exchanges overlapped with the expert GEMMs.

With ``TURBOMOE_EP_CHUNKS=n`` (n > 1, the same on every rank) a layer's T tokens go through the
exchange as n contiguous chunks of at most ⌈T/n⌉ tokens, each with blocks of ⌈C/n⌉ rows (C the
capacity agreed for the forward). On CUDA every exchange runs on a side stream of high priority
and the current stream joins it through events only where a result is first read, so the queue
order is

    side:    dispatch 0 | dispatch 1 | … | (after experts 0) return 0 | (after experts 1) return 1 …
    current:             (after dispatch 0) experts 0 | (after dispatch 1) experts 1 | … combines

and chunk j+1's dispatch runs while chunk j's experts compute, chunk j's return while chunk
j+1's compute. The autograd engine runs each backward on its forward's stream, so the backward
overlaps the same way. Every rank issues the exchanges in the same order, which is all the
NVLink barrier and NCCL need to pair them.

While chunks are on, the persistent grouped GEMM leaves ``gemm_sm_margin()`` SMs to the
exchanges (process-wide; ``TURBOMOE_GEMM_SM_MARGIN`` sets the count).

Each chunk's result is what the whole layer gives for those tokens (each token's rows, weights
and sums are the same); the expert weights' gradients become a sum over the chunks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from turbomoe import _native
from turbomoe.parallel.dispatch import (
    Agreement,
    finish_return,
    launch_dispatch,
    launch_return,
    local_experts,
    receive,
)
from turbomoe.parallel.knobs import env_int
from turbomoe.parallel.mesh import ExpertShard
from turbomoe.parallel.nvlink import configured_ctas

_side_streams: dict[int, torch.cuda.Stream] = {}
_log = logging.getLogger("turbomoe")
MARGIN_ENV = "TURBOMOE_GEMM_SM_MARGIN"


def gemm_sm_margin() -> int:
    """SMs the grouped GEMMs leave to the exchanges while chunks overlap: TURBOMOE_GEMM_SM_MARGIN,
    else the push's thread blocks (TURBOMOE_EP_NVLINK_CTAS) and two more (the barrier and a
    copy). Without it the persistent GEMM holds every SM and an exchange launched beside it
    waits for the GEMM's end (its blocks fit on no SM), so nothing would overlap."""
    return env_int(MARGIN_ENV, configured_ctas() + 2, 0, 1024)


def _leave_sms_to_exchanges() -> None:
    """Process-wide, from the first chunked layer on (tm_set_gemm_sm_margin)."""
    margin = gemm_sm_margin()
    if _native.lib().tm_gemm_sm_margin() != margin:
        _native.call("tm_set_gemm_sm_margin", margin)
        _log.info("turbomoe: grouped GEMMs leave %d SMs to the overlapped exchanges", margin)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The exchanges' stream on ``device`` (one per device, high priority: an exchange that
    waits behind compute kernels delays every rank)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        low, high = torch.cuda.Stream.priority_range()
        stream = torch.cuda.Stream(device=index, priority=min(low, high))
        _side_streams[index] = stream
    return stream


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) of each chunk: ⌈tokens/chunks⌉ tokens each, the last ones shorter or empty."""
    step = -(-tokens // chunks)
    return [(min(j * step, tokens), min((j + 1) * step, tokens)) for j in range(chunks)]


def chunked_experts_forward(
    module: nn.Module,
    shard: ExpertShard,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    agreed: Agreement,
) -> torch.Tensor:
    """``ep_experts_forward`` in ``agreed.chunks`` chunks: [T, H] → [T, H]."""
    chunks = agreed.chunks
    capacity = -(-agreed.capacity // chunks)  # every rank's chunks fit: ⌈T/n⌉ ≤ ⌈C/n⌉
    if capacity == 0:  # no rank has a token: nothing to exchange
        return hidden_states.new_zeros((0, hidden_states.shape[1])) * hidden_states.sum()
    stream = None
    if hidden_states.is_cuda:
        stream = side_stream(hidden_states.device)
        _leave_sms_to_exchanges()
    bounds = chunk_bounds(hidden_states.shape[0], chunks)
    sendings = []
    for lo, hi in bounds:
        sending = launch_dispatch(
            shard,
            hidden_states[lo:hi],
            top_k_index[lo:hi],
            top_k_weights[lo:hi],
            capacity,
            agreed.in_forward,
            stream,
        )
        assert sending is not None  # capacity > 0
        sendings.append(sending)
    returns = []
    for sending in sendings:
        sent = receive(sending, top_k_weights.dtype)
        returns.append(launch_return(shard, local_experts(module, sent), sent.layout, stream))
    parts = [finish_return(shard, back) for back in returns]
    return torch.cat(parts).to(hidden_states.dtype)
