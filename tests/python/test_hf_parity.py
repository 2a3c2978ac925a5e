"""Stock transformers vs ``import turbomoe`` on tiny models of every supported family (CPU, fp32).

The same model object (the same weights) runs once with turbomoe unpatched (stock code) and once
patched; losses must agree to rel 1e-5 and every parameter gradient to rel 1e-4, and the patched
run must actually have called turbomoe's ops, so the comparison is never stock against stock.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_models import (
    FAMILIES,
    assert_grads_close,
    build_model,
    capture_routing,
    loss_and_grads,
    make_batch,
    rel_err,
    routers,
    stock_and_turbomoe,
)

import turbomoe
from turbomoe.hf.fallback import TurbomoeFallbackWarning, reset_warnings

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")  # the ones with a router aux loss
# Families whose tiny model has a dense SwiGLU MLP (a dense layer or a shared expert).
DENSE_MLP_FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v3")


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()


def _rope_op(family: str) -> str:
    """Qwen3's attention normalises and rotates q and k in one op; the others call RoPE alone."""
    return "qk_norm_rope" if family == "qwen3_moe" else "apply_rope"


def _expected_ops(family: str) -> set[str]:
    ops = {"route", "moe_experts", "rms_norm", "linear_cross_entropy", _rope_op(family)}
    if family in DENSE_MLP_FAMILIES:
        ops.add("silu_mul")
    return ops


def _assert_called(counts: dict[str, int], expected: set[str]) -> None:
    missing = sorted(name for name in expected if counts[name] == 0)
    assert not missing, f"turbomoe ops never called: {missing} (counts {counts})"


@pytest.mark.parametrize("family", FAMILIES)
def test_train_step_parity(family: str) -> None:
    """Loss and all gradients; padding through attention_mask, -100 labels, 13 tokens."""
    model = build_model(family)
    batch = make_batch()
    (loss0, grads0, out0), (loss1, grads1, out1), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= LOSS_TOL, (loss1.item(), loss0.item())
    assert_grads_close(grads1, grads0, GRAD_TOL)
    _assert_called(counts, _expected_ops(family))
    # Documented: the fused loss returns no logits while training with labels.
    assert out0.logits is not None and out1.logits is None


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_logits_parity(family: str) -> None:
    """Without labels the logits are computed (stock lm_head); with labels in eval mode both the
    fused loss and the logits are returned."""
    model = build_model(family).eval()
    batch = make_batch(seed=1)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            labelled = model(**batch)
        return plain.logits, labelled.logits, labelled.loss

    (logits0, llogits0, loss0), (logits1, llogits1, loss1), counts = stock_and_turbomoe(run)
    assert rel_err(logits1, logits0) <= LOSS_TOL
    assert rel_err(llogits1, llogits0) <= LOSS_TOL
    assert rel_err(loss1, loss0) <= LOSS_TOL
    _assert_called(counts, _expected_ops(family))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_aux_loss_parity(family: str) -> None:
    """output_router_logits=True: router logits (recorded by HF's hooks on the router class),
    aux loss and loss + coef * aux all agree, and gradients flow through the aux term."""
    model = build_model(family, router_aux_loss_coef=0.5)
    batch = make_batch(seed=2)
    (loss0, grads0, out0), (loss1, grads1, out1), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch, output_router_logits=True)
    )
    assert out0.router_logits is not None and len(out1.router_logits) == len(out0.router_logits)
    for got, want in zip(out1.router_logits, out0.router_logits, strict=True):
        assert rel_err(got, want) <= LOSS_TOL
    assert rel_err(out1.aux_loss, out0.aux_loss) <= LOSS_TOL
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)
    _assert_called(counts, {"route", "moe_experts"})


