"""The patch mechanics in-process: the family table, the experts registry, unpatch, the
version gate, one-time fallback warnings (fresh-interpreter checks: test_hf_fresh_process.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_models import FAMILIES, build_model, count_op_calls, make_batch, rel_err, tiny_config

import turbomoe
from turbomoe.hf import experts as experts_hook
from turbomoe.hf import fallback, patcher
from turbomoe.hf.registry import HOOKS

# Only Qwen3's attention has per-head q/k norms right before RoPE.
_NO_QK_NORM = tuple(hook for hook in HOOKS if hook != "qk_norm_rope")
EXPECTED_HOOKS = {
    "qwen3_moe": HOOKS,
    "qwen2_moe": _NO_QK_NORM,
    "mixtral": ("experts", "router", "rmsnorm", "rope", "loss", "residual_norm"),
    "olmoe": ("experts", "router", "rmsnorm", "rope", "loss", "residual_norm"),
    "deepseek_v3": _NO_QK_NORM,
}


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()
    fallback.reset_warnings()
    yield
    turbomoe.patch()


def _fallback_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, fallback.TurbomoeFallbackWarning)
    ]


def test_family_table_is_applied() -> None:
    assert turbomoe.patched_families() == EXPECTED_HOOKS
    assert set(EXPECTED_HOOKS) == set(FAMILIES)


def test_experts_registry_entries() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    fn = experts_hook.turbomoe_experts_forward
    assert ExpertsInterface._global_mapping["turbomoe"] is fn
    assert ALL_EXPERTS_FUNCTIONS["grouped_mm"] is fn  # the default name resolves to turbomoe
    # The stock function stays reachable in the global mapping for the fallback.
    assert ExpertsInterface._global_mapping["grouped_mm"] is not fn

    turbomoe.unpatch()
    assert "turbomoe" not in ExpertsInterface._global_mapping
    assert "grouped_mm" not in ALL_EXPERTS_FUNCTIONS._local_mapping
    assert turbomoe.patched_families() == {}


def test_explicit_experts_implementation_is_honoured() -> None:
    """ "turbomoe" is a valid name; an explicit "eager" or "batched_mm" keeps the user's choice."""
    batch = make_batch(seed=11)
    logits = {}
    calls = {}
    for impl in ("turbomoe", "eager", "batched_mm"):
        torch.manual_seed(0)
        config = tiny_config("qwen3_moe")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, experts_implementation=impl).eval()
        assert model.config._experts_implementation == impl
        with torch.no_grad(), count_op_calls() as counts:
            logits[impl] = model(input_ids=batch["input_ids"]).logits
        calls[impl] = counts["moe_experts"]
    assert calls == {"turbomoe": 1, "eager": 0, "batched_mm": 0}
    assert rel_err(logits["turbomoe"], logits["eager"]) <= 1e-5
    assert rel_err(logits["batched_mm"], logits["eager"]) <= 1e-5


def test_unpatch_in_process_is_stock_and_calls_no_op() -> None:
    model = build_model("qwen3_moe", seed=12)
    batch = make_batch(seed=12)
    turbomoe.unpatch()
    with count_op_calls() as counts:
        first = model(**batch).loss
    turbomoe.patch()
    turbomoe.unpatch()
    with count_op_calls() as again:
        second = model(**batch).loss
    assert not any(counts.values()) and not any(again.values())
    assert torch.equal(first, second)


def test_patch_subset_and_unknown_names() -> None:
    assert turbomoe.patch(families=["mixtral"], hooks=["experts", "router"]) == {
        "mixtral": ("experts", "router")
    }
    model = build_model("qwen3_moe", seed=13)
    with (
        count_op_calls() as counts,
        pytest.warns(fallback.TurbomoeFallbackWarning, match="not enabled"),
    ):
        model(**make_batch(seed=13))
    assert not any(counts.values()), "qwen3_moe must run stock when only mixtral is patched"
    with pytest.raises(ValueError, match="unknown"):
        turbomoe.patch(families=["llama"])
    with pytest.raises(ValueError, match="unknown"):
        turbomoe.patch(hooks=["attention"])


