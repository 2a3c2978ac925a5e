"""The expert-parallel MoE forward: route locally, send tokens to expert owners, compute, return.

Each rank routes its own tokens with its replica of the router; then for the experts of one
layer:

1. layout — ``ep_layout`` gives, for every (token, destination rank), the token's slot in the
   block of rows sent to that rank (each token once per rank that owns one of its experts).
   Every block has the same fixed size C, the largest token count of any rank in the group,
   agreed once per model forward (``install_capacity_hook``), so the exchange never needs the
   per-rank counts on the host: no host synchronisation inside a layer.
2. dispatch — one exchange of [R·C, H] rows (zero rows pad each block), and one of each
   row's K local expert ids on that rank (the sentinel for slots owned elsewhere and for
   padding) with its K routing weights (0 there), packed as float32. An exchange goes over
   NVLink peer buffers where the group allows it, else NCCL/gloo all-to-all
   (``comm.exchange_blocks``).
3. the owner runs its local experts over the received rows (``ops.moe_experts``: the sentinel
   slots drop out), weighting each slot's output by its routing weight and summing a row's
   slots, so each token comes back once per rank that computed for it, not once per slot.
4. combine — the reverse exchange, then ``ops.combine`` sums each token's rows from the ranks
   that computed for it, in ascending rank order.

Every row copy is a ``gather_rows`` whose backward is a fixed-order ``combine`` (or the reverse),
and every sum runs in a fixed order, so forward and backward are deterministic. The routing
weights travel with the rows, so their gradient comes back through the reverse exchange.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from turbomoe import ops
from turbomoe.parallel.chunked import chunk_bounds, side_stream
from turbomoe.parallel.comm import exchange_blocks
from turbomoe.parallel.knobs import env_int, env_switch
from turbomoe.parallel.mesh import EP_ATTR, ExpertShard


def expert_shard(module: nn.Module) -> ExpertShard | None:
    """The expert-parallel state of an experts module, or None when it is not sharded."""
    shard = getattr(module, EP_ATTR, None)
    return shard if isinstance(shard, ExpertShard) else None


def _agree(shard: ExpertShard, tokens: int, bad: torch.Tensor | None) -> tuple[int, bool, int]:
    """(largest token count in the ep group, whether any rank saw a bad expert id, the chunk
    count every rank configured): one small all-reduce and one host read. Raises ValueError on
    every rank when the ranks' ``TURBOMOE_EP_CHUNKS`` differ (their exchanges would not pair)."""
    device = torch.device("cuda", torch.cuda.current_device()) if _on_nccl(shard) else None
    # A bad value is reported after the all-reduce, so that no rank is left waiting in it.
    try:
        chunks, problem = configured_chunks(), None
    except ValueError as exc:
        chunks, problem = 0, exc
    flag = torch.zeros((), dtype=torch.int64) if bad is None else bad.to(torch.int64).cpu()
    values = torch.stack(
        [
            torch.tensor(tokens, dtype=torch.int64),
            flag.reshape(()),
            torch.tensor(chunks, dtype=torch.int64),
            torch.tensor(-chunks, dtype=torch.int64),
        ]
    )
    if device is not None:
        values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=shard.group)
    capacity, any_bad, most, minus_least = values.tolist()
    if problem is not None:
        raise problem
    if minus_least == 0:
        raise ValueError(f"{CHUNKS_ENV} is invalid on another expert-parallel rank")
    if most != -minus_least:
        raise ValueError(
            f"{CHUNKS_ENV} differs across the expert-parallel ranks (from {-minus_least} to "
            f"{most}); set the same value on every rank"
        )
    return int(capacity), bool(any_bad), int(most)


def _on_nccl(shard: ExpertShard) -> bool:
    return dist.get_backend(shard.group) == "nccl"


