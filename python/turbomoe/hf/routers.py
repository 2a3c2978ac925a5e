"""Router ``forward`` replacements: the same ``(router_logits, top_k_weights, top_k_index)``.

The router module itself stays in the model (its class, its ``weight``, its place in the state
dict): only the method is swapped on the class. That keeps transformers' ``OutputRecorder``
hooks (router logits at index 0 for the aux loss) and expert parallelism's router hooks working,
and the logits are still computed by ``F.linear`` exactly as stock. Only softmax/sigmoid, group
selection, top-k and renormalisation move into ``turbomoe.ops.route``, and the weights come back
in the dtype each family's stock router returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbomoe import ops
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.registry import KERNEL_DTYPES, Routing

RouterForward = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# Stock DeepSeek-V3 renormalisation adds this to the denominator.
_DEEPSEEK_RENORM_EPSILON = 1e-20
_GROUPED_ATTRS = ("num_group", "topk_group", "routed_scaling_factor", "e_score_correction_bias")


def _reason(router: nn.Module, hidden: torch.Tensor, routing: Routing) -> str | None:
    name = type(router).__name__
    weight = getattr(router, "weight", None)
    top_k = getattr(router, "top_k", None)
    hidden_dim = getattr(router, "hidden_dim", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or top_k is None:
        return f"{name}: not a linear top-k router (weight [E, H] and top_k expected)"
    if hidden_dim != weight.shape[1]:
        return f"{name}: hidden_dim does not match the router weight"
    if routing.renormalize is None and not hasattr(router, "norm_topk_prob"):
        return f"{name}: no norm_topk_prob attribute"
    if hidden.device.type not in ("cpu", "cuda"):
        return f"{name}: device {hidden.device.type}"
    if routing.grouped:
        missing = [attr for attr in _GROUPED_ATTRS if not hasattr(router, attr)]
        if missing:
            return f"{name}: no {', '.join(missing)} attribute"
        num_experts = weight.shape[0]
        groups = int(router.num_group)
        if groups < 1 or num_experts % groups != 0 or num_experts // groups < 2:
            return (
                f"{name}: {num_experts} experts do not split into n_group={groups} groups of >= 2"
            )
        if not 1 <= int(router.topk_group) <= groups:
            return f"{name}: topk_group={router.topk_group} with n_group={groups}"
        if int(top_k) > int(router.topk_group) * (num_experts // groups):
            return f"{name}: top_k={top_k} exceeds the experts of the kept groups"
    return None


def make_router_forward(original: RouterForward, routing: Routing) -> RouterForward:
    """A router forward with the stock signature and return tuple for one family."""

    @functools.wraps(original)
    def forward(
        self: nn.Module, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reason = _reason(self, hidden_states, routing)
        if reason is not None:
            warn_once(reason)
            return original(self, hidden_states)
        hidden = hidden_states.reshape(-1, self.hidden_dim)
        if routing.fp32_logits:
            router_logits = F.linear(hidden.type(torch.float32), self.weight.type(torch.float32))
        else:
            router_logits = F.linear(hidden, self.weight)
            if router_logits.dtype not in KERNEL_DTYPES:  # e.g. float16: stock handles it
                warn_once(f"{type(self).__name__}: router logits in {router_logits.dtype}")
                return original(self, hidden_states)
        renormalize = (
            routing.renormalize if routing.renormalize is not None else bool(self.norm_topk_prob)
        )
        extra: dict[str, Any] = {}
        if routing.grouped:
            extra = {
                "n_group": int(self.num_group),
                "topk_group": int(self.topk_group),
                "routed_scaling_factor": float(self.routed_scaling_factor),
                "correction_bias": self.e_score_correction_bias,
                "renorm_epsilon": _DEEPSEEK_RENORM_EPSILON,
            }
        weights, ids = ops.route(router_logits, int(self.top_k), routing.kind, renormalize, **extra)
        if routing.weights_in_logits_dtype:
            weights = weights.to(router_logits.dtype)
        return router_logits, weights, ids

    return forward
