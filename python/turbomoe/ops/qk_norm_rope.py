"""The per-head q/k RMSNorm of Qwen3's attention and the RoPE after it, as one op.

Stock runs ``q_norm`` (five element-wise kernels, or turbomoe's one RMSNorm pass), a transpose
view, then ``apply_rotary_pos_emb``; each of q and k is written and read back once in between,
forward and backward. ``qk_norm_rope`` reads the projection's output once and writes the rotated
result once, and its backward reads RoPE's gradient once: bitwise what ``rms_norm`` followed by
``apply_rope`` compute (the normalised values are rounded to x's dtype in between, as storing
them does).
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct
from turbomoe.ops.norm import backward_buffers, rms_norm
from turbomoe.ops.rope import apply_rope

HEAD_DIMS = (64, 128, 256)
_VECTOR = 8  # elements a CUDA thread moves at once


@torch.library.custom_op("turbomoe::qk_norm_rope", mutates_args=())
def _qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B,S,NH,D] in x's dtype, rstd [B*S*NH] float32) for x [B,S,NH,D] contiguous."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(
        (x.shape[0] * x.shape[1] * x.shape[2],), dtype=torch.float32, device=x.device
    )
    _native.call(
        "tm_qk_norm_rope_forward",
        _native.describe(x),
        _native.describe(weight),
        eps,
        _native.describe(cos),
        _native.describe(sin),
        _native.describe(y),
        _native.describe(rstd),
        _native.stream_for(x),
    )
    return y, rstd


@_qk_norm_rope.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.shape[0] * x.shape[1] * x.shape[2]
    return x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("turbomoe::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x [B,S,NH,D], grad_weight [D] float32, or an empty tensor when not wanted)."""
    grad_x, grad_weight, workspace = backward_buffers(
        x, rstd.shape[0], x.shape[3], need_weight_grad
    )
    _native.call(
        "tm_qk_norm_rope_backward",
        _native.describe(grad_y),
        _native.describe(x),
        _native.describe(weight),
        _native.describe(rstd),
        _native.describe(cos),
        _native.describe(sin),
        _native.describe(grad_x),
        _native.describe(grad_weight) if need_weight_grad else None,
        workspace.data_ptr(),
        workspace.numel(),
        _native.stream_for(x),
    )
    return grad_x, grad_weight


@_qk_norm_rope_backward.register_fake
def _(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dim = x.shape[3] if need_weight_grad else 0
    return x.new_empty(x.shape), x.new_empty((dim,), dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, weight, _eps, cos, sin = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd, cos, sin)
    ctx.need_weight_grad = weight is not None and ctx.needs_input_grad[1]
    ctx.mark_non_differentiable(rstd)


def _backward(ctx: Any, grad_y: torch.Tensor | None, _grad_rstd: Any) -> tuple[Any, ...]:
    if grad_y is None:
        return None, None, None, None, None
    x, weight, rstd, cos, sin = ctx.saved_tensors
    grad_x, grad_weight = _qk_norm_rope_backward_eager(
        grad_y.contiguous(), x, weight, rstd, cos, sin, ctx.need_weight_grad
    )
    weight_grad = grad_weight.to(weight.dtype) if ctx.need_weight_grad else None
    return grad_x, weight_grad, None, None, None


_qk_norm_rope_eager = differentiable(_qk_norm_rope, _setup_context, _backward)
_qk_norm_rope_backward_eager = direct(_qk_norm_rope_backward)


def _aligned(t: torch.Tensor) -> bool:
    """Rows reachable by 8-element vector accesses. Read from the offset and strides, which
    torch.compile's fake tensors have too (they have no data pointer); the storage's own base is
    the caching allocator's, aligned far beyond 16 bytes (the C API rejects any other)."""
    return t.storage_offset() % _VECTOR == 0 and all(s % _VECTOR == 0 for s in t.stride()[:-1])


def fused_reason(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
) -> str | None:
    """Why ``qk_norm_rope`` composes the two ops instead of running the fused kernel (None: it
    runs the fused one). The composition computes the same values."""
    if x.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return "q/k that are not [B, S, NH, D] with cos/sin [B, S, D]"
    if x.shape[3] not in HEAD_DIMS:
        return f"head dim {x.shape[3]} (the fused kernel takes {HEAD_DIMS})"
    if cos.shape != sin.shape or cos.shape[2] != x.shape[3] or cos.dtype != sin.dtype:
        return "cos/sin that do not cover the whole head in one dtype"
    if weight is not None and weight.dtype != x.dtype:
        return f"a {weight.dtype} weight over {x.dtype} activations"
    if x.is_cuda:
        tensors = [x, cos, sin] + ([] if weight is None else [weight])
        if cos.stride(-1) != 1 or sin.stride(-1) != 1 or not all(map(_aligned, tensors)):
            return "tensors not aligned to 8 elements"
    return None


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``apply_rope(rms_norm(x, weight, eps).transpose(1, 2), cos, sin)`` in one pass.

    x [B,S,NH,D] (the q or k projection viewed by head), weight [D] or None, cos/sin [B or 1,S,D]
    (rotate_half RoPE over the whole head). Returns y [B,S,NH,D] in x's dtype (``y.transpose(1,
    2)`` is the [B,NH,S,D] tensor the attention takes). Differentiable with respect to x and
    weight. Shapes or dtypes the fused kernel does not take (:func:`fused_reason`) run the two
    ops one after the other, with the same result.
    """
    if fused_reason(x, weight, cos, sin) is not None:
        normed = rms_norm(x, weight, eps)
        return apply_rope(normed.transpose(1, 2), cos, sin).transpose(1, 2)
    cos, sin = cos.detach(), sin.detach()
    x = x.contiguous()
    y, _rstd = _qk_norm_rope_eager(x, weight, float(eps), cos, sin)
    return y
