"""The expert-parallel layer in token chunks, its exchanges overlapped with the expert GEMMs:
the side stream, the GEMMs' SM margin and the chunk bounds (``ep_experts_forward`` runs the
chunks; one chunk is the plain layer, on the current stream).

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

from turbomoe import _native
from turbomoe.parallel.knobs import env_int
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


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The exchanges' stream on ``device`` (one per device, high priority: an exchange that
    waits behind compute kernels delays every rank). Its first use also makes the grouped GEMMs
    leave ``gemm_sm_margin()`` SMs free, process-wide (tm_set_gemm_sm_margin)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        margin = gemm_sm_margin()
        _native.call("tm_set_gemm_sm_margin", margin)
        _log.info("turbomoe: grouped GEMMs leave %d SMs to the overlapped exchanges", margin)
        low, high = torch.cuda.Stream.priority_range()
        stream = torch.cuda.Stream(device=index, priority=min(low, high))
        _side_streams[index] = stream
    return stream


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) of each chunk: ⌈tokens/chunks⌉ tokens each, the last ones shorter or empty."""
    step = -(-tokens // chunks)
    return [(min(j * step, tokens), min((j + 1) * step, tokens)) for j in range(chunks)]
