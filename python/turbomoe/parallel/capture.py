"""When an expert-parallel step can be captured in one CUDA graph, and how its exchange size is
fixed for the capture and every replay.

A layer's exchange needs nothing from the host when the owner's expert buffers are padded to
every slot it could receive (``ep_size <= TURBOMOE_EP_PADDED_MAX_EP``, 2 by default), the
tokens go through in one chunk, the dense weights are replicated (FSDP's all-gathers and hooks
are outside what ``GraphedStep`` handles) and their gradients are averaged at the end of the
backward (not by the overlap's hooks). What is left on the host is the agreement on the block
size at the start of each forward: ``frozen_capacity`` does it before the step instead, outside
the graph, and keeps the model's pre-hook from doing it again inside; the graph is then keyed by
that size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from turbomoe.parallel.dispatch import (
    PADDED_EXPERT_BUFFERS_MAX_EP,
    agree_step,
    configured_chunks,
    expert_shard,
)
from turbomoe.parallel.mesh import ExpertShard


def _shards(model: nn.Module) -> list[ExpertShard]:
    return [s for m in model.modules() if (s := expert_shard(m)) is not None]


def capture_refusal(model: nn.Module) -> str | None:
    """Why a step of this parallelized model cannot be captured whole, or None when it can."""
    from turbomoe.parallel.grads import DTensor, parallel_state

    state = parallel_state(model)
    if state.fsdp or any(isinstance(p, DTensor) for p in model.parameters()):
        return "its dense parameters are under FSDP"
    if state.overlap is not None:
        return "its dense gradients are averaged during the backward (TURBOMOE_DENSE_OVERLAP=1)"
    if state.ep_size > PADDED_EXPERT_BUFFERS_MAX_EP:
        return (
            f"at ep_size {state.ep_size} the expert owner reads its routed-slot count on the host "
            f"in every layer (padded buffers only up to TURBOMOE_EP_PADDED_MAX_EP="
            f"{PADDED_EXPERT_BUFFERS_MAX_EP})"
        )
    if configured_chunks() != 1:
        return "its exchanges run in chunks on a side stream (TURBOMOE_EP_CHUNKS)"
    return None


def agree_capacity(model: nn.Module, tokens: int) -> int | None:
    """The exchange block size for a step of ``tokens`` tokens on this rank (a collective: the
    largest count of any rank), or None when the model has no sharded experts."""
    shards = _shards(model)
    if not shards:
        return None
    return agree_step(shards[0], tokens)


@contextlib.contextmanager
def frozen_capacity(model: nn.Module) -> Iterator[None]:
    """Within the block the model's forward uses the block size agreed last (by
    ``agree_capacity``) instead of agreeing again on the host."""
    shards = _shards(model)
    if not shards:
        yield
        return
    capacity = shards[0].capacity  # one per model
    capacity.frozen = True
    try:
        yield
    finally:
        capacity.frozen = False
