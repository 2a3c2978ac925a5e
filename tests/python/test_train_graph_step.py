"""GraphedStep's contract on CPU, where every call runs eagerly: the same loss and gradients as a
plain forward + backward, and clear errors for what a captured step cannot honour. The capture
itself is tested on CUDA in gpu/test_gpu_graph_step.py."""

from __future__ import annotations

import pytest
import torch
from hf_models import assert_grads_close, build_model, loss_and_grads, make_batch

import turbomoe  # noqa: F401  (patches the tiny model onto turbomoe's ops)
from turbomoe.parallel.grads import STATE_ATTR, ParallelState
from turbomoe.train.graph_step import GraphedStep, GraphStepError


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_calls_run_eagerly_with_the_plain_step_result() -> None:
    model = build_model("qwen3_moe")
    batch = make_batch(pad=0, ignore=0)
    want_loss, want_grads, _ = loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)

    step = GraphedStep(model, warmup_steps=1)
    for _ in range(3):  # past the warm-up: on CPU there is never a capture
        loss = step(**batch)
        assert not loss.requires_grad
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
        assert_grads_close(_grads(model), want_grads, tol=0.0)
        model.zero_grad(set_to_none=True)
    assert step.stats.eager_steps == 3 and step.stats.captures == 0 and step.graphs == 0


def test_gradients_left_from_an_earlier_step_are_refused() -> None:
    model = build_model("qwen3_moe")
    batch = make_batch(pad=0, ignore=0)
    step = GraphedStep(model)
    step(**batch)
    before = _grads(model)
    with pytest.raises(GraphStepError, match="set_to_none=True"):
        step(**batch)  # accumulation: refused, and the gradients already there are untouched
    assert_grads_close(_grads(model), before, tol=0.0)


def test_a_batch_without_labels_is_a_clear_error() -> None:
    model = build_model("qwen3_moe")
    batch = make_batch(pad=0, ignore=0)
    del batch["labels"]
    with pytest.raises(GraphStepError, match="labels="):
        GraphedStep(model)(**batch)


def test_a_custom_loss_function_is_used_and_checked() -> None:
    model = build_model("qwen3_moe")
    batch = make_batch(pad=0, ignore=0)

    def twice(m: torch.nn.Module, **b: torch.Tensor) -> torch.Tensor:
        return 2.0 * m(**b).loss

    want_loss, _, _ = loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(GraphedStep(model, twice)(**batch), 2.0 * want_loss)

    model.zero_grad(set_to_none=True)
    with pytest.raises(GraphStepError, match="one-element tensor"):
        GraphedStep(model, lambda m, **b: m(**b).loss * torch.ones(2))(**batch)
    model.zero_grad(set_to_none=True)
    with pytest.raises(GraphStepError, match="tuple of tensors"):
        GraphedStep(model, lambda m, **b: (m(**b).loss, 1.0))(**batch)
    model.zero_grad(set_to_none=True)
    with pytest.raises(GraphStepError, match="does not require grad"):
        GraphedStep(model, lambda m, **b: m(**b).loss.detach())(**batch)


def test_a_tuple_loss_function_reports_detached_extras() -> None:
    model = build_model("qwen3_moe")
    batch = make_batch(pad=0, ignore=0)
    want_loss, want_grads, _ = loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)

    def with_extras(m: torch.nn.Module, **b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = m(**b)
        return out.loss, out.loss * 3.0, torch.stack([out.loss, -out.loss])

    loss, tripled, pair = GraphedStep(model, with_extras)(**batch)
    assert not (loss.requires_grad or tripled.requires_grad or pair.requires_grad)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(tripled, 3.0 * want_loss)
    torch.testing.assert_close(pair, torch.stack([want_loss, -want_loss]))
    assert_grads_close(_grads(model), want_grads, tol=0.0)  # only the first element is trained


def test_no_grad_and_unhashable_arguments_are_refused() -> None:
    model = build_model("qwen3_moe")
    batch = make_batch(pad=0, ignore=0)
    step = GraphedStep(model)
    with torch.no_grad(), pytest.raises(GraphStepError, match="no_grad"):
        step(**batch)
    with pytest.raises(GraphStepError, match="hashable"):
        step(**batch, output_hidden_states=[True])


def test_settings_are_checked() -> None:
    model = build_model("qwen3_moe")
    with pytest.raises(ValueError, match="warmup_steps"):
        GraphedStep(model, warmup_steps=0)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedStep(model, max_graphs=-1)


def _parallel_state(model: torch.nn.Module, ep_size: int, fsdp: bool) -> None:
    setattr(model, STATE_ATTR, ParallelState(mesh=None, ep_size=ep_size, fsdp=fsdp))  # type: ignore[arg-type]


def test_expert_parallel_models_are_captured_only_when_nothing_reads_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_model("qwen3_moe")
    _parallel_state(model, ep_size=2, fsdp=False)  # padded buffers, replicated dense weights
    assert GraphedStep(model).parallel
    _parallel_state(model, ep_size=4, fsdp=False)
    with pytest.raises(GraphStepError, match="TURBOMOE_EP_PADDED_MAX_EP=2"):
        GraphedStep(model)
    _parallel_state(model, ep_size=2, fsdp=True)
    with pytest.raises(GraphStepError, match="under FSDP"):
        GraphedStep(model)
    _parallel_state(model, ep_size=2, fsdp=False)
    monkeypatch.setenv("TURBOMOE_EP_CHUNKS", "2")
    with pytest.raises(GraphStepError, match="TURBOMOE_EP_CHUNKS"):
        GraphedStep(model)


def test_a_frozen_model_is_refused() -> None:
    model = build_model("qwen3_moe").requires_grad_(False)
    with pytest.raises(GraphStepError, match="requires grad"):
        GraphedStep(model)(**make_batch(pad=0, ignore=0))
