"""The routed-experts computation of an MoE layer, built from turbomoe's custom ops.

Hugging Face's eager experts loop over experts in Python (one gather, two GEMMs, an activation
and an ``index_add_`` per expert, plus a host sync to find the experts hit). Here the same
computation is a fixed sequence of whole-layer calls with no host sync: plan the permutation,
gather the token rows into expert order, one grouped GEMM for gate/up with the gated activation
(one library call that can fuse the two; biases or interleaved columns take the GEMM and the
activation op in turn), one grouped GEMM for down, and a weighted combine back to token
order. Every step is a custom op with its own backward, so autograd and torch.compile see
named ops, and the gradient reaches hidden, the routing weights, the expert weights and biases.
"""

from __future__ import annotations

import torch

from turbomoe.ops.gated import gated, gated_args
from turbomoe.ops.gated_gemm import grouped_gemm_gated
from turbomoe.ops.gathered_gemm import grouped_gemm_gathered
from turbomoe.ops.grouped_gemm import grouped_gemm
from turbomoe.ops.moe_lean import gather_in_gemm, lean_applies, lean_experts
from turbomoe.ops.permute import combine, gather_rows, gathered_rows, permute_plan

ACTIVATIONS = ("silu", "clamped")


def _row_bias(bias: torch.Tensor, expert_offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """bias[e] for every permuted row of expert e ([M, N]); rows of dropped pairs get zeros.

    searchsorted maps a row to its expert on the device, so no row counts reach the host; the
    zero row appended at index E serves rows past offsets[E].
    """
    positions = torch.arange(rows, dtype=expert_offsets.dtype, device=expert_offsets.device)
    expert_of_row = torch.searchsorted(expert_offsets[1:], positions, right=True)
    padded = torch.cat([bias, bias.new_zeros((1, bias.shape[1]))], dim=0)
    return padded.index_select(0, expert_of_row)


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    interleaved: bool = False,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    routed_pairs: int | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Σ_k w[t,k] · down_e(act(gate_up_e(hidden[t]))) over each token's experts e = ids[t,k].

    hidden [T,H]; top_k_index [T,K] (int32/int64; an id equal to E is dropped, HF's
    expert-parallel sentinel); top_k_weights [T,K]; gate_up_proj [E,2I,H] and down_proj [E,H,I]
    in nn.Linear layout (strided views allowed, e.g. GPT-OSS's transposed parameters).
    activation "silu" is silu(gate)·up, "clamped" GPT-OSS's clamped SwiGLU with alpha/limit;
    interleaved reads gate/up as alternating columns (gate0, up0, gate1, ...) instead of the two
    halves. Optional biases gate_up_bias [E,2I] and down_bias [E,H] are added per row's expert.
    ``routed_pairs``: the number of (token, slot) pairs whose id is not the sentinel, when the
    caller knows it; the layer's buffers then hold exactly those rows instead of T*K (the
    expert-parallel owner, whose received slots are mostly sentinels). ``recompute``: keep only
    hidden and the gate/up output for the backward, which re-gathers and recomputes the rest
    (ops/moe_lean.py: ~60% less activation memory for a little more backward work; without
    biases, in plain eager mode). Returns [T,H] in hidden's dtype; matches Hugging Face's eager
    experts.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}, expected one of {ACTIVATIONS}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"top_k_index must be [T, K] with T = {hidden.shape[0]}, got {tuple(top_k_index.shape)}"
        )
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights has shape {tuple(top_k_weights.shape)}, expected "
            f"{tuple(top_k_index.shape)} like top_k_index"
        )
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[1] % 2 != 0:
        raise ValueError(f"gate_up_proj must be [E, 2I, H], got shape {tuple(gate_up_proj.shape)}")
    num_experts, top_k = gate_up_proj.shape[0], top_k_index.shape[1]

    sorted_pairs, pair_to_row, offsets = permute_plan(top_k_index, num_experts)
    if (
        recompute
        and gate_up_bias is None
        and down_bias is None
        and lean_applies(hidden, top_k_weights, gate_up_proj, down_proj)
    ):
        out = lean_experts(
            hidden,
            top_k_weights,
            gate_up_proj,
            down_proj,
            (sorted_pairs, pair_to_row, offsets),
            top_k,
            gathered_rows(sorted_pairs, routed_pairs),
            gated_args(activation, alpha, limit, interleaved),
        )
        return out.to(hidden.dtype)
    rows = gathered_rows(sorted_pairs, routed_pairs)
    if gate_up_bias is None and gather_in_gemm():
        # The gather inside the GEMM's operand loads: no [rows, H] copy of the activations.
        pairs_of_tokens = pair_to_row[: hidden.shape[0] * top_k]
        gate_up = grouped_gemm_gathered(
            hidden, sorted_pairs, pairs_of_tokens, gate_up_proj, offsets, top_k, rows
        )
        act = gated(gate_up, activation, alpha, limit, interleaved)
        out = _down_and_combine(act, down_proj, down_bias, offsets, pair_to_row, top_k_weights)
        return out.to(hidden.dtype)
    x = gather_rows(
        hidden, sorted_pairs, offsets, top_k, pair_to_row=pair_to_row, rows=routed_pairs
    )
    if gate_up_bias is None and not interleaved:
        # One op (the activation can run in the gate/up GEMM's epilogue: ops/gated_gemm.py).
        variant, alpha_, limit_, _ = gated_args(activation, alpha, limit, interleaved)
        _, act = grouped_gemm_gated(x, gate_up_proj, offsets, variant, alpha_, limit_)
    else:
        gate_up = grouped_gemm(x, gate_up_proj, offsets)
        if gate_up_bias is not None:
            gate_up = gate_up + _row_bias(gate_up_bias.to(gate_up.dtype), offsets, rows)
        act = gated(gate_up, activation, alpha, limit, interleaved)
    out = _down_and_combine(act, down_proj, down_bias, offsets, pair_to_row, top_k_weights)
    return out.to(hidden.dtype)


def _down_and_combine(
    act: torch.Tensor,
    down_proj: torch.Tensor,
    down_bias: torch.Tensor | None,
    offsets: torch.Tensor,
    pair_to_row: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The down projection of the activated rows and the weighted combine back to tokens."""
    out_rows = grouped_gemm(act, down_proj, offsets)
    if down_bias is not None:
        out_rows = out_rows + _row_bias(down_bias.to(out_rows.dtype), offsets, act.shape[0])
    # The plan's offsets let the backward skip clearing the rows that the pairs fill anyway.
    return combine(
        out_rows, pair_to_row, top_k_weights, top_k_weights.shape[1], expert_offsets=offsets
    )
