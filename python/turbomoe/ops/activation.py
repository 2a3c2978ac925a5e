"""Gated activations as torch custom ops: SwiGLU and GPT-OSS's clamped SwiGLU."""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct

SILU = 1
CLAMPED = 2


def _params(variant: int, alpha: float, limit: float) -> Any:
    return _native.make_params(_native.SwigluParams, variant=variant, alpha=alpha, limit=limit)


@torch.library.custom_op("turbomoe::swiglu", mutates_args=())
def swiglu(
    gate: torch.Tensor, up: torch.Tensor, variant: int, alpha: float, limit: float
) -> torch.Tensor:
    """act(gate) * up element-wise; gate and up may be strided views of one fused buffer."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    params = _params(variant, alpha, limit)
    _native.call(
        "tm_swiglu_forward",
        params,
        _native.describe(gate),
        _native.describe(up),
        _native.describe(out),
        _native.stream_for(gate),
    )
    return out


@swiglu.register_fake
def _(
    gate: torch.Tensor, up: torch.Tensor, variant: int, alpha: float, limit: float
) -> torch.Tensor:
    return gate.new_empty(gate.shape)


@torch.library.custom_op("turbomoe::swiglu_backward", mutates_args=())
def swiglu_backward(
    grad_out: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _native.call(
        "tm_swiglu_backward",
        _params(variant, alpha, limit),
        _native.describe(grad_out),
        _native.describe(gate),
        _native.describe(up),
        _native.describe(grad_gate),
        _native.describe(grad_up),
        _native.stream_for(gate),
    )
    return grad_gate, grad_up


@swiglu_backward.register_fake
def _(
    grad_out: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    gate, up, variant, alpha, limit = inputs
    ctx.save_for_backward(gate, up)
    ctx.variant, ctx.alpha, ctx.limit = variant, alpha, limit


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _swiglu_backward_eager(
        grad_out.contiguous(), gate, up, ctx.variant, ctx.alpha, ctx.limit
    )
    return grad_gate, grad_up, None, None, None


swiglu_eager = differentiable(swiglu, _setup_context, _backward)
_swiglu_backward_eager = direct(swiglu_backward)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the SwiGLU of Qwen, Mixtral, OLMoE and DeepSeek)."""
    return swiglu_eager(gate, up, SILU, 1.0, 1.0)


def clamped_swiglu(
    gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """GPT-OSS's gate: (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    return swiglu_eager(gate, up, CLAMPED, alpha, limit)
