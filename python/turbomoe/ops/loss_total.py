"""Summed fused linear cross-entropy whose gradients are computed in the forward.

``linear_cross_entropy`` returns per-row losses, so its backward must wait for the per-row
gradient and recompute each chunk's logits: four [N, H] x [H, V] GEMMs in all (logits, logits
again, d hidden, d weight). When the caller reduces the rows with a single scale, as every causal
LM loss does (the sum over rows divided by the item count), the gradient of the sum can be formed
while the logits are still there, and the backward only scales it: three GEMMs, the lm_head's
minimum. With Qwen3's 151,936-token head and a 4096-token step that is 2.5 TFLOP (about 3 ms on
an H200) less per step. The price is that the weight's gradient ([V, H] in the weight's dtype)
is held from the forward to the backward, where the recompute held nothing.

The causal LM loss divides the sum by the item count (a device tensor); passing it as ``divisor``
folds that division into the per-row gradient the kernels apply in float32, so the upstream
gradient the backward scales by is the autograd seed itself, normally exactly 1. The backward
returns the stored gradients themselves, scaled in place in their own dtype (the upstream scalar
rounded to it) by a kernel that reads the scalar on the device and does nothing when it is 1:
scaling out of place read and wrote the whole [V, H] lm_head gradient every step (0.55 ms and a
second 622 MB buffer for Qwen3's head on an H100) to multiply it by one. Since the tensors handed
out are the stored ones (and may be changed by the caller, e.g. clipped in place), the backward
runs once per forward: a second one through a retained graph stops with autograd's error about
saved tensors modified in place, rather than returning gradients the caller may have altered.

The same chunking as ``linear_cross_entropy`` bounds the logits to one [chunk_rows, V] buffer.
On CPU the op runs the C reference's forward and backward (so it is tested against the same
reference); the HF loss uses it on CUDA only, where the GEMMs dominate.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe.ops._eager import differentiable, eager_ok
from turbomoe.ops.loss import (
    _labels,
    _lce_backward_cuda,
    grad_buffers,
    lce_backward_into,
    lce_forward_into,
    row_stats,
    scale_unless_one,
)


@torch.library.custom_op("turbomoe::linear_cross_entropy_total", mutates_args=())
def _linear_cross_entropy_total(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_weight_grad: bool,
    divisor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ_rows loss / divisor [] f32, its gradients: d/d hidden [N,H], d/d weight [V,H] or
    [0,H]); divisor is a one-element tensor on hidden's device."""
    rows = hidden.shape[0]
    loss, lse = row_stats(hidden)
    grad_hidden, grad_weight = grad_buffers(hidden, weight, need_weight_grad)
    wanted = grad_weight if need_weight_grad else None
    scale = divisor.reshape(()).to(torch.float32).reciprocal()
    unit = scale.expand(rows).contiguous()
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
    return loss.sum() * scale, grad_hidden, grad_weight


@_linear_cross_entropy_total.register_fake
def _(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_rows: int,
    need_weight_grad: bool,
    divisor: torch.Tensor,
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


def _backward(ctx: Any, grad_total: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
    if grad_total is None:
        return None, None, None, None, None, None, None
    grad_hidden, grad_weight = ctx.saved_tensors
    stored = [grad_hidden, grad_weight] if ctx.need_weight_grad else [grad_hidden]
    if eager_ok((grad_total, *stored)):
        # Eager: handed out themselves, scaled in place unless the upstream gradient is exactly
        # 1 (decided on the device; see the module docstring). The in-place op bumps their
        # version, so a second backward through a retained graph stops at autograd's check of
        # the saved tensors.
        seed = grad_total.detach().reshape(1).to(torch.float32)
        for g in stored:
            scale_unless_one(seed, g)
        scaled = stored
    else:
        # Traced (torch.compile, fake / functional tensors, a dispatch mode): AOT autograd cannot
        # return a forward output from the backward, so the traced graph scales out of place.
        scaled = list(torch._foreach_mul(stored, grad_total.to(grad_hidden.dtype)))
    weight_grad = scaled[1] if ctx.need_weight_grad else None
    return scaled[0], weight_grad, None, None, None, None, None


_total_eager = differentiable(_linear_cross_entropy_total, _setup, _backward)


def linear_cross_entropy_total(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 4096,
    divisor: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Σ over rows of the cross-entropy of hidden [N,H] · weight [V,H]ᵀ against labels [N],
    divided by ``divisor`` when given (a number or a one-element tensor, e.g. the item count of a
    mean; it gets no gradient).

    A float32 scalar, the sum of ``linear_cross_entropy``'s per-row losses (ignored rows count
    0). The gradients with respect to hidden and weight (when weight requires grad) are formed in
    the forward; the backward only scales them.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
    if divisor is None:
        divisor = torch.ones((), dtype=torch.float32, device=hidden.device)
    elif not isinstance(divisor, torch.Tensor):
        divisor = torch.tensor(float(divisor), dtype=torch.float32, device=hidden.device)
    if divisor.numel() != 1:
        raise ValueError(f"divisor must have one element, got shape {tuple(divisor.shape)}")
    need_weight_grad = torch.is_grad_enabled() and weight.requires_grad
    total, _grad_hidden, _grad_weight = _total_eager(
        hidden.contiguous(),
        weight.contiguous(),
        _labels(labels),
        int(ignore_index),
        int(chunk_rows),
        bool(need_weight_grad),
        divisor.detach().to(hidden.device),
    )
    return total
