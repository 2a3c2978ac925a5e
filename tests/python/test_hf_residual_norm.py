"""The residual_norm hook (the decoder layer's residual adds folded into its RMSNorms): bitwise
the same training step as turbomoe without it on every family, which calls take it, and the
cases that keep the stock forward."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
from hf_models import (
    FAMILIES,
    assert_grads_close,
    build_model,
    count_op_calls,
    loss_and_grads,
    make_batch,
    rel_err,
    stock_and_turbomoe,
)

import turbomoe
from turbomoe.hf.decoder_layer import body_matches_stock, matches_stock
from turbomoe.hf.registry import HOOKS

LAYERS = 2  # the tiny models'
WITHOUT = [hook for hook in HOOKS if hook != "residual_norm"]


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()
    yield
    turbomoe.patch()


def _with_and_without(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs):
    turbomoe.patch(hooks=WITHOUT)
    without = loss_and_grads(model, batch, **kwargs)
    turbomoe.patch()
    with count_op_calls() as counts:
        fused = loss_and_grads(model, batch, **kwargs)
    return without, fused, counts


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_is_bitwise_the_unfused_one(family: str) -> None:
    model = build_model(family, seed=21)
    batch = make_batch(seed=21)
    (loss0, grads0, _), (loss1, grads1, _), counts = _with_and_without(model, batch)
    assert torch.equal(loss1, loss0)
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        assert torch.equal(grads1[name], grad), name
    assert counts["rms_norm_keep_input"] == LAYERS and counts["add_rms_norm"] == LAYERS
    # The norm weights get their gradients through the fused backward passes.
    assert any("input_layernorm" in name for name in grads1)
    assert any("post_attention_layernorm" in name for name in grads1)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_train_step_matches_stock(family: str) -> None:
    model = build_model(family, seed=22)
    batch = make_batch(seed=22)
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= 1e-5
    assert_grads_close(grads1, grads0, 1e-4)
    assert counts["add_rms_norm"] == LAYERS


def test_gradient_checkpointing() -> None:
    model = build_model("qwen3_moe", seed=23)
    model.gradient_checkpointing_enable()
    batch = make_batch(seed=23)
    (loss0, grads0, _), (loss1, grads1, _), counts = _with_and_without(model, batch)
    assert torch.equal(loss1, loss0)
    for name, grad in grads0.items():
        assert torch.equal(grads1[name], grad), name
    assert counts["add_rms_norm"] == 2 * LAYERS  # the forward and its recomputation


def test_a_hooked_norm_keeps_the_stock_forward() -> None:
    model = build_model("qwen3_moe", seed=24)
    batch = make_batch(seed=24)
    seen: list[int] = []
    layer = model.model.layers[0]
    handle = layer.post_attention_layernorm.register_forward_hook(lambda *_: seen.append(1))
    try:
        (loss0, grads0, _), (loss1, grads1, _), counts = _with_and_without(model, batch)
    finally:
        handle.remove()
    assert seen == [1, 1]  # the hook fired without the fusion and with it
    assert torch.equal(loss1, loss0)
    for name, grad in grads0.items():
        assert torch.equal(grads1[name], grad), name
    assert counts["add_rms_norm"] == LAYERS - 1  # layer 1 only


def test_positional_arguments_reach_the_attention() -> None:
    """Mixtral's layer takes position_embeddings second: a direct positional call gives what
    the stock forward gives."""
    model = build_model("mixtral", seed=25).eval()
    layer = model.model.layers[0]
    hidden = torch.randn(1, 6, model.config.hidden_size)
    positions = torch.arange(6).unsqueeze(0)
    cos_sin = model.model.rotary_emb(hidden, positions)
    fused = layer(hidden, cos_sin, None, positions)
    turbomoe.patch(hooks=WITHOUT)
    unfused = layer(hidden, cos_sin, None, positions)
    assert torch.equal(fused, unfused)


def test_autocast_keeps_stock_after_the_attention() -> None:
    model = build_model("qwen3_moe", seed=26)
    batch = make_batch(seed=26)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss0, _, _), (loss1, _, _), counts = _with_and_without(model, batch)
    assert torch.equal(loss1, loss0)
    # The attention's output comes out in bfloat16 over a float32 residual: stock's add + norm.
    assert counts["rms_norm_keep_input"] == LAYERS and counts["add_rms_norm"] == 0


def test_bf16_model_matches_stock() -> None:
    model = build_model("qwen3_moe", seed=27).to(torch.bfloat16)
    batch = make_batch(seed=27)
    (loss0, _, _), (loss1, _, _), counts = stock_and_turbomoe(lambda: loss_and_grads(model, batch))
    assert rel_err(loss1, loss0) <= 2e-2
    assert counts["add_rms_norm"] == LAYERS


def _stock_like(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
    """Docstrings and comments do not count."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    # Self Attention
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def test_only_the_stock_body_is_replaced() -> None:
    assert matches_stock(_stock_like)
    source = textwrap.dedent(inspect.getsource(_stock_like))
    names = ["attention_mask", "position_ids"]
    assert body_matches_stock(source, names)
    first_add = "hidden_states = residual + hidden_states\n    residual"
    scaled = source.replace(
        first_add, "hidden_states = residual + hidden_states * 0.5\n    residual"
    )
    assert scaled != source and not body_matches_stock(scaled, names)
    dropped = source.replace("        position_ids=position_ids,\n", "")
    assert dropped != source and not body_matches_stock(dropped, names)
    assert not body_matches_stock(source, ["attention_mask"])  # an argument not passed on
