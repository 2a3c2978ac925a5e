"""Dense SwiGLU MLP ``forward`` replacement (shared experts, dense layers).

Stock: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. The three projections stay the
module's own ``nn.Linear`` children, called as modules, so PEFT LoRA layers wrapped around them,
their hooks and their biases all behave as stock; only ``act(gate) * up`` becomes one fused
``turbomoe.ops.silu_mul`` (one read of each input, one write) instead of two kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import SiLUActivation

from turbomoe import ops
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.registry import KERNEL_DTYPES

MlpForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _act_reason(mlp: nn.Module) -> str | None:
    act_fn = getattr(mlp, "act_fn", None)
    if type(act_fn) not in (SiLUActivation, nn.SiLU):
        config = getattr(mlp, "config", None)
        act = getattr(config, "hidden_act", type(act_fn).__name__)
        return f"{type(mlp).__name__}: hidden_act={act!r} (turbomoe's dense MLP runs silu only)"
    return None


def _tensor_reason(mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> str | None:
    name = type(mlp).__name__
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        return f"{name}: gate and up projections disagree in shape or dtype"
    if gate.device.type not in ("cpu", "cuda") or gate.dtype not in KERNEL_DTYPES:
        return f"{name}: {gate.dtype} on {gate.device.type}"
    return None


def make_mlp_forward(original: MlpForward) -> MlpForward:
    @functools.wraps(original)
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        reason = _act_reason(self)
        if reason is not None:
            warn_once(reason)
            return original(self, x)
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        reason = _tensor_reason(self, gate, up)
        if reason is not None:
            warn_once(reason)
            return self.down_proj(self.act_fn(gate) * up)
        # The op works on [rows, I] (strided rows allowed); flatten any leading dims.
        width = gate.shape[-1]
        hidden = ops.silu_mul(gate.reshape(-1, width), up.reshape(-1, width))
        return self.down_proj(hidden.view(*gate.shape))

    return forward
