"""The routed experts with a lean autograd record: ``moe_experts(..., recompute=True)``.

The composed ``moe_experts`` keeps what each of its ops needs for its backward: the gathered
rows x [M,H], the gate/up output [M,2I], the activation [M,I] and the down output [M,H], with M
the routed rows (T·K on one GPU). At the Qwen3-30B-A3B shape that is 6,400 values a row, ~420 MB
a layer for 4096 tokens, and under expert parallelism it is most of the activation memory.

This version keeps the layer's input (which the caller usually holds anyway) and the gate/up
output only (3,584 values a row with H=2048, I=768, of which the input is shared), and its
backward

* re-gathers x from the input (a memory-bound pass);
* never needs the down output: with g the token gradient, Gu[r] = g[t(r)] gathered unweighted
  and U = Gu · W_down (the down projection's grad-input GEMM before any weighting), the routing
  weight's gradient is ⟨g[t(r)], down(act_r)⟩ = ⟨U_r, act_r⟩, the activation's gradient is
  w_r · U_r, and W_down's gradient is Guᵀ · (w ⊙ act). One pass over [M, I]
  (``tm_swiglu_weighted_backward``) recomputes act from gate/up and produces ⟨U_r, act_r⟩,
  w ⊙ act and gate/up's gradient: 6 elements of traffic a value against 14 for the activation,
  combine-backward, scaling and activation-backward passes it replaced
  (``TURBOMOE_FUSED_ACT_BACKWARD=0`` runs those four instead; the values are the same).

Same GEMMs as the composed backward; one extra gather. Only without expert biases, in plain
eager mode (not compiling, plain tensors); otherwise ``moe_experts`` composes its ops as usual.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# The ops' eager entry points (no dispatcher round trip; inside this Function's forward and
# backward no autograd graph is recorded).
from turbomoe.ops._eager import eager_ok
from turbomoe.ops.gated import _backward_eager as gated_activation_backward_eager
from turbomoe.ops.gated import _gated_eager as gated_activation_eager
from turbomoe.ops.gated import _weighted_backward_eager as weighted_activation_backward_eager
from turbomoe.ops.gated_gemm import _grouped_gemm_gated_eager as grouped_gemm_gated_eager
from turbomoe.ops.gathered_gemm import (
    _backward_input_gathered_eager,
    _backward_weight_gathered_eager,
    forward_gathered_into,
)
from turbomoe.ops.grouped_gemm import _backward_input_eager as grouped_gemm_backward_input_eager
from turbomoe.ops.grouped_gemm import _backward_weight_eager as grouped_gemm_backward_weight_eager
from turbomoe.ops.grouped_gemm import _grouped_gemm_eager as grouped_gemm_eager
from turbomoe.ops.permute import _combine_backward_eager as combine_backward_eager
from turbomoe.ops.permute import _combine_eager as combine_eager
from turbomoe.ops.permute import _gather_rows_eager as gather_rows_eager


def _gather(x: torch.Tensor, plan: tuple[torch.Tensor, ...], top_k: int, rows: int) -> torch.Tensor:
    sorted_pairs, pair_to_row, offsets = plan
    return gather_rows_eager(x, sorted_pairs, offsets, pair_to_row, top_k, rows)


class _LeanExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weights: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        sorted_pairs: torch.Tensor,
        pair_to_row: torch.Tensor,
        offsets: torch.Tensor,
        top_k: int,
        rows: int,
        activation: tuple[int, float, float, bool],
    ) -> torch.Tensor:
        plan = (sorted_pairs, pair_to_row, offsets)
        variant, alpha, limit, interleaved = activation
        if gather_in_gemm():
            # The gate/up GEMM reads the token rows itself: no permuted copy at all.
            gate_up = hidden.new_empty((rows, gate_up_proj.shape[1]))
            w = gate_up_proj if gate_up_proj.stride(-1) == 1 else gate_up_proj.contiguous()
            forward_gathered_into(hidden, sorted_pairs, top_k, w, offsets, gate_up)
            act = gated_activation_eager(gate_up, *activation)
        else:
            x = _gather(hidden, plan, top_k, rows)
            if interleaved:
                gate_up = grouped_gemm_eager(x, gate_up_proj, offsets)
                act = gated_activation_eager(gate_up, *activation)
            else:  # the activation in the gate/up GEMM's epilogue (on Hopper)
                gate_up, act = grouped_gemm_gated_eager(
                    x, gate_up_proj, offsets, variant, alpha, limit
                )
            del x
        out_rows = grouped_gemm_eager(act, down_proj, offsets)
        del act
        out = combine_eager(out_rows, pair_to_row, weights, top_k, None)
        ctx.save_for_backward(
            hidden, weights, gate_up_proj, down_proj, gate_up, sorted_pairs, pair_to_row, offsets
        )
        ctx.top_k, ctx.rows, ctx.activation = top_k, rows, activation
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        hidden, weights, w_gate_up, w_down, gate_up, sorted_pairs, pair_to_row, offsets = (
            ctx.saved_tensors
        )
        plan = (sorted_pairs, pair_to_row, offsets)
        top_k, rows = ctx.top_k, ctx.rows
        grad_out = grad_out.contiguous()
        # Each row's routing weight in row order (0 for rows past the routed ones).
        pairs = sorted_pairs[:rows].to(torch.int64)
        routed = pairs >= 0
        row_weights = weights.reshape(-1)[pairs.clamp(min=0)] * routed
        fused_gather = gather_in_gemm()
        # g[t(r)], unweighted: read by the two down-projection GEMMs from grad_out itself, or
        # gathered once into a [rows, H] copy.
        gathered = None if fused_gather else _gather(grad_out, plan, top_k, rows)
        if gathered is None:
            unweighted = _backward_input_gathered_eager(
                grad_out, sorted_pairs, w_down, offsets, top_k, rows
            )
        else:
            unweighted = grouped_gemm_backward_input_eager(gathered, w_down, offsets)  # U
        grad_gate_up, weighted_act, grad_row_weights = _activation_backward(
            unweighted, gate_up, row_weights, ctx.activation, ctx.needs_input_grad[3]
        )
        del unweighted
        grad_w_down = None
        if ctx.needs_input_grad[3] and gathered is None:
            grad_w_down = _backward_weight_gathered_eager(
                grad_out, weighted_act, sorted_pairs, offsets, top_k, w_down.dtype, True
            )
        elif ctx.needs_input_grad[3]:
            grad_w_down = grouped_gemm_backward_weight_eager(
                gathered, weighted_act, offsets, w_down.dtype
            )
        del weighted_act, gathered
        grad_w_gate_up = None
        if ctx.needs_input_grad[2] and fused_gather:
            # x's rows read from hidden in the GEMM's B load instead of re-gathered.
            grad_w_gate_up = _backward_weight_gathered_eager(
                grad_gate_up, hidden, sorted_pairs, offsets, top_k, w_gate_up.dtype, False
            )
        elif ctx.needs_input_grad[2]:
            x = _gather(hidden, plan, top_k, rows)
            grad_w_gate_up = grouped_gemm_backward_weight_eager(
                grad_gate_up, x, offsets, w_gate_up.dtype
            )
            del x
        grad_x = grouped_gemm_backward_input_eager(grad_gate_up, w_gate_up, offsets)
        grad_hidden = combine_eager(grad_x, pair_to_row, None, top_k, None)
        # Back to (token, slot) order; dropped pairs (pair_to_row -1) get no gradient.
        # A zero past the last row serves the dropped pairs (and an owner without any rows).
        padded = torch.cat([grad_row_weights.reshape(-1), grad_row_weights.new_zeros(1)])
        slots = pair_to_row.to(torch.int64)
        per_slot = padded[torch.where(slots >= 0, slots, rows)]
        grad_weights = per_slot.reshape(weights.shape).to(weights.dtype)
        return (
            grad_hidden,
            grad_weights,
            grad_w_gate_up,
            grad_w_down,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def gather_in_gemm() -> bool:
    """TURBOMOE_GATHER_IN_GEMM=1 (ops/moe.py): the gate/up GEMM's forward and grad-weight read
    the token rows themselves, so neither the forward nor the backward gathers x; in the lean
    record the down projection's grad-input and grad-weight also read the token gradient
    themselves, so its backward gathers nothing."""
    return os.environ.get("TURBOMOE_GATHER_IN_GEMM", "0") == "1"


def lean_experts_requested() -> bool:
    """TURBOMOE_LEAN_EXPERTS=1: the patched one-GPU experts keep the lean record (the expert-
    parallel owner has its own switch, TURBOMOE_EP_RECOMPUTE). Off until an end-to-end A/B on
    the device shows it at least as fast as the composed ops (docs/perf-notes.md)."""
    text = os.environ.get("TURBOMOE_LEAN_EXPERTS", "0")
    if text not in ("0", "1"):
        raise ValueError(f"TURBOMOE_LEAN_EXPERTS={text!r} must be 0 or 1")
    return text == "1"


def fused_activation_backward() -> bool:
    """Whether the backward takes the one-pass activation backward
    (``TURBOMOE_FUSED_ACT_BACKWARD=0``: the four passes it replaced, same values)."""
    return os.environ.get("TURBOMOE_FUSED_ACT_BACKWARD", "1") != "0"


def _activation_backward(
    unweighted: torch.Tensor,
    gate_up: torch.Tensor,
    row_weights: torch.Tensor,
    activation: tuple[int, float, float, bool],
    want_weighted_act: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(gate/up's gradient, w ⊙ act or None, ⟨U_r, act_r⟩) from U = unweighted."""
    if fused_activation_backward():
        # One pass over the rows: act recomputed from gate/up, ⟨U_r, act_r⟩, w_r·act_r (W_down's
        # gradient operand) and gate/up's gradient from w_r·U_r.
        return weighted_activation_backward_eager(
            unweighted, gate_up, row_weights, *activation, want_weighted_act
        )
    act = gated_activation_eager(gate_up, *activation)
    identity = torch.arange(act.shape[0], dtype=torch.int32, device=act.device)
    # K = 1 over the rows: grad_act[r] = w_r·U_r and ⟨U_r, act_r⟩ in one pass.
    grad_act, grad_row_weights = combine_backward_eager(
        unweighted, act, identity, row_weights.unsqueeze(1), None
    )
    weighted_act = act * row_weights.unsqueeze(1).to(act.dtype) if want_weighted_act else None
    del act
    grad_gate_up = gated_activation_backward_eager(grad_act, gate_up, *activation)
    return grad_gate_up, weighted_act, grad_row_weights.reshape(-1)


def lean_applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the lean record can stand in for the composed ops (plain eager tensors)."""
    return eager_ok(tuple(t for t in tensors if t is not None))


def lean_experts(
    hidden: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_k: int,
    rows: int,
    activation: tuple[int, float, float, bool],
) -> torch.Tensor:
    """Σ_k w·down(act(gate_up(x))) per token, saving only hidden and the gate/up output."""
    sorted_pairs, pair_to_row, offsets = plan
    return _LeanExperts.apply(
        hidden.contiguous(),
        top_k_weights.contiguous(),
        gate_up_proj,
        down_proj,
        sorted_pairs,
        pair_to_row,
        offsets,
        top_k,
        rows,
        activation,
    )
