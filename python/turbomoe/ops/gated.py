"""The gated activation of a fused gate/up buffer as one custom op.

Applying ``swiglu`` to two strided views of the grouped GEMM's [M, 2I] output is correct, but
autograd then builds the buffer's gradient from two zero-filled [M, 2I] tensors (one per slice)
and adds them: two extra fills, two copies and an add of the largest activation of the layer.
Here the backward writes d(gate) and d(up) straight into the two halves (or the interleaved
columns) of one [M, 2I] gradient, since the C ABI accepts strided output views.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct
from turbomoe.ops.activation import CLAMPED, SILU, swiglu_eager


def _halves(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return t[:, 0::2], t[:, 1::2]
    half = t.shape[1] // 2
    return t[:, :half], t[:, half:]


@torch.library.custom_op("turbomoe::gated_activation_backward", mutates_args=())
def gated_activation_backward(
    grad_out: torch.Tensor,
    gate_up: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> torch.Tensor:
    grad_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    gate, up = _halves(gate_up, interleaved)
    grad_gate, grad_up = _halves(grad_gate_up, interleaved)
    _native.call(
        "tm_swiglu_backward",
        _native.make_params(_native.SwigluParams, variant=variant, alpha=alpha, limit=limit),
        _native.describe(grad_out),
        _native.describe(gate),
        _native.describe(up),
        _native.describe(grad_gate),
        _native.describe(grad_up),
        _native.stream_for(gate_up),
    )
    return grad_gate_up


@gated_activation_backward.register_fake
def _(
    grad_out: torch.Tensor,
    gate_up: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
    interleaved: bool,
) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape)


@torch.library.custom_op("turbomoe::gated_activation_weighted_backward", mutates_args=())
def gated_activation_weighted_backward(
    grad_rows: torch.Tensor,
    gate_up: torch.Tensor,
    row_weights: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
    interleaved: bool,
    want_weighted_act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed experts' backward through the activation and the routing weight, one pass.

    For row r with weight w = row_weights[r] and U = grad_rows[r] (the down projection's
    grad-input before weighting), act = act(gate_up[r]) as the forward stored it:
    (d gate_up [M, 2I] of w·U, w·act [M, I] (a [0, I] tensor unless want_weighted_act),
    ⟨U, act⟩ [M] float32). The same values, with the same roundings, as the activation, an
    unweighted combine backward with one slot a row, a scaling and the activation's backward.
    """
    rows, inter = grad_rows.shape
    grad_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    weighted_act = gate_up.new_empty((rows if want_weighted_act else 0, inter))
    grad_row_weights = torch.empty(rows, dtype=torch.float32, device=gate_up.device)
    gate, up = _halves(gate_up, interleaved)
    grad_gate, grad_up = _halves(grad_gate_up, interleaved)
    _native.call(
        "tm_swiglu_weighted_backward",
        _native.make_params(_native.SwigluParams, variant=variant, alpha=alpha, limit=limit),
        _native.describe(grad_rows),
        _native.describe(gate),
        _native.describe(up),
        _native.describe(row_weights),
        _native.describe(grad_gate),
        _native.describe(grad_up),
        _native.describe(weighted_act if want_weighted_act else None),
        _native.describe(grad_row_weights),
        _native.stream_for(gate_up),
    )
    return grad_gate_up, weighted_act, grad_row_weights


@gated_activation_weighted_backward.register_fake
def _(
    grad_rows: torch.Tensor,
    gate_up: torch.Tensor,
    row_weights: torch.Tensor,
    variant: int,
    alpha: float,
    limit: float,
    interleaved: bool,
    want_weighted_act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, inter = grad_rows.shape
    return (
        gate_up.new_empty(gate_up.shape),
        gate_up.new_empty((rows if want_weighted_act else 0, inter)),
        gate_up.new_empty(rows, dtype=torch.float32),
    )


@torch.library.custom_op("turbomoe::gated_activation", mutates_args=())
def gated_activation(
    gate_up: torch.Tensor, variant: int, alpha: float, limit: float, interleaved: bool
) -> torch.Tensor:
    """act(gate) * up for gate_up [M, 2I] holding [gate; up] halves or interleaved columns."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 != 0:
        raise ValueError(f"gate_up must be [M, 2I], got shape {tuple(gate_up.shape)}")
    gate, up = _halves(gate_up, interleaved)
    # The forward is the plain op on views; only the backward needs its own layout.
    return swiglu_eager(gate, up, variant, alpha, limit)


@gated_activation.register_fake
def _(
    gate_up: torch.Tensor, variant: int, alpha: float, limit: float, interleaved: bool
) -> torch.Tensor:
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    gate_up, variant, alpha, limit, interleaved = inputs
    ctx.save_for_backward(gate_up)
    ctx.args = (variant, alpha, limit, interleaved)


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    (gate_up,) = ctx.saved_tensors
    grad = _backward_eager(grad_out.contiguous(), gate_up, *ctx.args)
    return grad, None, None, None, None


_gated_eager = differentiable(gated_activation, _setup_context, _backward)
_backward_eager = direct(gated_activation_backward)
_weighted_backward_eager = direct(gated_activation_weighted_backward)


def gated(
    gate_up: torch.Tensor,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    interleaved: bool = False,
) -> torch.Tensor:
    """The experts' activation of a fused gate/up projection: "silu" or GPT-OSS's "clamped"."""
    return _gated_eager(gate_up, *gated_args(activation, alpha, limit, interleaved))


def gated_args(
    activation: str, alpha: float, limit: float, interleaved: bool
) -> tuple[int, float, float, bool]:
    """The op's (variant, alpha, limit, interleaved) for an activation name."""
    return (SILU if activation == "silu" else CLAMPED, alpha, limit, interleaved)