def _starve_expert(model: torch.nn.Module, family: str) -> int:
    """Rewrites router weights so one expert can never be selected; returns its id.

    Softmax routers (5 experts, top-2): w1 = -w0 and w4 = -w2 make exactly one of each pair
    positive for every token, while w3 = 0 gives expert 3 a logit of 0, so the top 2 are always
    two strictly positive logits from {0, 1, 2, 4}. DeepSeek-V3: a correction bias of -10 keeps
    expert 5 out of every selection.
    """
    with torch.no_grad():
        for router in routers(model):
            if family == "deepseek_v3":
                router.e_score_correction_bias[5] = -10.0
                continue
            w = router.weight
            w[1] = -w[0]
            w[4] = -w[2]
            w[3] = 0.0
    return 5 if family == "deepseek_v3" else 3


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_without_tokens(family: str) -> None:
    model = build_model(family, seed=3)
    starved = _starve_expert(model, family)
    batch = make_batch(seed=3)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        with capture_routing(model) as ids:
            loss, grads, _ = loss_and_grads(model, batch)
        return loss, grads, ids

    (loss0, grads0, ids0), (loss1, grads1, ids1), counts = stock_and_turbomoe(run)
    for ids in (ids0, ids1):
        assert ids and all(not (layer_ids == starved).any() for layer_ids in ids)
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)
    # The starved expert's weights get an exactly zero gradient on both paths.
    for name, grad in grads1.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            assert torch.count_nonzero(grad[starved]) == 0
            assert torch.count_nonzero(grads0[name][starved]) == 0
    _assert_called(counts, {"moe_experts"})


def _favour_expert(model: torch.nn.Module) -> None:
    """Makes expert 0 every token's first choice, whatever the token.

    A large constant in channel 0 of every token embedding dominates the residual stream, so
    the normalised router input has a large positive channel 0 for every token; a large router
    weight on that channel then puts expert 0 first for all of them.
    """
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 3.0
        for router in routers(model):
            router.weight[0, 0] = 3.0


@pytest.mark.parametrize("family", FAMILIES)
def test_all_tokens_to_one_expert(family: str) -> None:
    model = build_model(family, seed=4)
    _favour_expert(model)
    batch = make_batch(seed=4)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        with capture_routing(model) as ids:
            loss, grads, _ = loss_and_grads(model, batch)
        return loss, grads, ids

    (loss0, grads0, ids0), (loss1, grads1, ids1), counts = stock_and_turbomoe(run)
    for ids in (ids0, ids1):
        assert ids and all((layer_ids == 0).any(dim=-1).all() for layer_ids in ids)
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)
    _assert_called(counts, {"moe_experts", "route"})


def test_deepseek_bias_sends_everything_to_one_expert() -> None:
    """Diverse tokens, yet a large correction bias puts expert 0 in every token's top-k."""
    model = build_model("deepseek_v3", seed=5)
    with torch.no_grad():
        for router in routers(model):
            router.e_score_correction_bias[0] = 10.0
    batch = make_batch(seed=5)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        with capture_routing(model) as ids:
            loss, grads, _ = loss_and_grads(model, batch)
        return loss, grads, ids

    (loss0, grads0, _), (loss1, grads1, ids1), _ = stock_and_turbomoe(run)
    assert all((layer_ids == 0).any(dim=-1).all() for layer_ids in ids1)
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_loss_kwargs_parity(family: str) -> None:
    """num_items_in_batch (sum / count), explicit shift_labels, logits_to_keep, return_dict."""
    model = build_model(family, seed=6)
    batch = make_batch(seed=6)
    labels = batch["labels"]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()

    def run() -> list[torch.Tensor]:
        losses = []
        out = model(**batch, num_items_in_batch=torch.tensor(7))
        losses.append(out.loss)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, labels=labels, shift_labels=shifted)
        losses.append(out.loss)
        out = model(**inputs, labels=labels[:, -4:], logits_to_keep=4)
        losses.append(out.loss)
        as_tuple = model(**batch, return_dict=False)
        losses.append(as_tuple[0])
        return [loss.detach() for loss in losses]

    stock, patched, counts = stock_and_turbomoe(run)
    for got, want in zip(patched, stock, strict=True):
        assert rel_err(got, want) <= LOSS_TOL, (got.item(), want.item())
    assert counts["linear_cross_entropy"] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_parity(family: str) -> None:
    model = build_model(family, seed=8)
    model.gradient_checkpointing_enable()
    batch = make_batch(seed=8)
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)
    # The MoE block is recomputed in backward: the experts op runs twice per MoE layer.
    moe_layers = 1 if family in ("qwen3_moe", "deepseek_v3") else 2
    assert counts["moe_experts"] == 2 * moe_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy_same_tokens(family: str) -> None:
    model = build_model(family, seed=9).eval()
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(9))

    def run() -> torch.Tensor:
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )

    stock, patched, counts = stock_and_turbomoe(run)
    assert torch.equal(stock, patched)
    _assert_called(counts, {"moe_experts", "route", "rms_norm", _rope_op(family)})


