"""GraphedStep on CUDA: a captured and replayed training step gives the eager step's loss and
gradients, step after step with AdamW in between, on the tiny qwen3_moe model (fp32) and on one
decoder layer of the Qwen3-30B-A3B shape (bf16: the Hopper grouped GEMM, cuDNN attention and the
fused loss inside the graph). Also: a second batch shape runs eagerly, moved parameters are
recaptured, and a step that synchronises with the host fails capture with a clear error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hf_models import build_model, make_batch, qwen3_30b_layer_and_batches, rel_err

import turbomoe  # noqa: F401  (patches the models onto turbomoe's ops)
from turbomoe.train.graph_step import GraphedStep, GraphStepError

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
Batch = dict[str, torch.Tensor]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _eager_step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def _compare_runs(
    model: torch.nn.Module,
    batches: list[Batch],
    loss_rtol: float,
    grad_rtol: float,
    step: GraphedStep | None = None,
) -> GraphedStep:
    """For each batch: the eager step's loss and gradients, then the GraphedStep call's from the
    same weights, compared; then an AdamW step with the latter, so that every replay runs on
    weights the optimizer updated in place since the capture."""
    step = step or GraphedStep(model, warmup_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, batch in enumerate(batches):
        want = _eager_step(model, batch)
        want_grads = _grads(model)
        model.zero_grad(set_to_none=True)
        got = step(**batch)
        assert rel_err(got, want) <= loss_rtol, (i, got.item(), want.item())
        got_grads = _grads(model)
        assert got_grads.keys() == want_grads.keys()
        bad = {n: rel_err(got_grads[n], want_grads[n]) for n in want_grads}
        bad = {n: e for n, e in bad.items() if not e <= grad_rtol}
        assert not bad, f"step {i}: gradients differ beyond rel {grad_rtol}: {bad}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _tiny_batches(count: int, seq: int = 16) -> list[Batch]:
    batches = []
    for i in range(count):
        batch = make_batch(batch=2, seq=seq, seed=100 + i, pad=0, ignore=2)
        del batch["attention_mask"]  # packed rows: the shape a captured step is meant for
        batches.append({k: v.to(CUDA) for k, v in batch.items()})
    return batches


def test_tiny_model_fp32_replays_match_eager_steps() -> None:
    model = build_model("qwen3_moe").to(CUDA)
    step = _compare_runs(model, _tiny_batches(6), loss_rtol=1e-5, grad_rtol=1e-4)
    assert step.stats.eager_steps == 2 and step.stats.captures == 1 and step.stats.replays == 4
    assert step.graphs == 1


def test_one_qwen3_30b_layer_bf16_replays_match_eager_steps() -> None:
    model, batches = qwen3_30b_layer_and_batches(CUDA)
    step = _compare_runs(model, batches, loss_rtol=1e-3, grad_rtol=2e-2)
    assert step.stats.replays == 2 and step.stats.captures == 1


def test_one_qwen3_30b_layer_with_zeros_aside_replays_match_eager_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TURBOMOE_DW_ZEROS_ASIDE=1: the empty experts' zeros on a side stream are captured as a
    fork and a join of the step's graph, and the replays match the eager steps."""
    monkeypatch.setenv("TURBOMOE_DW_ZEROS_ASIDE", "1")
    model, batches = qwen3_30b_layer_and_batches(CUDA)
    step = _compare_runs(model, batches, loss_rtol=1e-3, grad_rtol=2e-2)
    assert step.stats.replays == 2 and step.stats.captures == 1


def test_a_second_batch_shape_runs_eagerly_and_stays_correct() -> None:
    model = build_model("qwen3_moe").to(CUDA)
    batches = _tiny_batches(4)
    batches.insert(3, _tiny_batches(1, seq=24)[0])
    with pytest.warns(UserWarning, match="runs eagerly"):
        step = _compare_runs(model, batches, loss_rtol=1e-5, grad_rtol=1e-4)
    assert step.graphs == 1 and step.stats.replays == 2 and step.stats.eager_steps == 3


def test_parameters_moved_to_new_storage_are_recaptured() -> None:
    model = build_model("qwen3_moe").to(CUDA)
    step = GraphedStep(model, warmup_steps=1)
    _compare_runs(model, _tiny_batches(3), 1e-5, 1e-4, step=step)
    assert step.stats.captures == 1
    with torch.no_grad():  # the old storage is freed: a stale graph would read garbage
        model.lm_head.weight.data = model.lm_head.weight.data.clone() * 0.5
    _compare_runs(model, _tiny_batches(3), 1e-5, 1e-4, step=step)
    assert step.stats.captures == 2


def test_a_host_synchronising_step_fails_capture_with_a_clear_error() -> None:
    model = build_model("qwen3_moe").to(CUDA)

    def syncing_loss(m: torch.nn.Module, **b: torch.Tensor) -> torch.Tensor:
        loss = m(**b).loss
        if loss.item() > 1e9:  # a host read: not capturable
            raise AssertionError("unreachable")
        return loss

    fn: Callable[..., torch.Tensor] = syncing_loss
    step = GraphedStep(model, fn, warmup_steps=1)
    batch = _tiny_batches(1)[0]
    step(**batch)
    model.zero_grad(set_to_none=True)
    with pytest.raises(GraphStepError, match="capturing the step in a CUDA graph failed"):
        step(**batch)
    assert all(p.grad is None for p in model.parameters())
    torch.cuda.synchronize()  # the device is still usable, random ops included
    assert torch.isfinite(_eager_step(model, batch))
    assert torch.randn(8, device=CUDA).isfinite().all()
    torch.nn.init.normal_(torch.empty(4, 4, device=CUDA))
