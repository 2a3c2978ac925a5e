"""Summed fused linear cross-entropy whose gradients are computed in the forward.

``linear_cross_entropy`` returns per-row losses, so its backward must wait for the per-row
gradient and recompute each chunk's logits: four [N, H] x [H, V] GEMMs in all (logits, logits
again, d hidden, d weight). When the caller reduces the rows with a single scale, as every causal
LM loss does (the sum over rows divided by the item count), the gradient of the sum can be formed
while the logits are still there, and the backward only scales it: three GEMMs, the lm_head's
minimum. With Qwen3's 151,936-token head and a 4096-token step that is 2.5 TFLOP (about 3 ms on
an H200) less per step. The price is that the weight's gradient ([V, H] in the weight's dtype)
is held from the forward to the backward, where the recompute held nothing.

The same chunking as ``linear_cross_entropy`` bounds the logits to one [chunk_rows, V] buffer.
On CPU the op runs the C reference's forward and backward (so it is tested against the same
reference); the HF loss uses it on CUDA only, where the GEMMs dominate.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe.ops._eager import differentiable
from turbomoe.ops.loss import (
    _labels,
    _lce_backward_cuda,
    grad_buffers,
    lce_backward_into,
    lce_forward_into,
    row_stats,
)


@torch.library.custom_op("turbomoe::linear_cross_entropy_total", mutates_args=())
def _linear_cross_entropy_total(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_rows loss [] f32, d Σ / d hidden [N,H], d Σ / d weight [V,H] or [0,H])."""
    rows = hidden.shape[0]
    loss, lse = row_stats(hidden)
    grad_hidden, grad_weight = grad_buffers(hidden, weight, need_weight_grad)
    wanted = grad_weight if need_weight_grad else None
    unit = torch.ones((rows,), dtype=torch.float32, device=hidden.device)
    if hidden.device.type == "cuda":
        # One pass: each chunk's logits give its loss, then its gradients, never recomputed.
        _lce_backward_cuda(
            unit, hidden, weight, labels, lse, ignore_index, chunk_rows, grad_hidden, wanted, loss
        )
    else:  # the C reference: its forward, then its backward with a unit gradient per row
        lce_forward_into(hidden, weight, labels, ignore_index, chunk_rows, loss, lse)
        lce_backward_into(
            unit, hidden, weight, labels, lse, ignore_index, chunk_rows, grad_hidden, wanted
        )
    return loss.sum(), grad_hidden, grad_weight


@_linear_cross_entropy_total.register_fake
def _(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        hidden.new_empty((), dtype=torch.float32),
        *grad_buffers(hidden, weight, need_weight_grad),
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _total, grad_hidden, grad_weight = output
    ctx.need_weight_grad = inputs[5]
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.mark_non_differentiable(grad_hidden, grad_weight)


def _backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    grad_hidden, grad_weight = ctx.saved_tensors
    # bf16 x float32 0-dim: the product is computed in float32 and rounded once to bf16.
    # Out of place, so that a retained graph can run its backward again.
    scale = grad_total.to(torch.float32)
    weight_grad = grad_weight * scale if ctx.need_weight_grad else None
    return grad_hidden * scale, weight_grad, None, None, None, None


_linear_cross_entropy_total.register_autograd(_backward, setup_context=_setup)
_total_eager = differentiable(_linear_cross_entropy_total, _setup, _backward)


def linear_cross_entropy_total(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """Σ over rows of the cross-entropy of hidden [N,H] · weight [V,H]ᵀ against labels [N].

    A float32 scalar, the sum of ``linear_cross_entropy``'s per-row losses (ignored rows count
    0). The gradients with respect to hidden and weight (when weight requires grad) are formed in
    the forward; the backward only scales them.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
    need_weight_grad = torch.is_grad_enabled() and weight.requires_grad
    total, _grad_hidden, _grad_weight = _total_eager(
        hidden.contiguous(),
        weight.contiguous(),
        _labels(labels),
        int(ignore_index),
        int(chunk_rows),
        bool(need_weight_grad),
    )
    return total
