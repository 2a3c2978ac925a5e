"""Tiny configurations of the supported Hugging Face MoE families, shared by the test_hf_* tests.

Each model is built through stock transformers (``AutoModelForCausalLM.from_config``) from a
seed, in float32, with deliberately odd sizes: hidden 72, 5 routed experts top-2 (6 in groups of
3 for DeepSeek-V3's group-limited routing), 13 tokens. The router init is widened so that routing
is decisive rather than a near-uniform softmax whose top-k could flip on a rounding difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

T = TypeVar("T")

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")
VOCAB = 128
HIDDEN = 72

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.08,
    "num_experts_per_tok": 2,
}


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A 2-layer config of ``family``; overrides replace any field."""
    if family == "qwen3_moe":
        fields = {
            **_COMMON,
            "intermediate_size": 96,
            "moe_intermediate_size": 40,
            "num_experts": 5,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],  # layer 1 is a dense SwiGLU MLP
            "head_dim": 18,
        }
        cls: type[PretrainedConfig] = Qwen3MoeConfig
    elif family == "qwen2_moe":
        fields = {
            **_COMMON,
            "intermediate_size": 96,
            "moe_intermediate_size": 40,
            "shared_expert_intermediate_size": 48,
            "num_experts": 5,
            "norm_topk_prob": False,
        }
        cls = Qwen2MoeConfig
    elif family == "mixtral":
        fields = {**_COMMON, "intermediate_size": 40, "num_local_experts": 5}
        cls = MixtralConfig
    elif family == "olmoe":
        fields = {
            **_COMMON,
            "intermediate_size": 40,
            "num_experts": 5,
            "pad_token_id": None,
            "eos_token_id": None,  # the default (50279) is outside the tiny vocabulary
        }
        cls = OlmoeConfig
    elif family == "deepseek_v3":
        fields = {
            **_COMMON,
            "num_key_value_heads": 4,
            "intermediate_size": 96,
            "moe_intermediate_size": 40,
            "n_routed_experts": 6,
            "n_group": 2,
            "topk_group": 1,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE
            "routed_scaling_factor": 2.5,
            "q_lora_rank": 24,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 10,
            "v_head_dim": 12,
            "head_dim": 8,
            "rope_interleave": True,
        }
        cls = DeepseekV3Config
    else:
        raise ValueError(f"unknown family {family!r}")
    fields.update(overrides)
    return cls(**fields)


def build_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded float32 model of ``family`` built by stock transformers, in train mode."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                # HF initialises the correction bias to zeros; make it matter in the tests.
                bias.copy_(torch.randn(bias.shape, generator=_gen(seed + 7)) * 0.05)
    model.train()
    return model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(
    batch: int = 2, seq: int = 13, seed: int = 0, pad: int = 3, ignore: int = 2
) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask/labels: the last ``pad`` tokens of row 1 are padding (masked
    and labelled -100) and ``ignore`` more labels of row 0 are -100."""
    gen = _gen(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    labels = input_ids.clone()
    if pad and batch > 1:
        attention_mask[1, seq - pad :] = 0
        labels[1, seq - pad :] = -100
    if ignore:
        labels[0, 1 : 1 + ignore] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
    """One forward + backward; returns (loss, {name: grad}, outputs)."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return out.loss.detach().clone(), grads, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff if denom == 0.0 else diff / denom


def assert_grads_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-4
) -> None:
    assert got.keys() == want.keys(), set(got) ^ set(want)
    bad = {name: rel_err(got[name], want[name]) for name in want}
    bad = {name: err for name, err in bad.items() if not err <= tol}
    assert not bad, f"gradients differ beyond rel {tol}: {bad}"


@contextmanager
def count_op_calls() -> Iterator[dict[str, int]]:
    """Counts calls of turbomoe.ops' public functions made through the ops module."""
    from turbomoe import ops

    names = [
        "route",
        "moe_experts",
        "silu_mul",
        "rms_norm",
        "apply_rope",
        "qk_norm_rope",
        "linear_cross_entropy",
        "rms_norm_keep_input",
        "add_rms_norm",
        "shared_input_linears",
    ]
    counts = dict.fromkeys(names, 0)
    originals: dict[str, Callable[..., Any]] = {name: getattr(ops, name) for name in names}

    def wrap(name: str) -> Callable[..., Any]:
        fn = originals[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name in names:
        setattr(ops, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)


def stock_and_turbomoe(fn: Callable[[], T]) -> tuple[T, T, dict[str, int]]:
    """Runs ``fn`` on stock transformers (turbomoe unpatched), then patched; returns both
    results and the turbomoe op calls the patched run made. Leaves turbomoe patched."""
    import turbomoe

    turbomoe.unpatch()
    try:
        with count_op_calls() as stock_counts:
            stock = fn()
    finally:
        turbomoe.patch()
    assert not any(stock_counts.values()), f"stock run called turbomoe ops: {stock_counts}"
    with count_op_calls() as counts:
        patched = fn()
    return stock, patched, counts


def routers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The top-k router modules (the ``gate`` of each sparse block)."""
    return [
        module
        for module in model.modules()
        if hasattr(module, "top_k") and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]


@contextmanager
def capture_routing(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """Collects the top-k ids every router returns (index 2 of its output tuple)."""
    ids: list[torch.Tensor] = []
    handles = [
        router.register_forward_hook(lambda _m, _i, out: ids.append(out[2].detach().clone()))
        for router in routers(model)
    ]
    try:
        yield ids
    finally:
        for handle in handles:
            handle.remove()


def qwen3_30b_layer_and_batches(
    device: torch.device, count: int = 4, seq: int = 1024
) -> tuple[PreTrainedModel, list[dict[str, Any]]]:
    """One bf16 decoder layer of the Qwen3-30B-A3B shape (the bench's builder, seed 0) and
    ``count`` seeded batches of ``seq`` random tokens with labels, ``use_cache=False``."""
    from turbomoe.bench.models import build_model as build_bench_model
    from turbomoe.bench.models import qwen3_30b_a3b_config

    config = qwen3_30b_a3b_config(1)
    model = build_bench_model(
        config, device=device, dtype=torch.bfloat16, seed=0, experts_implementation=None
    )
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, config.vocab_size, (1, seq), generator=gen).to(device)
        batches.append({"input_ids": ids, "labels": ids, "use_cache": False})
    return model, batches
