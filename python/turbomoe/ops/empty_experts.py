"""The experts' weight gradient with the empty experts' zeros written beside the next kernels.

Under skewed routing most experts of a layer get no rows (the benchmark model's router: ~88 of
128), and their slices of dw are zeros that the grad-weight GEMM stores itself: 553 of the 805 MB
of the gate/up gradient, which makes that GEMM wait on DRAM. With ``TURBOMOE_DW_ZEROS_ASIDE=1``
the GEMM skips those slices (``tm_grouped_gemm_backward_weight_routed``) and
``tm_zero_empty_experts`` writes them on a side stream, where they overlap what the backward runs
next (the layer's attention backward, compute-bound). The side stream joins the current
one when the backward ends, before anything (the optimizer, a gradient norm) reads the
gradients; the tensors it writes and reads are kept alive until then, so no allocation reuses
them early. Opt-in until measured on a GPU.
"""

from __future__ import annotations

import os

import torch

from turbomoe import _native

_side_streams: dict[int, torch.cuda.Stream] = {}
# (offsets, dw) of every zero fill not yet joined.
_pending: list[tuple[torch.Tensor, torch.Tensor]] = []
# The backward (autograd graph task) whose end joins them; a backward that died before its end
# left its callback unrun, so a later one queues its own.
_join_task: int | None = None


def zeros_aside_requested() -> bool:
    return os.environ.get("TURBOMOE_DW_ZEROS_ASIDE", "0") == "1"


def usable(x: torch.Tensor) -> bool:
    """Whether the zeros can go aside for a gradient on x's device: CUDA, plain eager mode."""
    return (
        x.is_cuda
        and zeros_aside_requested()
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = torch.cuda.Stream(device=index)
        _side_streams[index] = stream
    return stream


def join() -> None:
    """Makes the current stream of each device with pending zeros wait for them."""
    global _join_task
    _join_task = None
    devices = {dw.device for _, dw in _pending}
    for device in devices:
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))
    _pending.clear()


def zero_empty_experts_aside(expert_offsets: torch.Tensor, dw: torch.Tensor) -> None:
    """Zeroes dw[e] for the experts without rows on the side stream, after the work queued so far
    on the current stream; joined at the end of the running backward (at once outside one)."""
    global _join_task
    side = _side_stream(dw.device)
    side.wait_stream(torch.cuda.current_stream(dw.device))
    with torch.cuda.stream(side):
        _native.call(
            "tm_zero_empty_experts",
            _native.describe(expert_offsets),
            _native.describe(dw),
            _native.stream_for(dw),
        )
    _pending.append((expert_offsets, dw))
    task = torch._C._current_graph_task_id()
    if task < 0:  # not inside a backward: nothing later to hide the zeros behind
        join()
    elif task != _join_task:
        torch.autograd.Variable._execution_engine.queue_callback(join)
        _join_task = task
