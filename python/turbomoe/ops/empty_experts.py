"""The experts' weight gradient with the empty experts' zeros written beside the next kernels.

Under skewed routing most experts of a layer get no rows (the benchmark model's router: ~88 of
128), and their slices of dw are zeros that the grad-weight GEMM stores itself: 553 of the 805 MB
of the gate/up gradient, which makes that GEMM wait on DRAM. With ``TURBOMOE_DW_ZEROS_ASIDE=1``
the GEMM skips those slices (``tm_grouped_gemm_backward_weight_routed``) and
``tm_zero_empty_experts`` writes them on a side stream, where they overlap what the backward runs
next (the layer's attention backward, compute-bound). The side stream joins the current one when
the backward ends, before the optimizer or a gradient norm reads the gradients.

That is only right where nothing reads the gradient before the backward ends (``can_defer``):
the weight is a leaf used once in the graph (two uses would have autograd sum their gradients)
whose ``.grad`` is empty and carries no hooks, so that autograd's AccumulateGrad stores the
tensor without reading it; not under ``create_graph``; not under torch.distributed, whose
reducers hook the gradient accumulators out of Python's sight.
Anywhere else the GEMM writes the zeros itself as usual. The memory the side stream writes and
reads is marked as in use by it (``record_stream``), not held by a reference: a reference would
make AccumulateGrad copy the gradient, reading it before the zeros land. Opt-in until measured
on a GPU.
"""

from __future__ import annotations

import os

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from turbomoe import _native

_side_streams: dict[int, torch.cuda.Stream] = {}
# Devices whose side stream has zero fills the current stream has not waited for yet.
_pending: set[torch.device] = set()
# The backward (autograd graph task) whose end joins them; a backward that died before its end
# left its callback unrun, so a later one queues its own.
_join_task: int | None = None
# Forward uses of each weight since the last backward ended (track_weight).
_uses: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def zeros_aside_requested() -> bool:
    return os.environ.get("TURBOMOE_DW_ZEROS_ASIDE", "0") == "1"


def defer_zeros(x: torch.Tensor, weight_leaf: torch.Tensor | None) -> bool:
    """Whether the grad-weight of x's op leaves the empty experts to zero_empty_experts_aside:
    switched on, CUDA, plain eager mode, and can_defer. With the switch on in a backward, also
    queues the end-of-backward reset of the use counts, deferred or not."""
    if not (
        x.is_cuda
        and zeros_aside_requested()
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    ):
        return False
    at_end_of_backward()
    return can_defer(weight_leaf)


def track_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight if its gradient goes straight to AccumulateGrad (a leaf), else None; with the
    switch on, counts the use (a forward's setup records each op that will need its gradient)."""
    if not (weight.is_leaf and weight.requires_grad):
        return None
    if zeros_aside_requested():
        _uses[weight] = _uses.get(weight, 0) + 1
    return weight


def can_defer(weight_leaf: torch.Tensor | None) -> bool:
    """Whether the gradient of this weight may still be written after it is handed to autograd:
    nothing reads it before the backward ends (module docstring)."""
    if weight_leaf is None or weight_leaf.grad is not None or torch.is_grad_enabled():
        return False
    if _uses.get(weight_leaf, 0) != 1:
        return False
    if weight_leaf._backward_hooks or getattr(weight_leaf, "_post_accumulate_grad_hooks", None):
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = torch.cuda.Stream(device=index)
        _side_streams[index] = stream
    return stream


def join() -> None:
    """Makes the current stream of each device with pending zeros wait for them."""
    for device in _pending:
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))
    _pending.clear()


def _end_of_backward() -> None:
    global _join_task
    _join_task = None
    join()
    _uses.clear()


def at_end_of_backward() -> None:
    """Queues, once per backward, the join of the side stream and the reset of the use counts
    (a weight's gradient computed outside a backward joins at once)."""
    global _join_task
    task = torch._C._current_graph_task_id()
    if task >= 0 and task != _join_task:
        torch.autograd.Variable._execution_engine.queue_callback(_end_of_backward)
        _join_task = task


def zero_empty_experts_aside(expert_offsets: torch.Tensor, dw: torch.Tensor) -> None:
    """Zeroes dw[e] for the experts without rows on the side stream, after the work queued so far
    on the current stream; joined at the end of the running backward, which defer_zeros has
    queued (at once outside one)."""
    side = _side_stream(dw.device)
    side.wait_stream(torch.cuda.current_stream(dw.device))
    with torch.cuda.stream(side):
        _native.call(
            "tm_zero_empty_experts",
            _native.describe(expert_offsets),
            _native.describe(dw),
            _native.stream_for(dw),
        )
    # Freed before the join (offsets when this backward step returns), their memory must not
    # be handed out again until the side stream is done with it.
    expert_offsets.record_stream(side)
    dw.record_stream(side)
    _pending.add(dw.device)
    if torch._C._current_graph_task_id() < 0:  # outside a backward: nothing to hide them behind
        join()