def install_capacity_hook(model: nn.Module) -> None:
    """Agree on the exchange's block size once per forward of ``model`` (a pre-hook): the
    largest token count (batch x sequence) of any rank, shared by every experts module."""
    shards = [s for m in model.modules() if (s := expert_shard(m)) is not None]
    if not shards:
        return
    shard = shards[0]

    def agree(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if shard.capacity.frozen:  # agreed before a captured step (parallel/capture.py)
            return
        tokens = step_tokens(
            kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        )
        if tokens is None:
            shard.capacity.value = None  # unknown: each layer agrees for itself
            return
        agree_step(shard, tokens)

    model.register_forward_pre_hook(agree, with_kwargs=True)


def step_tokens(input_ids: Any, inputs_embeds: Any) -> int | None:
    """This rank's tokens in a model call (batch x sequence), or None when neither is given."""
    if isinstance(input_ids, torch.Tensor):
        return input_ids.numel()
    if isinstance(inputs_embeds, torch.Tensor):
        return inputs_embeds.shape[:-1].numel()
    return None


def agree_step(shard: ExpertShard, tokens: int) -> int:
    """Agrees the exchange's block size for a model step of ``tokens`` tokens on this rank (a
    collective) and keeps it, with the chunk count, for every layer; returns it."""
    capacity, _, chunks = _agree(shard, tokens, None)
    shard.capacity.value, shard.capacity.chunks = capacity, chunks
    return capacity


# Up to this many ranks the owner's expert buffers are sized for every received slot (R·C·K
# rows, about ep_size times the slots actually routed to it), which keeps the layer free of host
# syncs. Beyond it that padding would dominate the activation memory (at EP 8, 48 layers of the
# Qwen3-30B-A3B shape: ~100 GB), so the owner reads its routed-pair count (one local,
# non-collective sync) and sizes the buffers exactly. TURBOMOE_EP_PADDED_MAX_EP overrides the
# bound (an A/B knob for measuring what that sync costs).
PADDED_EXPERT_BUFFERS_MAX_EP = env_int("TURBOMOE_EP_PADDED_MAX_EP", 2, 1, 1 << 20)

# A layer's tokens can go through the exchange in chunks (``TURBOMOE_EP_CHUNKS``, default 1):
# on CUDA every exchange then runs on a side stream, so that one chunk's exchanges overlap
# another chunk's expert GEMMs (parallel/chunked.py). Every rank must use the same count.
CHUNKS_ENV = "TURBOMOE_EP_CHUNKS"
MAX_CHUNKS = 8


# The owner's experts keep only their input and gate/up output for the backward
# (moe_experts(recompute=True), ops/moe_lean.py) when TURBOMOE_EP_RECOMPUTE=1: ~250 MB less a
# layer at 4 ranks on the Qwen3-30B-A3B shape, for a re-gather and an activation pass in the
# backward. Off until measured on GPUs (perf-notes.md).
RECOMPUTE_ENV = "TURBOMOE_EP_RECOMPUTE"


def configured_recompute() -> bool:
    return env_switch(RECOMPUTE_ENV, False)


def configured_chunks() -> int:
    return env_int(CHUNKS_ENV, 1, 1, MAX_CHUNKS)


class _RoutedPairs:
    """The exact count of received slots for local experts (or None to keep the padded size),
    read so that the host waits for the small ids exchange only, not the rows behind it.

    Construction queues the count and its copy to pinned host memory right after the ids
    arrive; the caller then launches the rows exchange and calls ``result``, which waits for the
    copy alone. The GPU is thus busy with the rows exchange while the host catches up, instead of
    idling for the host's relaunch after a full sync.
    """

    def __init__(self, received_meta: torch.Tensor, top_k: int, shard: ExpertShard) -> None:
        self._value: int | None = None
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        if shard.ep_size <= PADDED_EXPERT_BUFFERS_MAX_EP:
            return
        count = (received_meta[:, :top_k] < shard.num_local).sum()
        if count.device.type != "cuda":
            self._value = int(count)
            return
        self._host = torch.empty((), dtype=count.dtype, pin_memory=True)
        self._host.copy_(count, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def result(self) -> int | None:
        if self._event is not None and self._host is not None:
            self._event.synchronize()
            self._value = int(self._host)
            self._event = self._host = None
        return self._value


class _Layout(NamedTuple):
    capacity: int  # C: rows per (source, destination) block
    tokens: int  # T: this rank's tokens
    send_pairs: torch.Tensor  # [(C+1)·R]: cell t·R + r feeding each send row (zero token past T)
    send_cells: torch.Tensor  # [(C+1)·R]: the inverse, cell → send row r·C + slot (-1 if none)
    meta: torch.Tensor  # [R·C, 2K] float32: local expert ids on the destination, then weights


class Agreement(NamedTuple):
    capacity: int  # C: the largest token count of any rank
    chunks: int  # the token chunks of each layer (TURBOMOE_EP_CHUNKS, the same on every rank)
    in_forward: bool  # agreed by the model's pre-hook (else by this call)


def agreement(shard: ExpertShard, top_k_index: torch.Tensor) -> Agreement:
    """The exchange size of this call: the one agreed for the model's forward, or (outside a
    model forward, or with more tokens than it announced) a fresh agreement, in which every
    rank raises together on a bad expert id instead of leaving the others waiting."""
    tokens = top_k_index.shape[0]
    capacity, chunks = shard.capacity.value, shard.capacity.chunks
    if capacity is not None and tokens <= capacity:
        return Agreement(capacity, chunks, True)
    num_experts = shard.num_experts
    invalid = (top_k_index < 0) | (top_k_index >= num_experts)
    capacity, any_bad, chunks = _agree(shard, tokens, invalid.any())
    if any_bad:
        raise ValueError(
            f"expert ids outside [0, {num_experts}) reached the expert-parallel dispatch "
            "(on this rank or a peer)"
        )
    return Agreement(capacity, chunks, False)


def _layout(
    shard: ExpertShard,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    capacity: int,
    in_forward: bool,
) -> _Layout:
    # One kernel for the placement, one for the send plan (rows, inverse, ids + weights).
    plan = ops.ep_send_plan(top_k_index, top_k_weights, shard.num_experts, shard.ep_size, capacity)
    if in_forward:
        # Inside a model forward the ids come from the router; a bad one stops the step loudly
        # (a device-side assert on CUDA) rather than costing a host sync in every layer.
        torch._assert_async(plan.bad_ids[0] == 0, "expert id out of range")
    return _Layout(capacity, top_k_index.shape[0], plan.send_pairs, plan.pair_to_row, plan.meta)


class Dispatched(NamedTuple):
    """What ``dispatch`` delivered to this rank, and what ``combine_back`` needs."""

    rows: torch.Tensor  # [R·C, H]: block j holds the tokens rank j sent here (zero padding)
    ids: torch.Tensor  # [R·C, K] int32: their local expert ids here, num_local elsewhere
    weights: torch.Tensor  # [R·C, K]: the routing weights of those slots, 0 elsewhere
    layout: _Layout
    routed_pairs: int | None  # received slots for local experts; None: buffers stay padded


class Sending(NamedTuple):
    """A dispatch whose exchanges are queued (on ``stream`` when given): what ``receive`` needs."""

    rows: torch.Tensor  # [R·C, H] as received
    meta: torch.Tensor  # [R·C, 2K] float32 as received
    pairs: _RoutedPairs
    layout: _Layout
    arrived: torch.cuda.Event | None  # recorded on the side stream after the rows exchange


def launch_dispatch(
    shard: ExpertShard,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    capacity: int,
    in_forward: bool,
    stream: torch.cuda.Stream | None = None,
) -> Sending | None:
    """Layout and gather on the current stream, then the ids/weights and rows exchanges (on
    ``stream`` when given, a side stream the caller joins through ``receive``); None when no
    rank has a token (capacity 0)."""
    group, ranks = shard.group, shard.ep_size
    tokens = hidden_states.shape[0]
    used = ranks * capacity
    if used == 0:
        return None
    lay = _layout(shard, top_k_index, top_k_weights, capacity, in_forward)
    # [0, used] built on the device: a tensor from a host list would be a synchronising copy.
    offsets = torch.arange(2, dtype=torch.int32, device=hidden_states.device) * used
    # The padding rows of every block name the "zero token" past the real ones (cell C·R + r):
    # the gather writes zeros there, so the tokens need no padded copy.
    rows = ops.gather_rows(
        hidden_states,
        lay.send_pairs,
        offsets,
        ranks,
        pair_to_row=lay.send_cells[: tokens * ranks],
    )
    top_k = lay.meta.shape[1] // 2
    with _on(stream, inputs=(rows, lay.meta)):
        # Ids and weights travel as one float32 exchange (local ids are far below 2^24, so
        # exact): one exchange fewer per layer.
        received_meta = exchange_blocks(lay.meta, capacity, group)
        pairs = _RoutedPairs(received_meta, top_k, shard)  # queued before the rows exchange
        received_rows = exchange_blocks(rows[:used], capacity, group)
        arrived = _record(stream)
    return Sending(received_rows, received_meta, pairs, lay, arrived)


def receive(sending: Sending, weights_dtype: torch.dtype) -> Dispatched:
    """Waits (host) for the routed-pair count and (current stream) for the exchanges."""
    routed_pairs = sending.pairs.result()
    _join(sending.arrived, (sending.rows, sending.meta))
    top_k = sending.meta.shape[1] // 2
    return Dispatched(
        sending.rows,
        sending.meta[:, :top_k].to(torch.int32),
        sending.meta[:, top_k:].to(weights_dtype),
        sending.layout,
        routed_pairs,
    )


def dispatch(
    shard: ExpertShard,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> Dispatched | None:
    """Send each token once to every rank owning one of its experts; None when no rank of the
    group has a token (then nothing is exchanged). A collective, differentiable."""
    agreed = agreement(shard, top_k_index)
    sending = launch_dispatch(
        shard, hidden_states, top_k_index, top_k_weights, agreed.capacity, agreed.in_forward
    )
    return None if sending is None else receive(sending, top_k_weights.dtype)


class Returning(NamedTuple):
    returned: torch.Tensor  # [R·C, H]: this rank's tokens as the owners computed them
    layout: _Layout
    arrived: torch.cuda.Event | None


def launch_return(
    shard: ExpertShard,
    outputs: torch.Tensor,
    layout: _Layout,
    stream: torch.cuda.Stream | None = None,
) -> Returning:
    """The owners' rows back to the ranks that sent them (on ``stream`` when given, after the
    current stream's work so far)."""
    with _on(stream, inputs=(outputs,)):
        returned = exchange_blocks(outputs, layout.capacity, shard.group)
        arrived = _record(stream)
    return Returning(returned, layout, arrived)


def finish_return(shard: ExpertShard, back: Returning) -> torch.Tensor:
    """Each token's rows summed over the ranks that computed for it, in rank order: [T, H]."""
    _join(back.arrived, (back.returned,))
    cell_to_row = back.layout.send_cells[: back.layout.tokens * shard.ep_size]  # real tokens
    return ops.combine(back.returned, cell_to_row, None, shard.ep_size)


def combine_back(shard: ExpertShard, outputs: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """The owners' [R·C, H] results back to their tokens, summed over ranks in rank order:
    [T, H]. A collective, differentiable."""
    return finish_return(shard, launch_return(shard, outputs, layout))


@contextlib.contextmanager
def _on(stream: torch.cuda.Stream | None, inputs: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Runs the block on ``stream`` after the current stream's work so far (nothing changes
    when it is None). The inputs, made on the current stream, are marked as used by ``stream``,
    so that the allocator does not hand their memory out again before it has read them."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        yield
    for t in inputs:
        t.record_stream(stream)


def _record(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _join(arrived: torch.cuda.Event | None, outputs: tuple[torch.Tensor, ...]) -> None:
    """The current stream waits for a side stream's exchange; its outputs (made there) are
    marked as used here."""
    if arrived is None:
        return
    current = torch.cuda.current_stream()
    current.wait_event(arrived)
    for t in outputs:
        t.record_stream(current)


def ep_experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts computation of a sharded experts module: [T,H] → [T,H].

    Same contract as transformers' experts functions: top_k_index [T,K] holds global expert ids
    (from this rank's router), top_k_weights [T,K] the routing weights. Every rank of the
    expert-parallel group must call this for the same layer at the same time (it is a
    collective); a rank with no tokens still calls it with T = 0.
    """
    shard = expert_shard(module)
    if shard is None:
        raise ValueError(f"{type(module).__name__} is not sharded by turbomoe.parallel")
    if hidden_states.dim() != 2 or top_k_index.dim() != 2:
        raise ValueError(
            f"hidden_states must be [T, H] and top_k_index [T, K], got "
            f"{tuple(hidden_states.shape)} and {tuple(top_k_index.shape)}"
        )
    agreed = agreement(shard, top_k_index)
    chunks = agreed.chunks
    capacity = -(-agreed.capacity // chunks)  # every rank's chunks fit: ⌈T/n⌉ ≤ ⌈C/n⌉
    if capacity == 0:  # no rank has a token: nothing to exchange
        return hidden_states.new_zeros((0, hidden_states.shape[1])) * hidden_states.sum()
    # Chunks on CUDA: every exchange on a side stream, overlapped with the other chunks'
    # experts (parallel/chunked.py). One chunk: everything on the current stream.
    stream = side_stream(hidden_states.device) if chunks > 1 and hidden_states.is_cuda else None
    sendings = []
    for lo, hi in chunk_bounds(hidden_states.shape[0], chunks):
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
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(hidden_states.dtype)


def local_experts(module: nn.Module, sent: Dispatched) -> torch.Tensor:
    """The owner's experts over the rows it received, each row's slots weighted and summed:
    [R·C, H]."""
    gate_up, down = module.gate_up_proj, module.down_proj
    if gate_up.dtype != sent.rows.dtype:  # e.g. autocast over float32 master weights
        gate_up, down = gate_up.to(sent.rows.dtype), down.to(sent.rows.dtype)
    return ops.moe_experts(
        sent.rows,
        sent.ids,
        sent.weights,
        gate_up,
        down,
        activation="silu",
        interleaved=not getattr(module, "is_concatenated", True),
        routed_pairs=sent.routed_pairs,
        recompute=configured_recompute(),
    )
