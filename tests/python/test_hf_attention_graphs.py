"""turbomoe.hf.attention_graphs on CPU: preparing a model changes nothing it computes, capture
refuses with a clear error when there is nothing to capture, release restores the forwards.
The graphs themselves are checked on CUDA (tests/python/gpu/test_gpu_attention_graphs.py)."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, build_model, loss_and_grads, make_batch

import turbomoe  # noqa: F401
from turbomoe.hf.attention_graphs import (
    AttentionGraphs,
    attention_modules,
    capture_attention_graphs,
    prepare_attention_graphs,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_model_computes_exactly_what_it_did(family: str) -> None:
    model = build_model(family)
    batch = make_batch()
    want_loss, want_grads, _ = loss_and_grads(model, batch)
    assert prepare_attention_graphs(model) == model.config.num_hidden_layers
    assert prepare_attention_graphs(model) == model.config.num_hidden_layers  # idempotent
    got_loss, got_grads, _ = loss_and_grads(model, batch)
    assert torch.equal(got_loss, want_loss)
    assert got_grads.keys() == want_grads.keys()
    assert all(torch.equal(got_grads[n], want_grads[n]) for n in want_grads)


def test_modules_are_found_in_layer_order() -> None:
    model = build_model("qwen3_moe")
    found = attention_modules(model)
    assert found == [layer.self_attn for layer in model.model.layers]


def test_capture_without_a_cuda_training_call_is_refused() -> None:
    model = build_model("qwen3_moe")
    prepare_attention_graphs(model)
    loss_and_grads(model, make_batch())  # CPU: nothing recorded
    with pytest.raises(ValueError, match="ran no eager CUDA training forward"):
        capture_attention_graphs(model)


def test_capture_of_an_unprepared_model_is_refused() -> None:
    model = build_model("qwen3_moe")
    with pytest.raises(RuntimeError, match="not prepared for attention graphs"):
        capture_attention_graphs(model)


def test_a_model_without_attention_modules_is_refused() -> None:
    with pytest.raises(ValueError, match="no 'self_attn' modules"):
        capture_attention_graphs(torch.nn.Linear(2, 2))


def test_release_restores_the_class_forwards() -> None:
    model = build_model("qwen3_moe")
    prepare_attention_graphs(model)
    modules = attention_modules(model)
    assert all("forward" in m.__dict__ for m in modules)
    AttentionGraphs(modules).release()
    assert all("forward" not in m.__dict__ for m in modules)
    batch = make_batch()
    loss, _, _ = loss_and_grads(model, batch)
    assert torch.isfinite(loss)


def test_auto_capture_waits_for_a_cuda_training_call_and_releases() -> None:
    from turbomoe.hf.attention_graphs import enable_attention_graphs

    model = build_model("qwen3_moe")
    batch = make_batch()
    want_loss, want_grads, _ = loss_and_grads(model, batch)
    auto = enable_attention_graphs(model)
    for _ in range(2):  # CPU: nothing is recorded, so nothing is captured, and nothing changes
        got_loss, got_grads, _ = loss_and_grads(model, batch)
        assert torch.equal(got_loss, want_loss)
        assert all(torch.equal(got_grads[n], want_grads[n]) for n in want_grads)
    assert auto.graphs is None and auto.failure is None
    auto.release()
    assert all("forward" not in m.__dict__ for m in attention_modules(model))
    assert not model._forward_pre_hooks