def test_version_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    for version in ("5.16.0", "6.0.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        fallback.reset_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert turbomoe.patch() == {}
        assert turbomoe.patched_families() == {}
        messages = _fallback_messages(caught)
        assert len(messages) == 1 and version in messages[0] and ">=5.17,<6" in messages[0]


def test_missing_library_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbomoe import _native

    def missing() -> None:
        raise ImportError("libturbomoe.so not found")

    monkeypatch.setattr(_native, "lib", missing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert turbomoe.patch() == {}
    assert any("libturbomoe cannot be loaded" in m for m in _fallback_messages(caught))


def test_hidden_act_not_silu_falls_back_with_one_warning_per_reason() -> None:
    model = build_model("qwen3_moe", seed=14, hidden_act="gelu")
    batch = make_batch(seed=14)
    turbomoe.unpatch()
    want = model(**batch).loss
    turbomoe.patch()
    with warnings.catch_warnings(record=True) as caught, count_op_calls() as counts:
        warnings.simplefilter("always")
        for _ in range(3):
            got = model(**batch).loss
    messages = _fallback_messages(caught)
    assert len(messages) == len(set(messages)) == 2, messages  # experts + dense MLP, once each
    assert all("hidden_act='gelu'" in m for m in messages)
    assert counts["moe_experts"] == 0 and counts["silu_mul"] == 0
    assert counts["route"] > 0 and counts["rms_norm"] > 0  # the rest still runs on turbomoe
    assert rel_err(got, want) <= 1e-5


def test_unsupported_family_runs_stock_with_one_warning() -> None:
    """A decorated MoE family outside the table reaches the registry entry and is handed back
    to the stock experts function, bit for bit, with a single warning naming it."""
    from transformers import AutoModelForCausalLM, Glm4MoeConfig

    config = Glm4MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    turbomoe.unpatch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    turbomoe.patch()
    with warnings.catch_warnings(record=True) as caught, count_op_calls() as counts:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model(input_ids=ids).logits
            model(input_ids=ids)
    messages = _fallback_messages(caught)
    assert len(messages) == 1 and "glm4_moe" in messages[0], messages
    assert not any(counts.values())
    assert torch.equal(got, want)


def test_qwen3_next_reason_is_named() -> None:
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    config = Qwen3NextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    messages = _fallback_messages(caught)
    assert len(messages) == 1 and "qwen3_next" in messages[0] and "(1 + weight)" in messages[0]


def test_custom_loss_function_is_respected() -> None:
    model = build_model("mixtral", seed=15)
    batch = make_batch(seed=15)
    seen = []

    def my_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **_: object):
        seen.append(logits.shape)
        return logits.float().mean()

    model.loss_function = my_loss
    with count_op_calls() as counts:
        out = model(**batch)
    assert seen and out.logits is not None and counts["linear_cross_entropy"] == 0
    assert counts["moe_experts"] > 0


def test_patch_is_idempotent() -> None:
    first = turbomoe.patch()
    changes = len(patcher._changes)
    assert turbomoe.patch() == first
    assert len(patcher._changes) == changes


def test_experts_structure_reasons() -> None:
    """The experts entry recognises its modules by the decorator's flags and the activation."""
    model = build_model("qwen3_moe", seed=18)
    experts = model.model.layers[0].mlp.experts
    assert experts_hook._static_reason(experts) is None
    for attr, value, text in (
        ("has_gate", False, "has_gate=False"),
        ("has_bias", True, "has_bias=True"),
        ("is_transposed", True, "is_transposed=True"),
    ):
        original = getattr(experts, attr)
        setattr(experts, attr, value)
        assert text in (experts_hook._static_reason(experts) or "")
        setattr(experts, attr, original)
    experts.act_fn = torch.nn.GELU()
    assert "hidden_act" in (experts_hook._static_reason(experts) or "")


def test_failed_patch_leaves_nothing_half_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    def broken(*args: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(patcher, "_apply_hook", broken)
    with pytest.raises(RuntimeError, match="boom"):
        turbomoe.patch()
    assert turbomoe.patched_families() == {} and not patcher._changes
    assert "grouped_mm" not in ALL_EXPERTS_FUNCTIONS._local_mapping


def test_float16_model_runs_stock_code() -> None:
    """libturbomoe's kernels take float32 and bfloat16 only: a float16 model runs stock code,
    bit for bit, with the reasons named once."""
    model = build_model("mixtral", seed=22).to(torch.float16)
    batch = make_batch(seed=22)
    turbomoe.unpatch()
    want = model(**batch).loss
    turbomoe.patch()
    with warnings.catch_warnings(record=True) as caught, count_op_calls() as counts:
        warnings.simplefilter("always")
        got = model(**batch).loss
    assert not any(counts.values()), counts
    assert torch.equal(got, want)
    messages = _fallback_messages(caught)
    assert messages and all("float16" in m for m in messages), messages


def test_skip_hooks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOMOE_SKIP_HOOKS", "qk_norm_rope, rope")
    applied = turbomoe.patch()
    assert applied["qwen3_moe"] == (
        "experts",
        "router",
        "rmsnorm",
        "dense_mlp",
        "loss",
        "residual_norm",
    )
    # The residual adds are folded into turbomoe's norms: without the rmsnorm hook, no fusion.
    monkeypatch.setenv("TURBOMOE_SKIP_HOOKS", "rmsnorm")
    with pytest.warns(UserWarning, match="residual_norm hook needs the rmsnorm hook"):
        applied = turbomoe.patch()
    assert "residual_norm" not in applied["qwen3_moe"]
    # An explicit hook list is what it says, whatever the environment.
    assert turbomoe.patch(hooks=["rope"])["qwen3_moe"] == ("rope",)
    monkeypatch.setenv("TURBOMOE_SKIP_HOOKS", "qk_norm")
    with pytest.raises(ValueError, match="unknown hooks"):
        turbomoe.patch()
