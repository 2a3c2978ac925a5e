"""Router: logits → per-token top-k expert ids and weights, as a torch custom op.

One C call covers the three routing families of the supported models (softmax then top-k for
Qwen/Mixtral/OLMoE, grouped sigmoid with a correction bias for DeepSeek-V3/GLM, top-k then softmax
for GPT-OSS), so the router costs one kernel instead of HF's chain of softmax/topk/gather/divide.
The forward also returns the scores the backward needs (probabilities, sigmoid scores or the logits)
so that nothing is recomputed and the logits need not be kept.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct

SOFTMAX_TOPK = 1
SIGMOID_GROUP_TOPK = 2
TOPK_SOFTMAX = 3

KINDS: dict[str, int] = {
    "softmax_topk": SOFTMAX_TOPK,
    "sigmoid_group_topk": SIGMOID_GROUP_TOPK,
    "topk_softmax": TOPK_SOFTMAX,
}


def _params(
    kind: int,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renorm_epsilon: float,
) -> Any:
    return _native.make_params(
        _native.RoutingParams,
        kind=kind,
        top_k=top_k,
        renormalize=1 if renormalize else 0,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        renorm_epsilon=renorm_epsilon,
    )


@torch.library.custom_op("turbomoe::route", mutates_args=())
def _route(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    kind: int,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renorm_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights f32 [T,K], ids int64 [T,K], scores f32 [T,E]); scores are kept for the backward."""
    tokens, experts = logits.shape[0], logits.shape[-1]
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    scores = torch.empty((tokens, experts), dtype=torch.float32, device=logits.device)
    params = _params(
        kind, top_k, renormalize, n_group, topk_group, routed_scaling_factor, renorm_epsilon
    )
    _native.call(
        "tm_routing_forward",
        params,
        _native.describe(logits),
        _native.describe(correction_bias),
        _native.describe(weights),
        _native.describe(ids),
        _native.describe(scores),
        _native.stream_for(logits),
    )
    return weights, ids, scores


@_route.register_fake
def _(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    kind: int,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renorm_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, experts = logits.shape[0], logits.shape[-1]
    return (
        logits.new_empty((tokens, top_k), dtype=torch.float32),
        logits.new_empty((tokens, top_k), dtype=torch.int64),
        logits.new_empty((tokens, experts), dtype=torch.float32),
    )


@torch.library.custom_op("turbomoe::route_backward", mutates_args=())
def _route_backward(
    grad_weights: torch.Tensor,
    scores: torch.Tensor,
    ids: torch.Tensor,
    logits_dtype: torch.dtype,
    kind: int,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renorm_epsilon: float,
) -> torch.Tensor:
    """grad_logits [T,E] in the logits' dtype from the gradient of the weights."""
    grad_logits = torch.empty(scores.shape, dtype=logits_dtype, device=scores.device)
    params = _params(
        kind, top_k, renormalize, n_group, topk_group, routed_scaling_factor, renorm_epsilon
    )
    _native.call(
        "tm_routing_backward",
        params,
        _native.describe(grad_weights),
        _native.describe(scores),
        _native.describe(ids),
        _native.describe(grad_logits),
        _native.stream_for(scores),
    )
    return grad_logits


@_route_backward.register_fake
def _(
    grad_weights: torch.Tensor,
    scores: torch.Tensor,
    ids: torch.Tensor,
    logits_dtype: torch.dtype,
    kind: int,
    top_k: int,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    renorm_epsilon: float,
) -> torch.Tensor:
    return scores.new_empty(scores.shape, dtype=logits_dtype)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    logits = inputs[0]
    _weights, ids, scores = output
    ctx.save_for_backward(scores, ids)
    ctx.logits_dtype = logits.dtype
    ctx.config = inputs[2:]
    ctx.mark_non_differentiable(ids, scores)


def _backward(ctx: Any, grad_weights: torch.Tensor | None, *_: Any) -> tuple[Any, ...]:
    if grad_weights is None:  # the weights fed nothing that needs a gradient
        return (None, None, *([None] * len(ctx.config)))
    scores, ids = ctx.saved_tensors
    grad_logits = _route_backward_eager(
        grad_weights.to(torch.float32).contiguous(), scores, ids, ctx.logits_dtype, *ctx.config
    )
    return (grad_logits, None, *([None] * len(ctx.config)))


_route_eager = differentiable(_route, _setup_context, _backward)
_route_backward_eager = direct(_route_backward)


def route(
    logits: torch.Tensor,
    top_k: int,
    kind: str,
    renormalize: bool,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    correction_bias: torch.Tensor | None = None,
    renorm_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of router logits [T,E] → (weights float32 [T,K], ids int64 [T,K]).

    kind is "softmax_topk" (Qwen, Mixtral, OLMoE), "sigmoid_group_topk" (DeepSeek-V3, GLM: with
    n_group/topk_group, correction_bias, renorm_epsilon and routed_scaling_factor) or
    "topk_softmax" (GPT-OSS). Differentiable with respect to logits through the weights; the ids
    are not. The correction bias is a non-trainable buffer, so it is read as float32 whatever
    dtype the model was cast to.
    """
    code = KINDS.get(kind)
    if code is None:
        raise ValueError(f"kind is {kind!r}, expected one of {sorted(KINDS)}")
    if correction_bias is not None:
        correction_bias = correction_bias.detach().to(torch.float32).contiguous()
    weights, ids, _scores = _route_eager(
        logits.contiguous(),
        correction_bias,
        code,
        int(top_k),
        bool(renormalize),
        int(n_group),
        int(topk_group),
        float(routed_scaling_factor),
        float(renorm_epsilon),
    )
    return weights, ids
