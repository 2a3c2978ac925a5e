"""RMSNorm ``forward`` replacement: one fused kernel instead of five element-wise ones.

Stock (all supported families): ``weight * (x.float() * rsqrt(mean(x², -1) + eps)).to(x.dtype)``.
``turbomoe.ops.rms_norm`` computes exactly that with float32 statistics. Stock multiplies by
the weight after the cast, so a weight in another dtype than x promotes the result (a float32
weight over bf16 activations, as under autocast, returns float32); that case runs the op
without the weight and keeps stock's promoting multiply.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import torch
from torch import nn

from turbomoe import ops
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.registry import KERNEL_DTYPES

NormForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _reason(norm: nn.Module, x: torch.Tensor) -> str | None:
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or x.dim() == 0:
        return f"{name}: weight is not a vector"
    if weight.shape[0] != x.shape[-1]:
        return f"{name}: weight has {weight.shape[0]} entries for a last dim of {x.shape[-1]}"
    eps = getattr(norm, "variance_epsilon", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return f"{name}: no numeric variance_epsilon"
    if x.device.type not in ("cpu", "cuda"):
        return f"{name}: device {x.device.type}"
    if x.dtype not in KERNEL_DTYPES:
        return f"{name}: dtype {x.dtype}"
    if weight.dtype not in KERNEL_DTYPES:
        return f"{name}: weight dtype {weight.dtype}"
    return None


def make_rmsnorm_forward(original: NormForward) -> NormForward:
    @functools.wraps(original)
    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        reason = _reason(self, hidden_states)
        if reason is not None:
            warn_once(reason)
            return original(self, hidden_states)
        eps = float(self.variance_epsilon)
        if self.weight.dtype != hidden_states.dtype:
            return self.weight * ops.rms_norm(hidden_states, None, eps)
        return ops.rms_norm(hidden_states, self.weight, eps)

    return forward


def hooked(module: nn.Module) -> bool:
    """Whether the module has forward hooks of its own (which a fused forward would skip)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def global_hooks_registered() -> bool:
    """Whether module hooks for every module are registered (a fused forward would skip the
    calls of the modules it folds, so it must not run)."""
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def fused_norm_reason(
    norm: nn.Module, dtype: torch.dtype, size: int, norm_classes: tuple[type, ...], role: str
) -> str | None:
    """Why ``norm`` cannot be folded into a fused op over ``dtype`` activations of last dim
    ``size`` (the fused forwards of hf/attention.py and hf/decoder_layer.py call the norm's
    arithmetic themselves, so only the family's plain RMSNorm, without hooks of its own, with a
    weight of the activations' dtype, qualifies), or None."""
    name = type(norm).__name__
    if not isinstance(norm, norm_classes):
        return f"{name}: a {role} that is not the family's RMSNorm"
    if hooked(norm):
        return f"{name}: a {role} with forward hooks of its own"
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,):
        return f"{name}: a {role} weight that is not a [{size}] vector"
    if weight.dtype != dtype:
        return f"{name}: a {weight.dtype} {role} weight over {dtype} activations"
    eps = getattr(norm, "variance_epsilon", None)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        return f"{name}: no numeric variance_epsilon"
    return None
