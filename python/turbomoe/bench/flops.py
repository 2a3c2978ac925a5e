"""Training FLOPs per token from a Hugging Face MoE config (DESIGN §6).

FLOPs per token = 6 × (matmul parameters one token passes through) + the causal attention term.
The 6 is 2 (multiply + add) × 3 (forward, input gradient, weight gradient). Only matmul weights
count: embedding lookups, norms and element-wise work are left out, as in the usual MFU convention
(and the 23.1 GFLOP/token figure for Qwen3-30B-A3B at 4096 tokens).

Supported config families: qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3 (and any config with
the same attribute names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerCounts:
    """Active matmul parameters per token, split by where they live."""

    attention: int
    mlp: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.lm_head


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute of ``names`` that the config has and is not None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _num_experts(config: Any) -> int:
    return int(_get(config, "num_experts", "num_local_experts", "n_routed_experts", default=0))


def _head_dims(config: Any) -> tuple[int, int, int]:
    """(query/key head dim, value head dim, query heads)."""
    heads = int(config.num_attention_heads)
    if getattr(config, "qk_nope_head_dim", None) is not None:  # DeepSeek MLA
        qk = int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim)
        return qk, int(config.v_head_dim), heads
    head_dim = int(_get(config, "head_dim", default=config.hidden_size // heads))
    return head_dim, head_dim, heads


def attention_matmul_params(config: Any) -> int:
    """Projection weights of one attention block (q, k, v, o; MLA's low-rank pairs)."""
    hidden = int(config.hidden_size)
    qk_dim, v_dim, heads = _head_dims(config)
    if getattr(config, "kv_lora_rank", None) is not None:  # DeepSeek MLA
        q_rank = getattr(config, "q_lora_rank", None)
        q = hidden * heads * qk_dim if q_rank is None else hidden * q_rank + q_rank * heads * qk_dim
        kv_rank = int(config.kv_lora_rank)
        kv = hidden * (kv_rank + int(config.qk_rope_head_dim))
        kv += kv_rank * heads * (int(config.qk_nope_head_dim) + v_dim)
        return q + kv + heads * v_dim * hidden
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    return hidden * heads * qk_dim + 2 * hidden * kv_heads * qk_dim + heads * v_dim * hidden


def _is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Mirror of each family's "does this layer get the MoE block" rule."""
    if _num_experts(config) == 0:
        return False
    first_dense = getattr(config, "first_k_dense_replace", None)
    if first_dense is not None:  # DeepSeek-V3
        return layer_idx >= int(first_dense)
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []):  # Qwen2/3-MoE
        return False
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return (layer_idx + 1) % step == 0


def mlp_matmul_params(config: Any, layer_idx: int) -> int:
    """Matmul weights one token passes through in the MLP of layer ``layer_idx``."""
    hidden = int(config.hidden_size)
    if not _is_sparse_layer(config, layer_idx):
        return 3 * hidden * int(config.intermediate_size)  # dense SwiGLU
    experts = _num_experts(config)
    top_k = int(config.num_experts_per_tok)
    expert_ffn = int(_get(config, "moe_intermediate_size", "intermediate_size"))
    params = hidden * experts  # router
    params += top_k * 3 * hidden * expert_ffn  # routed experts (gate, up, down)
    shared_ffn = getattr(config, "shared_expert_intermediate_size", None)  # Qwen2-MoE
    if shared_ffn:
        params += 3 * hidden * int(shared_ffn) + hidden  # shared expert + its sigmoid gate
    n_shared = getattr(config, "n_shared_experts", None)  # DeepSeek-V3
    if n_shared:
        params += 3 * hidden * expert_ffn * int(n_shared)
    return params


def active_matmul_params(config: Any) -> LayerCounts:
    """Active matmul parameters per token for the whole model (all layers + lm_head)."""
    layers = int(config.num_hidden_layers)
    attention = layers * attention_matmul_params(config)
    mlp = sum(mlp_matmul_params(config, i) for i in range(layers))
    lm_head = int(config.hidden_size) * int(config.vocab_size)
    return LayerCounts(attention=attention, mlp=mlp, lm_head=lm_head)


def mean_causal_context(config: Any, seq: int) -> float:
    """Average number of keys a query attends to: seq/2 for full causal attention (the usual
    convention), less under a sliding window."""
    window = getattr(config, "sliding_window", None)
    if window and int(window) < seq:
        w = int(window)
        return w - w * w / (2.0 * seq)
    return seq / 2.0


def attention_flops_per_token(config: Any, seq: int) -> float:
    """QKᵀ and PV per token, forward + backward: 3 × 2 × heads × context × (d_qk + d_v)."""
    qk_dim, v_dim, heads = _head_dims(config)
    per_layer = 6.0 * heads * mean_causal_context(config, seq) * (qk_dim + v_dim)
    return per_layer * int(config.num_hidden_layers)


def flops_per_token(config: Any, seq: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length ``seq``."""
    return 6.0 * active_matmul_params(config).total + attention_flops_per_token(config, seq)
