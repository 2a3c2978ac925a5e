"""One AdamW step over a parameter, its gradient and both moments, in place, in one pass.

The element-wise formula of ``turbomoe.train.optim.AdamW`` (torch's AdamW with moments in any of
float32 / bfloat16), computed in float32 from the stored values and rounded once into each
tensor's dtype. Written as tensor ops it reads and writes every element some fifteen times and
allocates float32 copies of the parameter, its gradient and the update; the kernel moves 22
bytes an element (bf16 parameter and gradient, float32 moments) and allocates nothing. Not an
autograd op: optimizers run under ``torch.no_grad``.
"""

from __future__ import annotations

import torch

from turbomoe import _native

_DTYPES = (torch.float32, torch.bfloat16)


def adamw_step_reason(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
) -> str | None:
    """Why :func:`adamw_step_` cannot take these tensors (None when it can)."""
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return "a tensor subclass"
    if param.device.type not in ("cpu", "cuda"):
        return f"device {param.device.type}"
    if any(t.device != param.device for t in tensors):
        return "tensors on different devices"
    if param.dtype not in _DTYPES or grad.dtype not in _DTYPES or exp_avg.dtype not in _DTYPES:
        return f"dtypes {param.dtype} / {grad.dtype} / {exp_avg.dtype}"
    if exp_avg_sq.dtype != exp_avg.dtype:
        return "moments of different dtypes"
    if any(t.shape != param.shape for t in tensors):
        return "tensors of different shapes"
    if not all(t.is_contiguous() for t in tensors):
        return "a non-contiguous tensor"
    return None


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor | None = None,
    checked: bool = False,
) -> None:
    """AdamW step number ``step`` (from 1) on ``param``, ``exp_avg``, ``exp_avg_sq`` in place.

    ``grad_scale``: a float32 tensor of one element on the parameter's device multiplied into
    the gradient as it is read (a clipping factor computed on the device: no host sync, no pass
    that rescales the gradients). ``checked``: the caller has had these tensors accepted by
    :func:`adamw_step_reason` already (the optimizer asks once per parameter and step); the
    library validates everything either way."""
    if not checked:
        reason = adamw_step_reason(param, grad, exp_avg, exp_avg_sq)
        if reason is not None:
            raise ValueError(f"adamw_step_: {reason}")
    params = _native.make_params(
        _native.AdamwParams,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
    )
    _native.call(
        "tm_adamw_step",
        params,
        _native.describe(param),
        _native.describe(grad),
        _native.describe(exp_avg),
        _native.describe(exp_avg_sq),
        _native.describe(grad_scale),
        _native.stream_for(param),
    )
