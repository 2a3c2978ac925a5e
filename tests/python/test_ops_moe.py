"""moe_experts against Hugging Face's eager experts (Qwen3-MoE and GPT-OSS), forward and grads."""

from __future__ import annotations

import os

import pytest
import torch

from turbomoe.ops import moe_experts

TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = 13, 72, 24, 5, 2

# Hugging Face is the reference: compare against it unpatched.
pytestmark = pytest.mark.usefixtures("stock_transformers")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def routing_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    # distinct experts per token, expert 4 never chosen
    random_ids = torch.stack([torch.randperm(EXPERTS - 1, generator=g)[:TOP_K] for _ in range(13)])
    # every slot of every token to expert 2 (the other four idle)
    one_expert = torch.full((TOKENS, TOP_K), 2)
    return {"random_idle_expert": random_ids, "all_to_one_expert": one_expert}


CASES = routing_cases()


def qwen3_experts() -> torch.nn.Module:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        hidden_act="silu",
    )
    experts = Qwen3MoeExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    return experts


def gpt_oss_experts() -> torch.nn.Module:
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    experts = GptOssExperts(config)
    # wide enough that gate_up values cross the ±7 clamp
    torch.nn.init.normal_(experts.gate_up_proj, std=0.6)
    torch.nn.init.normal_(experts.gate_up_proj_bias, std=0.5)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj_bias, std=0.5)
    return experts


