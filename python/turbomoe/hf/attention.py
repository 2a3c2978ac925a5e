"""Qwen3-style attention ``forward`` with the q/k norms and RoPE in one op (``qk_norm_rope``).

Qwen3-MoE normalises every head of q and k (RMSNorm over the head dim) and rotates them right
after: ``q_norm`` then ``apply_rotary_pos_emb``. The rmsnorm and rope hooks make each of those one
kernel, but q and k are still written and read back once in between, forward and backward (the
q projection's output is the largest activation of the attention block). This forward is the
stock one line for line, except that q and k go through ``turbomoe.ops.qk_norm_rope``, which
computes the same values (bitwise what turbomoe's norm and RoPE give one after the other).

It is installed only on classes whose stock ``forward`` contains every line it reproduces
(``STOCK_LINES``). Where a call is not the case the fused op was written for, q and k take
stock's separate calls (``self.q_norm``, then the module's ``apply_rotary_pos_emb``, i.e. the
rmsnorm and rope hooks where those are on): norms of another class or with hooks of their own
(which the fused op would skip), a norm weight in another dtype than q/k or cos/sin in another
dtype (stock promotes, as under autocast), cos/sin not covering the whole head.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from turbomoe import ops
from turbomoe.hf.norms import fused_norm_reason, global_hooks_registered, hooked
from turbomoe.hf.registry import KERNEL_DTYPES

AttentionForward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

# What the stock forward must contain, whitespace aside, for this replacement to be that forward.
STOCK_LINES = (
    "input_shape = hidden_states.shape[:-1]",
    "hidden_shape = (*input_shape, -1, self.head_dim)",
    "query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)",
    "key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)",
    "value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
    "cos, sin = position_embeddings",
    "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)",
    "if past_key_values is not None:",
    "key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)",
    "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(",
    "self.config._attn_implementation, eager_attention_forward",
    "dropout=0.0 if not self.training else self.attention_dropout,",
    "scaling=self.scaling,",
    "sliding_window=self.sliding_window,",
    "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
    "attn_output = self.o_proj(attn_output)",
    "return attn_output, attn_weights",
)


def matches_stock(source: str) -> bool:
    """True when ``source`` (a forward's text) holds every line of ``STOCK_LINES`` (whitespace
    and trailing comments aside; none of those lines has a ``#`` of its own)."""
    lines = {" ".join(line.split("#", 1)[0].split()) for line in source.splitlines()}
    return all(line in lines for line in STOCK_LINES)


def _unfused_reason(
    attention: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    norm_classes: tuple[type, ...],
) -> str | None:
    """Why q and k take the separate norm and RoPE calls (None: the fused op computes them)."""
    if query.dtype not in KERNEL_DTYPES or query.device.type not in ("cpu", "cuda"):
        return f"q/k in {query.dtype} on {query.device.type}"
    if key.dtype != query.dtype:
        return f"k in {key.dtype}, q in {query.dtype}"
    if global_hooks_registered():
        return "global module forward hooks are registered"
    cos, sin = position_embeddings
    if cos.dtype != query.dtype or sin.dtype != query.dtype:
        return f"RoPE cos/sin in {cos.dtype} over {query.dtype} q/k (stock promotes)"
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[-1] != query.shape[-1]:
        return "RoPE cos/sin that are not [B, S, head_dim]"
    for norm in (attention.q_norm, attention.k_norm):
        reason = fused_norm_reason(norm, query.dtype, query.shape[-1], norm_classes, "q/k norm")
        if reason is not None:
            return reason
    return None


def _plain_projections(projections: tuple[nn.Module, ...], hidden: torch.Tensor) -> bool:
    """Whether q/k/v are plain bias-free ``nn.Linear`` layers of the activations' dtype, without
    hooks, outside autocast: then ``ops.shared_input_linears`` computes them (the same forward,
    the input gradients summed inside the GEMMs). ``TURBOMOE_QKV_SHARED_GRAD=0`` keeps the three
    stock calls."""
    if os.environ.get("TURBOMOE_QKV_SHARED_GRAD", "1") == "0":
        return False
    if torch.is_autocast_enabled(hidden.device.type):
        return False
    for proj in projections:
        if type(proj) is not nn.Linear or proj.bias is not None or hooked(proj):
            return False
        if proj.weight.dtype != hidden.dtype:
            return False
    return True


def make_attention_forward(
    original: AttentionForward, module: ModuleType, norm_classes: tuple[type, ...]
) -> AttentionForward:
    """The fused forward for a class of ``module`` (its modeling file: the attention functions are
    looked up there at call time, as stock does); ``norm_classes`` are the family's RMSNorm
    classes, the only q/k norms it fuses."""

    @functools.wraps(original)
    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if _plain_projections(projections, hidden_states):
            query, key, value = ops.shared_input_linears(
                hidden_states, tuple(proj.weight for proj in projections)
            )
        else:
            query, key, value = (proj(hidden_states) for proj in projections)
        query = query.view(hidden_shape)
        key = key.view(hidden_shape)
        cos, sin = position_embeddings
        if _unfused_reason(self, query, key, position_embeddings, norm_classes) is None:
            q_norm, k_norm = self.q_norm, self.k_norm
            query_states = ops.qk_norm_rope(
                query, q_norm.weight, float(q_norm.variance_epsilon), cos, sin
            ).transpose(1, 2)
            key_states = ops.qk_norm_rope(
                key, k_norm.weight, float(k_norm.variance_epsilon), cos, sin
            ).transpose(1, 2)
        else:  # stock's calls (turbomoe's norm and RoPE where those hooks are on)
            query_states = self.q_norm(query).transpose(1, 2)
            key_states = self.k_norm(key).transpose(1, 2)
            query_states, key_states = module.apply_rotary_pos_emb(
                query_states, key_states, cos, sin
            )
        value_states = value.view(hidden_shape).transpose(1, 2)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(
                key_states, value_states, self.layer_idx
            )

        attention_interface = module.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, module.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    return forward
