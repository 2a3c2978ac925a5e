"""The qk_norm_rope hook on Qwen3-MoE: stock parity with the fused kernel's head dims, which
calls take it, and the cases that keep stock's separate q/k norm and RoPE calls."""

from __future__ import annotations

import importlib

import pytest
import torch
from hf_models import (
    assert_grads_close,
    build_model,
    loss_and_grads,
    make_batch,
    rel_err,
    stock_and_turbomoe,
)

import turbomoe

qk_module = importlib.import_module("turbomoe.ops.qk_norm_rope")
LAYERS = 2  # the tiny model's


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()
    yield
    turbomoe.patch()


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the fused kernel's op (not of the composition it falls back to)."""
    calls: list[int] = []
    fused = qk_module._qk_norm_rope_eager

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(qk_module, "_qk_norm_rope_eager", counted)
    return calls


@pytest.mark.parametrize("head_dim", [64, 128])
def test_train_step_matches_stock_through_the_fused_kernel(head_dim, fused_calls):
    model = build_model("qwen3_moe", seed=4, head_dim=head_dim)
    batch = make_batch(seed=4)
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
    assert counts["qk_norm_rope"] == 2 * LAYERS and counts["apply_rope"] == 0
    assert counts["shared_input_linears"] == LAYERS  # q/k/v with the input gradients summed
    assert len(fused_calls) == 2 * LAYERS
    # The q/k norm weights get their gradient through the fused backward.
    assert any("q_norm" in name for name in grads1)


def test_a_hooked_norm_keeps_the_separate_calls(fused_calls):
    model = build_model("qwen3_moe", seed=5, head_dim=64)
    batch = make_batch(seed=5)
    seen: list[int] = []
    attention = model.model.layers[0].self_attn
    handle = attention.q_norm.register_forward_hook(lambda *_: seen.append(1))
    try:
        (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
            lambda: loss_and_grads(model, batch)
        )
    finally:
        handle.remove()
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
    assert seen == [1, 1]  # the hook fired in the stock run and in the patched one
    # Layer 0 took the norm and RoPE hooks; layer 1 the fused kernel.
    assert counts["apply_rope"] == 2 and len(fused_calls) == 2  # apply_rope: q and k


def test_the_hook_alone_matches_stock(fused_calls):
    model = build_model("qwen3_moe", seed=6, head_dim=64)
    batch = make_batch(seed=6)
    turbomoe.patch(hooks=["qk_norm_rope"])
    (loss0, grads0, _), (loss1, grads1, _), _ = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
    assert len(fused_calls) == 2 * LAYERS


def test_unpatch_restores_the_stock_forward():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    patched = qwen3.Qwen3MoeAttention.forward
    turbomoe.unpatch()
    stock = qwen3.Qwen3MoeAttention.forward
    assert stock is not patched and patched.__wrapped__ is stock
    turbomoe.patch()
    assert qwen3.Qwen3MoeAttention.forward is not stock


def test_a_changed_stock_forward_is_not_replaced():
    from turbomoe.hf.attention import STOCK_LINES, matches_stock

    source = "\n".join(STOCK_LINES)
    assert matches_stock(source)
    line = "sliding_window=self.sliding_window,"
    assert matches_stock(source.replace(line, f"    {line}  # diff with Llama"))
    assert not matches_stock(source.replace(line, ""))
    assert not matches_stock(source.replace("self.q_norm(", "self.q_layernorm("))


def test_bf16_weights_take_the_fused_kernel(fused_calls):
    model = build_model("qwen3_moe", seed=7, head_dim=64).to(torch.bfloat16)
    batch = make_batch(seed=7)
    (loss0, _, _), (loss1, _, _), _ = stock_and_turbomoe(lambda: loss_and_grads(model, batch))
    assert rel_err(loss1, loss0) <= 2e-2
    assert len(fused_calls) == 2 * LAYERS


def test_separate_projections_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """TURBOMOE_QKV_SHARED_GRAD=0 keeps the three stock projection calls (autograd adds their
    input gradients); the step stays the stock one within rounding."""
    monkeypatch.setenv("TURBOMOE_QKV_SHARED_GRAD", "0")
    model = build_model("qwen3_moe", seed=8, head_dim=64)
    batch = make_batch(seed=8)
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
    assert counts["shared_input_linears"] == 0 and counts["qk_norm_rope"] == 2 * LAYERS
