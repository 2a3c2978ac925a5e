"""The embedded default model: a tiny Qwen3-MoE, sized to train visibly in a minute on 2 CPU cores.

It uses a real MoE architecture (router, top-k experts, GQA attention, RMSNorm, RoPE) so the default
run goes through exactly the code paths turbomoe accelerates on real models.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

ARCHITECTURE = "qwen3_moe"

# Small enough for ~5 optimizer steps a second on 2 idle CPU cores at batch 16 (~10k tokens/s;
# an H200 does ~500 steps in 30 s), large enough that the loss keeps falling for the whole
# minute. Attention: 4 query heads share 2 KV heads (GQA) as in the real Qwen3 models; every
# layer is sparse (decoder_sparse_step 1).
SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "intermediate_size": 256,  # dense MLP width; unused while every layer is an MoE layer
    "norm_topk_prob": True,
    "max_position_embeddings": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}


def default_config(vocab_size: int, pad_token_id: int, eos_token_id: int) -> PretrainedConfig:
    """The default model's config for a tokenizer of vocab_size tokens."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        ARCHITECTURE,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        **SHAPE,
    )


def build_model(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised causal LM for config (seed torch first for a reproducible init)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)
