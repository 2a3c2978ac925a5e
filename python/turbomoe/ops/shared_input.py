"""Linear layers that read the same input (the attention's q, k and v projections), with their
input gradients summed inside the GEMMs.

Stock autograd runs each projection's backward on its own and adds the input gradients in
element-wise passes, one fewer than there are projections (two a layer for q/k/v: each reads two
[tokens, hidden] rows and writes one). Here the first input-gradient GEMM writes the sum and the
others accumulate into it (``addmm_`` with beta = 1: cuBLAS adds the existing value in its
epilogue, in float32 before rounding, so the sum is rounded once per GEMM instead of once per
add). The forward is the stock ``F.linear`` of each; the weight gradients are the same GEMMs as
stock's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from turbomoe.ops._eager import eager_ok


class _SharedInputLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(x, *weights)
        ctx.set_materialize_grads(False)
        return tuple(F.linear(x, w) for w in weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad_rows: torch.Tensor | None = None
        weight_grads: list[torch.Tensor | None] = []
        for i, (grad, weight) in enumerate(zip(grads, weights, strict=True)):
            if grad is None:
                weight_grads.append(None)
                continue
            g = grad.reshape(-1, grad.shape[-1])
            if ctx.needs_input_grad[0]:
                if grad_rows is None:
                    grad_rows = torch.mm(g, weight)
                else:
                    grad_rows.addmm_(g, weight)
            weight_grads.append(torch.mm(g.t(), rows) if ctx.needs_input_grad[1 + i] else None)
        grad_x = None if grad_rows is None else grad_rows.view(x.shape)
        return (grad_x, *weight_grads)


def shared_input_linears(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(x, w) for w in weights)`` (no biases), whose backward sums the input
    gradients inside the GEMMs. Plain ``F.linear`` calls where a graph is being traced, a
    dispatch mode is active or a tensor is a subclass (the function is for eager training)."""
    if not weights:
        raise ValueError("shared_input_linears needs at least one weight")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weight {tuple(w.shape)} does not take inputs of {x.shape[-1]}")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"weight in {w.dtype} on {w.device}, input in {x.dtype} on {x.device}")
    args = (x, *weights)
    if eager_ok(args) and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _SharedInputLinears.apply(x, *weights)
    return tuple(F.linear(x, w) for w in weights)
