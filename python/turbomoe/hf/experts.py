"""turbomoe's experts backend for transformers' experts registry.

``@use_experts_implementation`` makes every decorated experts module dispatch, on every call, to
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`` with the contract
``fn(module, hidden [T,H], top_k_index [T,K], top_k_weights [T,K]) -> [T,H]``. The patcher
registers :func:`turbomoe_experts_forward` under the name ``"turbomoe"`` and also as what the
default name ``"grouped_mm"`` resolves to, so models need no ``experts_implementation`` argument.

Because the registry is global, this function also receives modules of families turbomoe does
not run; it recognises its own by ``config.model_type`` (the family table) and by structure (the
decorator's flags, 3-D weights, a SiLU gate) and hands everything else back to the stock
function with a one-time warning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from turbomoe import ops
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.registry import FAMILIES, KERNEL_DTYPES, unsupported_reason
from turbomoe.ops.moe_lean import lean_experts_requested

try:  # transformers itself imports torch.distributed.tensor, so this costs nothing extra
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch build without distributed support
    _DTensor = None

ExpertsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# Set by the patcher: families whose experts hook is on, and the function the "grouped_mm"
# name resolved to before turbomoe replaced it (stock code for every fallback).
_enabled_families: frozenset[str] = frozenset()
_stock_forward: ExpertsFn | None = None


def configure(enabled_families: frozenset[str], stock_forward: ExpertsFn | None) -> None:
    global _enabled_families, _stock_forward
    _enabled_families = enabled_families
    _stock_forward = stock_forward


def _is_dtensor(t: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _static_reason(module: nn.Module) -> str | None:
    """Why this experts module's structure is not what turbomoe runs, or None."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _enabled_families:
        if model_type in FAMILIES:
            return f"experts of model type {model_type!r}: its experts hook is not enabled"
        return f"experts of model type {model_type!r}: {unsupported_reason(model_type)}"
    name = type(module).__name__
    if not getattr(module, "has_gate", True):
        return f"{name}: experts without a gate projection (has_gate=False)"
    if getattr(module, "has_bias", False):
        return f"{name}: expert biases (has_bias=True) are not wired for {model_type}"
    if getattr(module, "is_transposed", False):
        return f"{name}: transposed expert weights (is_transposed=True)"
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"{name}: a custom _apply_gate"
    act_fn = getattr(module, "act_fn", None)
    if type(act_fn) not in (SiLUActivation, nn.SiLU):
        act = getattr(config, "hidden_act", type(act_fn).__name__)
        return f"{name}: hidden_act={act!r} (turbomoe's experts run silu only)"
    return None


def _dynamic_reason(
    module: nn.Module, hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> str | None:
    """Why these particular tensors cannot go through turbomoe's op, or None."""
    name = type(module).__name__
    if gate_up.dim() != 3 or down.dim() != 3:
        return f"{name}: expert weights are not 3-D [E, ., .]"
    if hidden.device.type not in ("cpu", "cuda"):
        return f"{name}: device {hidden.device.type}"
    if hidden.dtype not in KERNEL_DTYPES:
        return f"{name}: dtype {hidden.dtype}"
    if gate_up.dtype != hidden.dtype or down.dtype != hidden.dtype:
        return (
            f"{name}: hidden states in {hidden.dtype} but expert weights in {gate_up.dtype} "
            "(mixed dtypes, e.g. autocast over float32 weights)"
        )
    if _is_dtensor(gate_up) or _is_dtensor(down):
        return f"{name}: expert weights are DTensors"
    return None


def stock_experts_forward() -> ExpertsFn:
    """The stock function turbomoe falls back to."""
    if _stock_forward is not None:
        return _stock_forward
    from transformers.integrations.moe import ExpertsInterface

    return ExpertsInterface._global_mapping["grouped_mm"]


def turbomoe_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts registry entry: ``ops.moe_experts`` on the module's current weights.

    The weights are read from the module at every call, never cached: under PEFT
    ``target_parameters`` the attribute is a parametrization that returns W + ΔW, and under
    gradient checkpointing the recomputation must see the same tensors autograd tracks.
    """
    reason = _static_reason(self)
    if reason is None:
        gate_up = self.gate_up_proj
        down = self.down_proj
        reason = _dynamic_reason(self, hidden_states, gate_up, down)
    if reason is not None:
        warn_once(reason)
        return stock_experts_forward()(self, hidden_states, top_k_index, top_k_weights)
    return ops.moe_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        gate_up,
        down,
        activation="silu",
        interleaved=not getattr(self, "is_concatenated", True),
        recompute=lean_experts_requested(),
    )
