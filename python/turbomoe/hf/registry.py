"""The one table of what turbomoe patches in Hugging Face Transformers, per model family.

Every patch the package applies is declared here: a family (a ``config.model_type``) maps to
the hooks that apply to it and to the few semantic facts that differ between families (how the
router turns logits into weights, which RoPE functions its attention calls, which causal-LM
output it returns). ``hf/patcher.py`` reads this table and nothing else to decide what to touch.

Hooks:
- ``experts``: the routed experts run through ``turbomoe.ops.moe_experts``; installed through
  transformers' experts registry (``ALL_EXPERTS_FUNCTIONS``), so it reaches every module
  decorated with ``@use_experts_implementation``.
- ``router``: the top-k router's ``forward`` computes weights/ids with ``turbomoe.ops.route``.
- ``rmsnorm``: ``*RMSNorm.forward`` runs ``turbomoe.ops.rms_norm``.
- ``dense_mlp``: dense SwiGLU MLPs (shared experts, dense layers) use ``turbomoe.ops.silu_mul``.
- ``rope``: the modeling module's ``apply_rotary_pos_emb*`` functions call
  ``turbomoe.ops.apply_rope``.
- ``loss``: ``XForCausalLM.forward`` computes the loss with fused linear cross-entropy when
  labels are given (``turbomoe.ops.linear_cross_entropy``).
- ``qk_norm_rope``: the attention's ``forward`` (Qwen3's, with per-head q/k norms) runs each
  of q and k through ``turbomoe.ops.qk_norm_rope``, norm and RoPE in one pass
  (``hf/attention.py``).
- ``residual_norm``: the decoder layer's ``forward`` folds the residual adds into its two
  RMSNorms (``turbomoe.ops.rms_norm_keep_input`` / ``add_rms_norm``, ``hf/decoder_layer.py``);
  only together with the rmsnorm hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Transformers releases this table was written against and checked on: the hooks read
# internals (the experts registry, router tuples, module-level RoPE functions) that may move
# in a major release.
MIN_TRANSFORMERS = "5.17"
MAX_TRANSFORMERS_EXCLUSIVE = "6"

# The dtypes libturbomoe's kernels take (float16 is not among them: such models run stock code).
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)

HOOKS: tuple[str, ...] = (
    "experts",
    "router",
    "rmsnorm",
    "dense_mlp",
    "rope",
    "loss",
    "qk_norm_rope",
    "residual_norm",
)

# The turbomoe op each hook calls; a hook whose op is missing from turbomoe.ops is skipped.
HOOK_OPS: dict[str, str] = {
    "experts": "moe_experts",
    "router": "route",
    "rmsnorm": "rms_norm",
    "dense_mlp": "silu_mul",
    "rope": "apply_rope",
    "loss": "linear_cross_entropy",
    "qk_norm_rope": "qk_norm_rope",
    "residual_norm": "add_rms_norm",
}


@dataclass(frozen=True)
class Routing:
    """How a family's router maps logits [T,E] to (weights, ids).

    kind: the ``turbomoe.ops.route`` kind.
    renormalize: True/False, or None to read the router's ``norm_topk_prob`` attribute.
    weights_in_logits_dtype: Qwen/OLMoE cast the top-k weights to the logits' dtype; Mixtral and
        DeepSeek-V3 keep them float32. Preserved exactly because the experts' output dtype
        promotion (and so the numerics) depends on it.
    fp32_logits: DeepSeek-V3 computes the router GEMM itself in float32.
    grouped: DeepSeek-V3's sigmoid + correction bias + group-limited top-k + scaling.
    """

    kind: str
    renormalize: bool | None
    weights_in_logits_dtype: bool
    fp32_logits: bool = False
    grouped: bool = False


@dataclass(frozen=True)
class Family:
    """One supported model family (``config.model_type``)."""

    model_type: str
    module: str  # the transformers modeling module whose classes/functions are patched
    hooks: frozenset[str]
    routing: Routing
    # "moe": MoeCausalLMOutputWithPast with router aux loss; "dense": CausalLMOutputWithPast.
    causal_lm_output: str
    # Module-level RoPE functions the attention looks up at call time: (name, interleaved).
    rope_functions: tuple[tuple[str, bool], ...] = (("apply_rotary_pos_emb", False),)


_ALL = frozenset(HOOKS)
# Only Qwen3's attention normalises q and k per head right before RoPE (OLMoE's norms cover the
# whole projection, the others have none).
_NO_QK_NORM = _ALL - {"qk_norm_rope"}
# Mixtral has no dense MLP class; OLMoE's OlmoeMLP is defined but never instantiated.
_NO_DENSE_MLP = _NO_QK_NORM - {"dense_mlp"}
_SOFTMAX_TOPK_CAST = Routing("softmax_topk", renormalize=None, weights_in_logits_dtype=True)

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            "qwen3_moe",
            "transformers.models.qwen3_moe.modeling_qwen3_moe",
            _ALL,
            _SOFTMAX_TOPK_CAST,
            "moe",
        ),
        Family(
            "qwen2_moe",
            "transformers.models.qwen2_moe.modeling_qwen2_moe",
            _NO_QK_NORM,
            _SOFTMAX_TOPK_CAST,
            "moe",
        ),
        Family(
            "mixtral",
            "transformers.models.mixtral.modeling_mixtral",
            _NO_DENSE_MLP,
            # Mixtral always renormalises and keeps float32 weights.
            Routing("softmax_topk", renormalize=True, weights_in_logits_dtype=False),
            "moe",
        ),
        Family(
            "olmoe",
            "transformers.models.olmoe.modeling_olmoe",
            _NO_DENSE_MLP,
            _SOFTMAX_TOPK_CAST,
            "moe",
        ),
        Family(
            "deepseek_v3",
            "transformers.models.deepseek_v3.modeling_deepseek_v3",
            _NO_QK_NORM,
            Routing(
                "sigmoid_group_topk",
                renormalize=None,
                weights_in_logits_dtype=False,
                fp32_logits=True,
                grouped=True,
            ),
            "dense",
            # config.rope_interleave picks the interleaved variant at call time.
            (("apply_rotary_pos_emb", False), ("apply_rotary_pos_emb_interleave", True)),
        ),
    )
}

# MoE families whose decorated experts reach turbomoe's experts function through the registry
# but that turbomoe does not run: the reason is named in the one-time fallback warning.
UNSUPPORTED_REASONS: dict[str, str] = {
    "qwen3_next": "its RMSNorm is (1 + weight)-style and its layers mix linear attention; "
    "not validated against turbomoe yet",
    "qwen3_5_moe_text": "shares Qwen3-Next's (1 + weight) RMSNorm; not validated against turbomoe",
    "gpt_oss": "clamped SwiGLU experts with biases and transposed interleaved weights are not "
    "wired into the one-line import yet",
    "granitemoe": "its router returns (ids, weights, logits) in a different order",
    "nemotron_h": "its experts have no gate projection (has_gate=False, relu^2)",
}


def unsupported_reason(model_type: str | None) -> str:
    """Why a model type is not run by turbomoe (for the fallback warning)."""
    if model_type in UNSUPPORTED_REASONS:
        return UNSUPPORTED_REASONS[model_type]
    return "the family is not in turbomoe's family table (turbomoe/hf/registry.py)"
