"""Rotary position embedding as a torch custom op.

HF's ``x * cos + rotate_half(x) * sin`` materialises rotate_half and three temporaries; here one
kernel reads x once (in whatever strides attention's transpose left it) and writes the result.
The rotation is linear in x, so the backward is the transposed rotation of the gradient and needs
nothing saved but cos and sin.

Outputs keep their input's memory layout (``empty_like``), as stock's elementwise version does:
q and k come out of the projections as [B, S, NH, D] buffers seen transposed, and cuDNN's SDPA
allocates its output (and wants its output gradient) in q's layout. A [B, NH, S, D]-contiguous q
would make attention's output [B, NH, S, D] too, so that ``transpose(1, 2).contiguous()`` before
o_proj copies it, its gradient is copied back for the backward, and the rotated gradient needs a
third copy before the q/k norms' backward.
"""

from __future__ import annotations

from typing import Any

import torch

from turbomoe import _native
from turbomoe.ops._eager import differentiable, direct


def _params(interleaved: bool) -> Any:
    return _native.make_params(_native.RopeParams, interleaved=1 if interleaved else 0)


@torch.library.custom_op("turbomoe::rope", mutates_args=())
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    _native.call(
        "tm_rope_forward",
        _params(interleaved),
        _native.describe(x),
        _native.describe(cos),
        _native.describe(sin),
        _native.describe(out),
        _native.stream_for(x),
    )
    return out


@_rope.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("turbomoe::rope_backward", mutates_args=())
def _rope_backward(
    grad_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    grad_x = torch.empty_like(grad_out)
    _native.call(
        "tm_rope_backward",
        _params(interleaved),
        _native.describe(grad_out),
        _native.describe(cos),
        _native.describe(sin),
        _native.describe(grad_x),
        _native.stream_for(grad_out),
    )
    return grad_x


@_rope_backward.register_fake
def _(
    grad_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    return torch.empty_like(grad_out)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _x, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    cos, sin = ctx.saved_tensors
    return _rope_backward_eager(grad_out, cos, sin, ctx.interleaved), None, None, None


_rope_eager = differentiable(_rope, _setup_context, _backward)
_rope_backward_eager = direct(_rope_backward)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first R dims of every head of x [B,NH,S,D] by cos/sin [B,S,R] (R ≤ D, even).

    interleaved=False is HF's rotate_half form (Llama, Qwen); True reads the rotated dims as
    pairs (2j, 2j+1) and writes them de-interleaved like HF's DeepSeek-V3
    ``apply_rotary_pos_emb_interleave``. cos/sin may have batch 1 (HF builds them from position
    ids of batch 1); the kernel broadcasts them without a copy. Differentiable with respect to x
    only: cos and sin come from a non-trainable buffer.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, NH, S, D], got shape {tuple(x.shape)}")
    if cos.dim() != 3 or sin.dim() != 3:
        raise ValueError(
            f"cos and sin must be [B, S, R], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    return _rope_eager(x, cos.detach(), sin.detach(), bool(interleaved))
