"""turbomoe.ops.route against a float64 torch reference of the header's routing contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbomoe.ops import route
from turbomoe.ops.routing import KINDS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference_route(
    logits: torch.Tensor,
    top_k: int,
    kind: str,
    renormalize: bool,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
    renorm_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight torch version of turbomoe.h's description, differentiable through the weights."""
    x = logits.double()
    if kind == "softmax_topk":
        probs = F.softmax(x, dim=-1)
        ids = torch.topk(probs.detach(), top_k, dim=-1).indices
        weights = probs.gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    elif kind == "sigmoid_group_topk":
        scores = torch.sigmoid(x)
        choice = scores.detach().clone()
        if correction_bias is not None:
            choice = choice + correction_bias.double()
        tokens, experts = x.shape
        if n_group > 1:
            grouped = choice.view(tokens, n_group, experts // n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
            group_mask.scatter_(1, keep, True)
            mask = group_mask.repeat_interleave(experts // n_group, dim=1)
            choice = choice.masked_fill(~mask, float("-inf"))
        ids = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + renorm_epsilon)
        weights = weights * routed_scaling_factor
    else:
        values, ids = torch.topk(x, top_k, dim=-1)
        weights = F.softmax(values, dim=-1)
    return weights, ids


CASES = [
    # (kind, experts, top_k, renormalize, extra kwargs)
    ("softmax_topk", 5, 2, True, {}),
    ("softmax_topk", 5, 2, False, {}),
    ("softmax_topk", 7, 1, False, {}),
    ("topk_softmax", 5, 2, False, {}),
    ("topk_softmax", 6, 4, False, {}),
    ("sigmoid_group_topk", 8, 3, True, {"n_group": 4, "topk_group": 2}),
    ("sigmoid_group_topk", 6, 2, False, {"routed_scaling_factor": 2.5}),
    (
        "sigmoid_group_topk",
        16,
        4,
        True,
        {"n_group": 4, "topk_group": 3, "routed_scaling_factor": 1.7, "renorm_epsilon": 1e-20},
    ),
]


@pytest.mark.parametrize(("kind", "experts", "top_k", "renormalize", "extra"), CASES)
def test_route_matches_reference_forward_and_backward(kind, experts, top_k, renormalize, extra):
    torch.manual_seed(hash((kind, experts, top_k, renormalize)) % 1000)
    tokens = 13
    logits = torch.randn(tokens, experts, dtype=torch.float32, requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    bias = None
    if kind == "sigmoid_group_topk":
        bias = torch.randn(experts) * 0.1
    weights, ids = route(logits, top_k, kind, renormalize, correction_bias=bias, **extra)
    ref_weights, ref_ids = reference_route(
        ref_logits, top_k, kind, renormalize, correction_bias=bias, **extra
    )
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == (tokens, top_k) and ids.shape == (tokens, top_k)
    assert torch.equal(ids, ref_ids)
    assert rel(weights, ref_weights) < 1e-6

    upstream = torch.randn(tokens, top_k, dtype=torch.float64)
    (weights.double() * upstream).sum().backward()
    (ref_weights * upstream).sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.float32
    assert rel(logits.grad, ref_logits.grad) < 1e-6


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_route_bfloat16_logits(kind):
    torch.manual_seed(3)
    experts, top_k = 8, 2
    extra = {"n_group": 2, "topk_group": 1} if kind == "sigmoid_group_topk" else {}
    logits = torch.randn(13, experts).to(torch.bfloat16).requires_grad_(True)
    weights, ids = route(logits, top_k, kind, True, **extra)
    ref_logits = logits.detach().float().requires_grad_(True)
    ref_weights, ref_ids = reference_route(ref_logits, top_k, kind, True, **extra)
    assert torch.equal(ids, ref_ids)
    assert rel(weights, ref_weights) < 1e-5
    upstream = torch.randn(13, top_k)
    (weights * upstream).sum().backward()
    (ref_weights * upstream.double()).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert rel(logits.grad, ref_logits.grad) < 1e-2


def test_route_ties_go_to_lower_expert_id():
    logits = torch.zeros(3, 6)
    logits[1] = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    for kind in KINDS:
        _, ids = route(logits, 3, kind, True)
        assert ids[0].tolist() == [0, 1, 2], kind
        assert ids[1].tolist() == [1, 2, 4], kind


def test_route_matches_hf_qwen3_moe_router(stock_transformers):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=72, num_experts=5, num_experts_per_tok=2)
    config.norm_topk_prob = True
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(13, 72)
    logits, hf_weights, hf_ids = router(hidden)
    weights, ids = route(logits, 2, "softmax_topk", True)
    assert torch.equal(ids, hf_ids)
    assert rel(weights, hf_weights) < 1e-6


def test_route_matches_hf_deepseek_v3_router_as_sets(stock_transformers):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(1)
    config = DeepseekV3Config(
        hidden_size=72,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_(0.0, 0.1)
    hidden = torch.randn(13, 72)
    logits, hf_weights, hf_ids = router(hidden)
    weights, ids = route(
        logits,
        4,
        "sigmoid_group_topk",
        True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        correction_bias=router.e_score_correction_bias,
        renorm_epsilon=1e-20,
    )
    # HF takes top-k with sorted=False: compare per token after ordering by expert id.
    hf_order, order = hf_ids.argsort(dim=-1), ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    assert rel(weights.gather(1, order), hf_weights.gather(1, hf_order)) < 1e-6


def test_route_zero_tokens():
    logits = torch.zeros(0, 5, requires_grad=True)
    weights, ids = route(logits, 2, "softmax_topk", True)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)
    weights.sum().backward()
    assert logits.grad.shape == (0, 5)


def test_route_rejects_bad_arguments():
    logits = torch.randn(4, 5)
    with pytest.raises(ValueError, match="kind"):
        route(logits, 2, "softmax", True)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, 6, "softmax_topk", True)
    with pytest.raises(ValueError, match="n_group"):
        route(logits, 2, "sigmoid_group_topk", True, n_group=2, topk_group=1)
    with pytest.raises(TypeError, match="logits"):
        route(logits.to(torch.int32), 2, "softmax_topk", True)


def test_route_opcheck():
    torch.manual_seed(0)
    logits = torch.randn(13, 8, requires_grad=True)
    bias = torch.randn(8)
    torch.library.opcheck(
        torch.ops.turbomoe.route.default,
        (logits, None, KINDS["softmax_topk"], 2, True, 1, 1, 1.0, 0.0),
    )
    torch.library.opcheck(
        torch.ops.turbomoe.route.default,
        (logits, bias, KINDS["sigmoid_group_topk"], 3, True, 4, 2, 2.5, 1e-20),
    )
    _weights, ids, scores = torch.ops.turbomoe.route(
        logits.detach(), None, KINDS["topk_softmax"], 2, False, 1, 1, 1.0, 0.0
    )
    torch.library.opcheck(
        torch.ops.turbomoe.route_backward.default,
        (
            torch.randn(13, 2),
            scores,
            ids,
            torch.float32,
            KINDS["topk_softmax"],
            2,
            False,
            1,
            1,
            1.0,
            0.0,
        ),
    )
