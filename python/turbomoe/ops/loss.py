"""Cross-entropy and fused linear cross-entropy as torch custom ops.

The per-row losses come back unreduced (float32, 0 on ignored rows) so that the caller applies
its own reduction (HF divides by the number of items in the batch, not always by the count of
non-ignored labels). ``linear_cross_entropy`` never builds the [N, V] logits beyond one chunk of
rows: with Qwen3's 151,936-token vocabulary a 4096-token sequence would need 2.5 GB of float32
logits, which is most of the activation memory of a small model.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct

# ----------------------------------------------------------------------------- cross-entropy


def row_stats(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 [N] buffers (loss and log-sum-exp) for the N rows of ``rows``; works on fake
    tensors too, so the ops and their fake kernels allocate alike."""
    n = rows.shape[0]
    return rows.new_empty((n,), dtype=torch.float32), rows.new_empty((n,), dtype=torch.float32)


def _ce_forward_into(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    _native.call(
        "tm_cross_entropy_forward",
        _native.describe(logits),
        _native.describe(labels),
        ignore_index,
        _native.describe(loss),
        _native.describe(lse),
        _native.stream_for(logits),
    )


def _ce_backward_into(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    grad_logits: torch.Tensor,
) -> None:
    _native.call(
        "tm_cross_entropy_backward",
        _native.describe(grad_loss),
        _native.describe(logits),
        _native.describe(labels),
        _native.describe(lse),
        ignore_index,
        _native.describe(grad_logits),
        _native.stream_for(logits),
    )


def _ce_forward_backward_into(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad_logits: torch.Tensor,
) -> None:
    """Both of the above in one call; grad_logits may be logits. On CUDA one kernel reads each
    row once under TURBOMOE_CE_ONE_PASS=1 (opt-in until measured faster than the two)."""
    _native.call(
        "tm_cross_entropy_forward_backward",
        _native.describe(grad_loss),
        _native.describe(logits),
        _native.describe(labels),
        ignore_index,
        _native.describe(loss),
        _native.describe(lse),
        _native.describe(grad_logits),
        _native.stream_for(logits),
    )


@torch.library.custom_op("turbomoe::scale_unless_one", mutates_args=("x",))
def scale_unless_one(scale: torch.Tensor, x: torch.Tensor) -> None:
    """x *= scale (one float32 element, rounded to x's dtype) in place, skipped on the device
    when scale is exactly 1: no host sync, and a unit upstream gradient costs one launch."""
    _native.call(
        "tm_scale_unless_one",
        _native.describe(scale),
        _native.describe(x),
        _native.stream_for(x),
    )


@scale_unless_one.register_fake
def _(scale: torch.Tensor, x: torch.Tensor) -> None:
    return None


@torch.library.custom_op("turbomoe::cross_entropy", mutates_args=())
def _cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] f32, lse [N] f32); lse is kept for the backward."""
    loss, lse = row_stats(logits)
    _ce_forward_into(logits, labels, ignore_index, loss, lse)
    return loss, lse


@_cross_entropy.register_fake
def _(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return row_stats(logits)


@torch.library.custom_op("turbomoe::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _ce_backward_into(grad_loss, logits, labels, lse, ignore_index, grad_logits)
    return grad_logits


@_cross_entropy_backward.register_fake
def _(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    return logits.new_empty(logits.shape)


def _ce_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    logits, labels, ignore_index = inputs
    _loss, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse)


def _ce_backward(ctx: Any, grad_loss: torch.Tensor | None, _grad_lse: Any) -> tuple[Any, ...]:
    if grad_loss is None:
        return None, None, None
    logits, labels, lse = ctx.saved_tensors
    grad_logits = _cross_entropy_backward_eager(
        grad_loss.to(torch.float32).contiguous(), logits, labels, lse, ctx.ignore_index
    )
    return grad_logits, None, None


_cross_entropy_eager = differentiable(_cross_entropy, _ce_setup, _ce_backward)
_cross_entropy_backward_eager = direct(_cross_entropy_backward)


def _labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels as the C ABI takes them: int64, contiguous (int32 labels are widened)."""
    if labels.dtype == torch.int32:
        labels = labels.to(torch.int64)
    return labels.contiguous()


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-row cross-entropy of logits [N,V] against labels [N] → float32 [N].

    Rows whose label is ignore_index get loss 0 and no gradient. Differentiable with respect to
    logits; the softmax is recomputed in the backward from the saved log-sum-exp.
    """
    loss, _lse = _cross_entropy_eager(logits.contiguous(), _labels(labels), int(ignore_index))
    return loss


# ---------------------------------------------------------------------- linear cross-entropy


def _lce_params(ignore_index: int, chunk_rows: int) -> Any:
    return _native.make_params(
        _native.LinearCeParams, ignore_index=ignore_index, chunk_rows=chunk_rows
    )


def _lce_workspace(params: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    nbytes = _native.workspace_size(
        "tm_linear_cross_entropy_workspace_size",
        params,
        hidden.shape[0],
        hidden.shape[1],
        weight.shape[0],
        _native.device_code(hidden),
    )
    return _native.workspace(nbytes, hidden)


def _chunks(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def _lce_forward_cuda(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """cuBLAS (torch.mm) for each chunk's logits, turbomoe's CE kernel for the loss.

    The C linear-CE has no CUDA path (its GEMMs are torch's job on the GPU), so the chunk loop
    lives here; only one [chunk_rows, V] logits buffer is alive at a time.
    """
    for start, end in _chunks(hidden.shape[0], chunk_rows):
        logits = torch.mm(hidden[start:end], weight.t())
        _ce_forward_into(logits, labels[start:end], ignore_index, loss[start:end], lse[start:end])


def _lce_backward_cuda(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    grad_hidden: torch.Tensor,
    grad_weight: torch.Tensor | None,
    loss_out: torch.Tensor | None = None,
) -> None:
    """Recomputes each chunk's logits, turns them into dlogits in place, and accumulates.

    grad_weight is summed over chunks in float32 whatever weight's dtype, so that many chunks do
    not add bfloat16 rounding at every step. With ``loss_out`` this is the forward and the
    backward in one pass (ops/loss_total.py): each chunk's loss and lse are computed from the
    logits first and written to ``loss_out`` / ``lse``, so no logits are ever computed twice.
    """
    chunks = _chunks(hidden.shape[0], chunk_rows)
    # One chunk (the common case: a 4096-token step with the default chunk) needs no running sum,
    # so its product goes straight into grad_weight and the [V, H] float32 buffer (1.2 GB for
    # Qwen3's head) is never allocated.
    direct = grad_weight is not None and len(chunks) == 1 and grad_weight.dtype == hidden.dtype
    accumulate = None
    if grad_weight is not None and not direct:
        accumulate = (
            grad_weight
            if grad_weight.dtype == torch.float32
            else torch.zeros(grad_weight.shape, dtype=torch.float32, device=grad_weight.device)
        )
        if accumulate is grad_weight:
            accumulate.zero_()
    for start, end in chunks:
        h = hidden[start:end]
        logits = torch.mm(h, weight.t())
        if loss_out is not None:
            _ce_forward_backward_into(
                grad_loss[start:end],
                logits,
                labels[start:end],
                ignore_index,
                loss_out[start:end],
                lse[start:end],
                logits,
            )
        else:
            _ce_backward_into(
                grad_loss[start:end],
                logits,
                labels[start:end],
                lse[start:end],
                ignore_index,
                logits,
            )
        torch.mm(logits, weight, out=grad_hidden[start:end])
        if direct:
            torch.mm(logits.t(), h, out=grad_weight)
        elif accumulate is not None:
            if accumulate.dtype == logits.dtype:
                accumulate.addmm_(logits.t(), h)
            else:
                accumulate.add_(torch.mm(logits.t(), h))
    if accumulate is not None and accumulate is not grad_weight:
        grad_weight.copy_(accumulate)


def grad_buffers(
    hidden: torch.Tensor, weight: torch.Tensor, need_weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (hidden, lm_head) gradients' buffers: like hidden, and like weight or [0, H] when the
    lm_head gradient is not wanted (a custom op's outputs cannot be None). Works on fake tensors
    too, so the ops and their fake kernels allocate alike."""
    shape = weight.shape if need_weight_grad else (0, weight.shape[1])
    return hidden.new_empty(hidden.shape), weight.new_empty(shape)


def lce_forward_into(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    loss: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Per-row loss and lse of hidden · weightᵀ into loss / lse: cuBLAS chunks on CUDA, the C
    reference on CPU."""
    if hidden.device.type == "cuda":
        _lce_forward_cuda(hidden, weight, labels, ignore_index, chunk_rows, loss, lse)
        return
    params = _lce_params(ignore_index, chunk_rows)
    workspace = _lce_workspace(params, hidden, weight)
    _native.call(
        "tm_linear_cross_entropy_forward",
        params,
        _native.describe(hidden),
        _native.describe(weight),
        _native.describe(labels),
        _native.describe(loss),
        _native.describe(lse),
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(hidden),
    )


def lce_backward_into(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    grad_hidden: torch.Tensor,
    grad_weight: torch.Tensor | None,
) -> None:
    """The gradients for per-row gradient grad_loss into grad_hidden / grad_weight (None: the
    weight's gradient is not wanted)."""
    if hidden.device.type == "cuda":
        _lce_backward_cuda(
            grad_loss,
            hidden,
            weight,
            labels,
            lse,
            ignore_index,
            chunk_rows,
            grad_hidden,
            grad_weight,
        )
        return
    params = _lce_params(ignore_index, chunk_rows)
    workspace = _lce_workspace(params, hidden, weight)
    _native.call(
        "tm_linear_cross_entropy_backward",
        params,
        _native.describe(grad_loss),
        _native.describe(hidden),
        _native.describe(weight),
        _native.describe(labels),
        _native.describe(lse),
        _native.describe(grad_hidden),
        _native.describe(grad_weight),
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(hidden),
    )


@torch.library.custom_op("turbomoe::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] f32, lse [N] f32) of logits = hidden · weightᵀ, computed chunk by chunk."""
    loss, lse = row_stats(hidden)
    lce_forward_into(hidden, weight, labels, ignore_index, chunk_rows, loss, lse)
    return loss, lse


@_linear_cross_entropy.register_fake
def _(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return row_stats(hidden)


@torch.library.custom_op("turbomoe::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden [N,H], grad_weight [V,H] in weight's dtype, or empty when not wanted)."""
    grad_hidden, grad_weight = grad_buffers(hidden, weight, need_weight_grad)
    wanted = grad_weight if need_weight_grad else None
    lce_backward_into(
        grad_loss, hidden, weight, labels, lse, ignore_index, chunk_rows, grad_hidden, wanted
    )
    return grad_hidden, grad_weight


@_linear_cross_entropy_backward.register_fake
def _(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return grad_buffers(hidden, weight, need_weight_grad)


def _lce_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    hidden, weight, labels, ignore_index, chunk_rows = inputs
    _loss, lse = output
    ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
    ctx.need_weight_grad = ctx.needs_input_grad[1]
    ctx.mark_non_differentiable(lse)


def _lce_backward(ctx: Any, grad_loss: torch.Tensor | None, _grad_lse: Any) -> tuple[Any, ...]:
    if grad_loss is None:
        return None, None, None, None, None
    hidden, weight, labels, lse = ctx.saved_tensors
    grad_hidden, grad_weight = _linear_cross_entropy_backward_eager(
        grad_loss.to(torch.float32).contiguous(),
        hidden,
        weight,
        labels,
        lse,
        ctx.ignore_index,
        ctx.chunk_rows,
        ctx.need_weight_grad,
    )
    return grad_hidden, grad_weight if ctx.need_weight_grad else None, None, None, None


_linear_cross_entropy_eager = differentiable(_linear_cross_entropy, _lce_setup, _lce_backward)
_linear_cross_entropy_backward_eager = direct(_linear_cross_entropy_backward)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """Per-row cross-entropy of hidden [N,H] · weight [V,H]ᵀ against labels [N] → float32 [N].

    Only chunk_rows rows of logits exist at a time, in the forward and in the backward (which
    recomputes them). Rows labelled ignore_index get 0. Differentiable with respect to hidden and
    weight (the lm_head); a frozen weight's gradient is skipped.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
    return _linear_cross_entropy_eager(
        hidden.contiguous(),
        weight.contiguous(),
        _labels(labels),
        int(ignore_index),
        int(chunk_rows),
    )[0]
