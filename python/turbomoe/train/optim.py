"""AdamW whose moments may be stored in a narrower dtype than the parameters.

torch's AdamW keeps its moments in the parameter's dtype. With bfloat16 moments (optim.state_dtype)
the optimizer state of a full fine-tune takes half the memory; the update itself is computed in
float32 from the upcast moments, so only the stored state is rounded. Each parameter's step is
one pass of ``turbomoe.ops.adamw_step_`` (``TURBOMOE_FUSED_ADAMW=0``: the same step as tensor
ops, some fifteen passes and float32 temporaries the size of the parameter)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from turbomoe import ops
from turbomoe.parallel.optim_groups import split_param_groups
from turbomoe.train.config import OptimSection

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded state to each parameter's dtype; the moments go back to theirs, so
        # a resumed run rounds exactly as the uninterrupted one did.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Any = None, *, grad_scale: torch.Tensor | None = None
    ) -> None:
        """One step; ``grad_scale`` (a float32 scalar tensor, e.g. a clipping factor computed
        on the device) multiplies every gradient as the step reads it, leaving ``.grad`` as is."""
        fused = os.environ.get("TURBOMOE_FUSED_ADAMW", "1") != "0"
        scales: dict[torch.device, torch.Tensor] = {}  # grad_scale on each parameter device
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                t = float(state["step"])
                local = _local_tensors(p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if fused and local is not None and ops.adamw_step_reason(*local) is None:
                    ops.adamw_step_(
                        *local,
                        lr=group["lr"],
                        beta1=beta1,
                        beta2=beta2,
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        step=int(t),
                        grad_scale=_scale_on(grad_scale, p, scales),
                        checked=True,
                    )
                    continue
                _step_with_tensor_ops(p, state, group, t, grad_scale)


def _local_tensors(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The tensors themselves, or for DTensors laid out alike, their local shards (the step is
    element-wise, so each rank updates its own shard); None for DTensors laid out differently
    (a gradient still Partial, say) or mixed with plain tensors."""
    dtensors = [isinstance(t, DTensor) for t in tensors]
    if not any(dtensors):
        return tensors
    if not all(dtensors):
        return None
    first = tensors[0]
    if any(t.placements != first.placements or t.device_mesh != first.device_mesh for t in tensors):
        return None
    return tuple(t.to_local() for t in tensors)


def _scale_on(
    grad_scale: torch.Tensor | None,
    p: torch.Tensor,
    cache: dict[torch.device, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """grad_scale as a float32 scalar on p's device (once per device and step with a cache)."""
    if grad_scale is None:
        return None
    if cache is not None and p.device in cache:
        return cache[p.device]
    scale = grad_scale.detach().to(device=p.device, dtype=torch.float32).reshape(())
    if cache is not None:
        cache[p.device] = scale
    return scale


def _step_with_tensor_ops(
    p: torch.Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    t: float,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """The same step as tensor ops: for what the fused step does not take (DTensors laid out
    differently, half precision, non-contiguous tensors); also its reference in the tests."""
    beta1, beta2 = group["betas"]
    grad = p.grad.float()
    if grad_scale is not None:
        # A DTensor takes a Python scalar, not a plain tensor (a host sync on this rare path).
        scale = _scale_on(grad_scale, p)
        grad = grad * (float(scale) if isinstance(grad, DTensor) else scale)
    m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
    v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    state["exp_avg"].copy_(m)
    state["exp_avg_sq"].copy_(v)
    denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
    update = (m / (1 - beta1**t)).div_(denom)
    weight = p.float()
    if group["weight_decay"]:
        weight.mul_(1 - group["lr"] * group["weight_decay"])
    weight.add_(update, alpha=-group["lr"])
    p.copy_(weight)


def build_optimizer(
    params: list[torch.nn.Parameter], lr: float, optim: OptimSection, device: torch.device
) -> torch.optim.Optimizer:
    """torch's AdamW (fused on CUDA) when it already stores the moments in the requested dtype
    (the parameters' own), else turbomoe's AdamW with the moments in optim.state_dtype."""
    state_dtype = _DTYPES[optim.state_dtype]
    betas = (optim.beta1, optim.beta2)
    if all(p.dtype == state_dtype for p in params):
        return torch.optim.AdamW(
            split_param_groups(params),  # fused AdamW rejects DTensors mixed with plain tensors
            lr=lr,
            betas=betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=device.type == "cuda",
        )
    return AdamW(
        params,
        lr=lr,
        betas=betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        state_dtype=state_dtype,
    )
