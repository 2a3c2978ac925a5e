"""Model configs and construction for the benchmark and the parity tests.

Both benchmark runs must train the *same* model. Each run builds its own model (the first one is
freed before the second is built, so peak memory is per run), and the patched model may be built
from different module classes. So weights are not left to construction order: ``init_weights_``
draws every parameter from a generator seeded by (seed, parameter name), which gives identical
weights whatever the classes, the device order or the patch state, as long as the names match
(turbomoe keeps HF's parameter names so that checkpoints are unchanged).
"""

from __future__ import annotations

import copy
import zlib
from typing import Any

import torch

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")

_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}


def qwen3_30b_a3b_config(layers: int = 48) -> Any:
    """The Qwen3-30B-A3B shape (DESIGN §6), random weights, ``layers`` decoder layers."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=151_936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,  # as in the released checkpoint's config.json
        rms_norm_eps=1e-6,
        rope_parameters=dict(_ROPE),
        max_position_embeddings=40_960,
        tie_word_embeddings=False,
        use_cache=False,
    )


def tiny_config(family: str = "qwen3_moe", layers: int = 1, **overrides: Any) -> Any:
    """A small random config of ``family`` that runs in well under a second on CPU.

    Sizes are deliberately not powers of two where the family allows it, so kernels meet ragged
    shapes; ``overrides`` replace any field.
    """
    from transformers import AutoConfig

    common: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_parameters": dict(_ROPE),
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "use_cache": False,
    }
    per_family: dict[str, dict[str, Any]] = {
        "qwen3_moe": {
            "head_dim": 32,
            "moe_intermediate_size": 48,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
        "qwen2_moe": {
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 80,
            "num_experts": 8,
            "num_experts_per_tok": 2,
        },
        "mixtral": {"intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2},
        "olmoe": {"intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2},
        "deepseek_v3": {
            "moe_intermediate_size": 48,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1 if layers > 1 else 0,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 16,
            "v_head_dim": 24,
            "num_key_value_heads": 4,
        },
    }
    if family not in per_family:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fields = {**common, **per_family[family], **overrides}
    return AutoConfig.for_model(family, **fields)


def init_weights_(
    model: torch.nn.Module, seed: int, *, prefix: str = "", std: float | None = None
) -> None:
    """Overwrite every parameter with values that depend only on (seed, name, shape, dtype).

    Same scheme as HF's own init: normal(0, initializer_range) for matrices, ones for norm
    weights, zeros for biases. Buffers (RoPE frequencies, DeepSeek's correction bias) are left as
    HF computes them, which is deterministic. ``prefix`` names a submodule as the whole model
    would (``"model.layers.3."``), so one layer built alone gets the weights it has in the model;
    ``std`` defaults to the model config's ``initializer_range``.
    """
    if std is None:
        std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in model.named_parameters(prefix=prefix.rstrip(".")):
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                gen = torch.Generator(device=param.device)
                gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62))
                param.normal_(0.0, std, generator=gen)


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A cheap checksum of all parameters, to show both runs trained identical weights."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for index, (_, param) in enumerate(sorted(model.named_parameters())):
            # Weight each tensor by its position so that swapped tensors change the sum.
            # An fp32 norm avoids a float64 copy of multi-GiB expert tensors.
            norm = torch.linalg.vector_norm(param.detach(), dtype=torch.float32)
            total += (index + 1) * norm.double().square().cpu()
    return float(total)


def _keep_fp32_strict(model: torch.nn.Module) -> None:
    """Upcast what the model class pins to fp32 (DeepSeek-V3's ``e_score_correction_bias``):
    ``from_pretrained`` does this, ``from_config`` does not, and the models here should look
    like loaded ones."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    if not keep:
        return
    for module in model.modules():
        for name, tensor in list(module.named_buffers(recurse=False)):
            if name in keep and tensor.is_floating_point():
                setattr(module, name, tensor.float())
        for name, param in module.named_parameters(recurse=False):
            if name in keep and param.is_floating_point():
                param.data = param.data.float()


def build_model(
    config: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    experts_implementation: str | None,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A causal-LM from ``config`` on ``device`` with deterministic random weights.

    ``experts_implementation=None`` leaves the choice to whatever is registered as the default
    (the turbomoe backend when turbomoe is patched in). The config is copied because
    ``from_config`` writes the chosen backends into it.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs)
    _keep_fp32_strict(model)
    init_weights_(model, seed)
    model.train()
    return model


def experts_backend_of(model: torch.nn.Module) -> str:
    """The experts implementation the model resolved to, with the package that provides it:
    turbomoe serves the default name ``grouped_mm`` when patched, so the name alone is not
    enough (e.g. ``grouped_mm (transformers)`` vs ``grouped_mm (turbomoe)``)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    name = getattr(model.config, "_experts_implementation", None) or "unknown"
    if name == "eager":
        return "eager (transformers)"
    try:
        fn = ALL_EXPERTS_FUNCTIONS[name]
    except KeyError:
        return str(name)
    return f"{name} ({getattr(fn, '__module__', '?').split('.')[0]})"