def eager(module: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """The class's own eager forward, bypassing transformers' experts-implementation dispatch
    (whose default is grouped_mm, and which turbomoe registers itself into)."""
    forward = type(module).forward
    assert hasattr(forward, "__wrapped__"), "transformers no longer wraps the experts forward"
    return forward.__wrapped__(module, *args)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def run_turbomoe_qwen3(
    experts: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    return moe_experts(hidden, ids, weights, experts.gate_up_proj, experts.down_proj)


def run_turbomoe_gpt_oss(
    experts: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    return moe_experts(
        hidden,
        ids,
        weights,
        experts.gate_up_proj.transpose(1, 2),
        experts.down_proj.transpose(1, 2),
        activation="clamped",
        alpha=experts.alpha,
        limit=experts.limit,
        interleaved=True,
        gate_up_bias=experts.gate_up_proj_bias,
        down_bias=experts.down_proj_bias,
    )


FAMILIES = {
    "qwen3_moe": (qwen3_experts, run_turbomoe_qwen3),
    "gpt_oss": (gpt_oss_experts, run_turbomoe_gpt_oss),
}


def compare_with_hf(family: str, ids: torch.Tensor, dropped: torch.Tensor | None = None) -> None:
    """Runs HF's eager experts and turbomoe on the same inputs; asserts outputs and grads agree.

    dropped marks slots carrying the sentinel id E: HF's eager loop cannot take that id, so HF
    gets expert 0 with routing weight 0 there (the same output), and the routing-weight gradient
    of those slots, which turbomoe leaves at 0, is compared separately.
    """
    make, run = FAMILIES[family]
    torch.manual_seed(11)
    hf = make()
    ours = make()
    ours.load_state_dict(hf.state_dict())
    hidden = torch.randn(TOKENS, HIDDEN)
    weights = torch.rand(TOKENS, TOP_K)
    hf_ids, hf_weights = ids, weights
    if dropped is not None:
        hf_ids = ids.masked_fill(dropped, 0)
        hf_weights = weights.masked_fill(dropped, 0.0)

    h1 = hidden.clone().requires_grad_(True)
    w1 = hf_weights.clone().requires_grad_(True)
    ref = eager(hf, h1, hf_ids, w1)
    h2 = hidden.clone().requires_grad_(True)
    w2 = weights.clone().requires_grad_(True)
    out = run(ours, h2, ids, w2)

    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) < 1e-5
    upstream = torch.randn(TOKENS, HIDDEN)
    (ref * upstream).sum().backward()
    (out * upstream).sum().backward()
    assert rel(h2.grad, h1.grad) < 1e-5
    keep = torch.ones_like(weights, dtype=torch.bool) if dropped is None else ~dropped
    assert rel(w2.grad[keep], w1.grad[keep]) < 1e-5
    if dropped is not None:
        assert torch.count_nonzero(w2.grad[dropped]) == 0
    hf_grads, our_grads = grads(hf), grads(ours)
    assert hf_grads.keys() == our_grads.keys()
    for name in hf_grads:
        assert rel(our_grads[name], hf_grads[name]) < 1e-5, name


# TURBOMOE_GATHER_IN_GEMM: the permuted copy of the tokens (gather_rows, then the GEMM) or the
# gather inside the gate/up GEMM's loads (qwen3_moe; GPT-OSS's biased projection keeps the copy).
GATHER = pytest.mark.parametrize("gather", ["0", "1"], ids=["copy", "in_gemm"])


@GATHER
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_experts_matches_hf(family, case, gather, monkeypatch):
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    compare_with_hf(family, CASES[case])


@GATHER
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moe_experts_drops_sentinel_ids(family, gather, monkeypatch):
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    ids = CASES["random_idle_expert"].clone()
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    dropped[::3, 1] = True
    dropped[4, :] = True
    ids[dropped] = EXPERTS
    compare_with_hf(family, ids, dropped)


def test_moe_experts_int32_ids_and_router_weights():
    from turbomoe.ops import route

    torch.manual_seed(3)
    hf = qwen3_experts()
    hidden = torch.randn(TOKENS, HIDDEN)
    logits = torch.randn(TOKENS, EXPERTS, requires_grad=True)
    weights, ids = route(logits, TOP_K, "softmax_topk", True)
    out = moe_experts(hidden, ids.to(torch.int32), weights, hf.gate_up_proj, hf.down_proj)
    out.square().sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    probs = torch.softmax(ref_logits, -1)
    ref_weights = probs.gather(1, ids)
    ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    ref = eager(hf, hidden, ids, ref_weights)
    assert rel(out, ref) < 1e-5
    ref.square().sum().backward()
    assert rel(logits.grad, ref_logits.grad) < 1e-5


def test_moe_experts_bfloat16_close_to_float32():
    torch.manual_seed(4)
    hf = qwen3_experts()
    hidden = torch.randn(TOKENS, HIDDEN)
    ids = CASES["random_idle_expert"]
    weights = torch.rand(TOKENS, TOP_K)
    ref = eager(hf, hidden, ids, weights)
    out = moe_experts(
        hidden.bfloat16(),
        ids,
        weights.bfloat16(),
        hf.gate_up_proj.detach().bfloat16(),
        hf.down_proj.detach().bfloat16(),
    )
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 2e-2


def test_moe_experts_zero_tokens():
    hf = qwen3_experts()
    hidden = torch.randn(0, HIDDEN, requires_grad=True)
    weights = torch.rand(0, TOP_K, requires_grad=True)
    ids = torch.zeros(0, TOP_K, dtype=torch.int64)
    out = moe_experts(hidden, ids, weights, hf.gate_up_proj, hf.down_proj)
    assert out.shape == (0, HIDDEN)
    out.sum().backward()
    assert hidden.grad.shape == (0, HIDDEN)
    assert torch.count_nonzero(hf.gate_up_proj.grad) == 0
    assert torch.count_nonzero(hf.down_proj.grad) == 0


def test_moe_experts_rejects_bad_arguments():
    hf = qwen3_experts()
    hidden = torch.randn(TOKENS, HIDDEN)
    ids = CASES["random_idle_expert"]
    weights = torch.rand(TOKENS, TOP_K)
    with pytest.raises(ValueError, match="activation"):
        moe_experts(hidden, ids, weights, hf.gate_up_proj, hf.down_proj, activation="gelu")
    with pytest.raises(ValueError, match="top_k_weights"):
        moe_experts(hidden, ids, weights[:, :1], hf.gate_up_proj, hf.down_proj)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_experts(hidden, ids + 5, weights, hf.gate_up_proj, hf.down_proj)


@GATHER
def test_routed_pairs_sizes_the_buffers_exactly_with_the_same_result(gather, monkeypatch):
    """The expert-parallel owner's case: most slots hold the sentinel (id E, dropped)."""
    monkeypatch.setenv("TURBOMOE_GATHER_IN_GEMM", gather)
    torch.manual_seed(7)
    tokens, hidden, inter, experts, top_k = 24, 16, 12, 4, 3
    ids = torch.randint(0, experts, (tokens, top_k))
    ids[torch.rand(tokens, top_k) < 0.6] = experts
    routed = int((ids < experts).sum())
    assert 0 < routed < tokens * top_k
    runs = []
    for pairs in (None, routed):
        torch.manual_seed(8)
        x = torch.randn(tokens, hidden, requires_grad=True)
        w = torch.rand(tokens, top_k, requires_grad=True)
        gate_up = torch.randn(experts, 2 * inter, hidden, requires_grad=True)
        down = torch.randn(experts, hidden, inter, requires_grad=True)
        out = moe_experts(x, ids, w, gate_up, down, routed_pairs=pairs)
        out.square().sum().backward()
        runs.append([out.detach(), x.grad, w.grad, gate_up.grad, down.grad])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gather_in_gemm_equals_the_permuted_copy_to_the_bit():
    """Both qwen3-style paths run the same rows through the same CPU loops: output and every
    gradient are bitwise equal, with dropped slots and routed_pairs set."""
    torch.manual_seed(9)
    tokens, hidden, inter, experts, top_k = 20, 16, 12, 5, 3
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    ids[torch.rand(tokens, top_k) < 0.2] = experts
    routed = int((ids < experts).sum())
    runs = []
    for gather in ("0", "1"):
        os.environ["TURBOMOE_GATHER_IN_GEMM"] = gather
        try:
            torch.manual_seed(10)
            x = torch.randn(tokens, hidden, requires_grad=True)
            w = torch.rand(tokens, top_k, requires_grad=True)
            gate_up = torch.randn(experts, 2 * inter, hidden, requires_grad=True)
            down = torch.randn(experts, hidden, inter, requires_grad=True)
            out = moe_experts(x, ids, w, gate_up, down, routed_pairs=routed)
            out.square().sum().backward()
        finally:
            os.environ.pop("TURBOMOE_GATHER_IN_GEMM", None)
        runs.append([out.detach(), x.grad, w.grad, gate_up.grad, down.grad])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