def test_mixtral_router_jitter_in_training() -> None:
    """Mixtral's jitter is applied by the stock sparse block before the (patched) router, so
    it is supported; with the same RNG seed both paths see the same noise."""
    model = build_model("mixtral", seed=10, router_jitter_noise=0.1)
    batch = make_batch(seed=10)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        torch.manual_seed(123)
        return loss_and_grads(model, batch)

    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(run)
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)
    _assert_called(counts, {"route", "moe_experts"})


def test_deepseek_v3_ungrouped_variant() -> None:
    """DeepSeek-V3 without groups, renormalisation, q LoRA or interleaved RoPE, 5 experts."""
    model = build_model(
        "deepseek_v3",
        seed=16,
        n_routed_experts=5,
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        q_lora_rank=None,
        rope_interleave=False,
        routed_scaling_factor=1.0,
    )
    batch = make_batch(seed=16)
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= LOSS_TOL
    assert_grads_close(grads1, grads0, GRAD_TOL)
    _assert_called(counts, _expected_ops("deepseek_v3"))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_bfloat16_smoke(family: str) -> None:
    """bf16 weights (Qwen casts routing weights to bf16, Mixtral/DeepSeek keep float32): loose
    agreement, gradients in the parameters' dtype."""
    model = build_model(family, seed=17).to(torch.bfloat16)
    batch = make_batch(seed=17)
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= 2e-2
    assert all(grads1[name].dtype == torch.bfloat16 for name in grads1)
    assert_grads_close(grads1, grads0, 1e-1)
    _assert_called(counts, {"moe_experts", "route", "rms_norm", "linear_cross_entropy"})


@pytest.mark.parametrize(
    ("family", "overrides"),
    # head dim 64: Qwen3's q/k norm + RoPE through the fused kernel (18 composes the two ops)
    [("qwen3_moe", {}), ("qwen3_moe", {"head_dim": 64}), ("deepseek_v3", {})],
)
def test_patched_training_forward_traces_without_graph_breaks(
    family: str, overrides: dict[str, int]
) -> None:
    """The patched forwards' checks are plain attribute/dtype/stride tests that torch.compile
    traces: the whole training forward (fused loss included) is one graph."""
    model = build_model(family, seed=19, **overrides)
    batch = make_batch(seed=19)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(model)(**batch)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_cpu_autocast_bf16_smoke(family: str) -> None:
    """float32 weights under bf16 autocast (what Trainer(bf16=True) does): the fused loss gets
    the autocast-dtype operands stock's lm_head would use, RMSNorm and RoPE keep stock's dtype
    promotion, and training still agrees, with no fallback."""
    model = build_model(family, seed=21)
    batch = make_batch(seed=21)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(model, batch)

    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TurbomoeFallbackWarning)
        (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(run)
    assert rel_err(loss1, loss0) <= 2e-2
    assert_grads_close(grads1, grads0, 1e-1)
    # Under autocast q/k are bf16 and cos/sin float32 (stock promotes), so Qwen3's attention
    # takes the separate norm and RoPE calls too.
    _assert_called(counts, {"linear_cross_entropy", "moe_experts", "rms_norm", "apply_rope"})


@pytest.mark.parametrize("gather", ["0", "1"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_train_step_parity_lean_experts(
    family: str, gather: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TURBOMOE_LEAN_EXPERTS=1: the patched experts keep the lean autograd record (with and
    without the gathers inside the GEMMs) and still match stock's loss and gradients."""
    from turbomoe.ops import moe

    monkeypatch.setenv("TURBOMOE_LEAN_EXPERTS", "1")
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    lean_calls = []
    original = moe.lean_experts

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        lean_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe, "lean_experts", counted)
    model = build_model(family)
    batch = make_batch()
    (loss0, grads0, _), (loss1, grads1, _), counts = stock_and_turbomoe(
        lambda: loss_and_grads(model, batch)
    )
    assert rel_err(loss1, loss0) <= LOSS_TOL, (loss1.item(), loss0.item())
    assert_grads_close(grads1, grads0, GRAD_TOL)
    assert counts["moe_experts"] > 0 and len(lean_calls) == counts["moe_experts"]


def test_lean_experts_switch_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbomoe.ops.moe_lean import lean_experts_requested

    monkeypatch.setenv("TURBOMOE_LEAN_EXPERTS", "yes")
    with pytest.raises(ValueError, match="TURBOMOE_LEAN_EXPERTS='yes' must be 0 or 1"):
        lean_experts_requested()
