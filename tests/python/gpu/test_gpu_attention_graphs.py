"""Attention graphs on CUDA (turbomoe.hf.attention_graphs): a model whose attention replays
per-layer CUDA graphs gives the loss and gradients of an identical eager model, step after step
with AdamW in between, in fp32 on the tiny qwen3_moe model and in bf16 on one decoder layer of
the Qwen3-30B-A3B shape; calls outside the captured case (another length, a padding mask) run
eagerly and stay correct; release restores the eager forwards."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hf_models import build_model, make_batch, qwen3_30b_layer_and_batches, rel_err

import turbomoe  # noqa: F401  (patches the models onto turbomoe's ops)
from turbomoe.hf.attention_graphs import (
    attention_modules,
    capture_attention_graphs,
    prepare_attention_graphs,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
Batch = dict[str, Any]


def _step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _tiny_batch(seed: int, seq: int = 16, padded: bool = False) -> Batch:
    batch = make_batch(batch=2, seq=seq, seed=seed, pad=3 if padded else 0, ignore=2)
    if not padded:
        del batch["attention_mask"]
    # Without use_cache=False transformers builds a KV cache even in training, and a call with a
    # cache runs eagerly (tested below).
    return {**{k: v.to(CUDA) for k, v in batch.items()}, "use_cache": False}


def _twins_agree(
    graphed: torch.nn.Module,
    eager: torch.nn.Module,
    batches: list[Batch],
    loss_rtol: float,
    grad_rtol: float,
) -> None:
    """Each batch through both models, losses and gradients compared, then the same AdamW step
    on each, so that later replays run on weights the optimizer changed in place."""
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    for i, batch in enumerate(batches):
        got, got_grads = _step(graphed, batch)
        want, want_grads = _step(eager, batch)
        assert rel_err(got, want) <= loss_rtol, (i, got.item(), want.item())
        assert got_grads.keys() == want_grads.keys()
        bad = {n: rel_err(got_grads[n], want_grads[n]) for n in want_grads}
        bad = {n: e for n, e in bad.items() if not e <= grad_rtol}
        assert not bad, f"step {i}: gradients differ beyond rel {grad_rtol}: {bad}"
        # Both twins take the graphed twin's update, so each step compares one replay with one
        # eager call on equal weights: with each twin's own gradients, AdamW would turn the
        # run-to-run noise of bf16 attention backwards in near-zero gradients into full-size
        # steps (lr-sized, whatever the gradient's size) and the twins would drift apart.
        for p, q in zip(graphed.parameters(), eager.parameters(), strict=True):
            if p.grad is not None:
                q.grad.copy_(p.grad)
        for opt in (opt_g, opt_e):
            opt.step()
            opt.zero_grad(set_to_none=True)
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters(), strict=True):
            assert torch.equal(p, q), f"step {i}: {name} differs after the same update"


def _prepared_pair(model: torch.nn.Module, batch: Batch) -> tuple[torch.nn.Module, object]:
    eager = copy.deepcopy(model)
    prepare_attention_graphs(model)
    _step(model, batch)  # the eager call that records the signature
    model.zero_grad(set_to_none=True)
    return eager, capture_attention_graphs(model)


def test_tiny_model_fp32_graphs_match_the_eager_twin() -> None:
    model = build_model("qwen3_moe").to(CUDA)
    eager, graphs = _prepared_pair(model, _tiny_batch(0))
    _twins_agree(model, eager, [_tiny_batch(i) for i in range(1, 5)], 1e-5, 1e-4)
    assert graphs.replays == 4 * len(attention_modules(model))


def test_other_calls_run_eagerly_and_stay_correct() -> None:
    model = build_model("qwen3_moe").to(CUDA)
    eager, graphs = _prepared_pair(model, _tiny_batch(0))
    layers = len(attention_modules(model))
    batches = [_tiny_batch(1), _tiny_batch(2, seq=24), _tiny_batch(3, padded=True), _tiny_batch(4)]
    _twins_agree(model, eager, batches, 1e-5, 1e-4)
    assert graphs.replays == 2 * layers  # only the two batches of the captured shape
    with torch.no_grad():  # no gradient: eager
        assert torch.isfinite(model(**_tiny_batch(5)).loss)
    _twins_agree(model, eager, [{**_tiny_batch(6), "use_cache": True}], 1e-5, 1e-4)  # a cache
    assert graphs.replays == 2 * layers
    graphs.release()
    assert all("forward" not in m.__dict__ for m in attention_modules(model))
    _twins_agree(model, eager, [_tiny_batch(7)], 1e-5, 1e-4)


def test_one_qwen3_30b_layer_bf16_graphs_match_the_eager_twin() -> None:
    model, batches = qwen3_30b_layer_and_batches(CUDA)
    eager, graphs = _prepared_pair(model, batches[0])
    _twins_agree(model, eager, batches[1:], 1e-3, 2e-2)
    assert graphs.replays == 3


def test_a_second_forward_before_the_backward_runs_eagerly() -> None:
    """Two forwards, then one backward of the summed losses: replaying the second would
    overwrite what the first's backward graph reads, so it runs eagerly."""
    model = build_model("qwen3_moe").to(CUDA)
    eager, graphs = _prepared_pair(model, _tiny_batch(0))
    layers = len(attention_modules(model))
    b1, b2 = _tiny_batch(1), _tiny_batch(2)
    got = model(**b1).loss + model(**b2).loss
    got.backward()
    want = eager(**b1).loss + eager(**b2).loss
    want.backward()
    assert rel_err(got.detach(), want.detach()) <= 1e-5
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) <= 1e-4, name
    assert graphs.replays == layers  # the first forward only
    model.zero_grad(set_to_none=True)
    eager.zero_grad(set_to_none=True)
    _twins_agree(model, eager, [_tiny_batch(3)], 1e-5, 1e-4)  # replays again afterwards
    assert graphs.replays == 2 * layers


def test_parameters_moved_after_the_capture_drop_the_graphs() -> None:
    model = build_model("qwen3_moe").to(CUDA)
    eager, graphs = _prepared_pair(model, _tiny_batch(0))
    for m in (model, eager):
        weight = m.model.layers[0].self_attn.q_proj.weight
        weight.data = weight.data.clone() * 0.5  # new storage: a stale graph would read the old
    with pytest.warns(UserWarning, match="parameters changed storage"):
        _twins_agree(model, eager, [_tiny_batch(1)], 1e-5, 1e-4)
    assert graphs.replays == len(attention_modules(model)) - 1  # layer 0 ran eagerly


def test_auto_capture_from_the_second_step_matches_the_eager_twin() -> None:
    from turbomoe.hf.attention_graphs import enable_attention_graphs

    model = build_model("qwen3_moe").to(CUDA)
    eager = copy.deepcopy(model)
    auto = enable_attention_graphs(model)
    _twins_agree(model, eager, [_tiny_batch(i) for i in range(4)], 1e-5, 1e-4)
    assert auto.failure is None and auto.graphs is not None
    assert auto.graphs.replays == 3 * len(attention_modules(model))  # steps 2-4
    auto.release()
    assert not model._forward_pre_hooks
