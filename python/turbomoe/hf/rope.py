"""Replacements for the module-level RoPE functions of each family's modeling file.

Every supported attention calls ``apply_rotary_pos_emb(q, k, cos, sin)`` (DeepSeek-V3 also
``apply_rotary_pos_emb_interleave`` when ``config.rope_interleave``) as a module global, looked
up at call time, so swapping the module attribute reroutes the attention without touching its
class. Stock builds ``rotate_half`` copies and four products per tensor; ``turbomoe.ops.apply_rope``
is one pass. Anything but the attention's own call shape (q/k [B,NH,S,D], cos/sin [B,S,D],
``unsqueeze_dim=1``) goes to the stock function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from turbomoe import ops
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.registry import KERNEL_DTYPES

RopeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _reason(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> str | None:
    if unsqueeze_dim != 1:
        return f"RoPE with unsqueeze_dim={unsqueeze_dim} (heads-last layout)"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return "RoPE on tensors that are not q/k [B, NH, S, D] with cos/sin [B, S, D]"
    if cos.shape != sin.shape or cos.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        return "RoPE whose cos/sin width differs from the head dim"
    for x in (q, k):
        if cos.shape[0] not in (1, x.shape[0]) or cos.shape[1] != x.shape[2]:
            return "RoPE whose cos/sin do not match the batch and sequence of q/k"
    if not all(t.dtype in KERNEL_DTYPES for t in (q, k, cos, sin)):
        return f"RoPE over {q.dtype}/{k.dtype} with cos/sin in {cos.dtype}"
    if q.device.type not in ("cpu", "cuda"):
        return f"RoPE on device {q.device.type}"
    return None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``ops.apply_rope`` in the dtype stock's ``x * cos + rotate_half(x) * sin`` returns.

    Under autocast q/k come out of the projections in bf16 while cos/sin follow the float32
    residual stream; torch promotes any mix of float32/bf16/fp16 to float32, so stock computes
    and returns float32 there. (Written without torch.promote_types, which torch.compile
    cannot trace.)
    """
    if not x.dtype == cos.dtype == sin.dtype:
        x, cos, sin = x.to(torch.float32), cos.to(torch.float32), sin.to(torch.float32)
    return ops.apply_rope(x, cos, sin, interleaved=interleaved)


def make_rope(original: RopeFn, interleaved: bool) -> RopeFn:
    """A drop-in for ``original`` (``apply_rotary_pos_emb`` or its interleaved variant)."""

    def rotate(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        reason = _reason(q, k, cos, sin, unsqueeze_dim)
        if reason is not None:
            warn_once(reason)
            return None
        return _rope(q, cos, sin, interleaved), _rope(k, cos, sin, interleaved)

    if interleaved:

        @functools.wraps(original)
        def apply_interleaved(
            q: torch.Tensor,
            k: torch.Tensor,
            cos: torch.Tensor,
            sin: torch.Tensor,
            position_ids: Any = None,
            unsqueeze_dim: int = 1,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            out = rotate(q, k, cos, sin, unsqueeze_dim)
            if out is None:
                return original(q, k, cos, sin, position_ids, unsqueeze_dim)
            return out

        return apply_interleaved

    @functools.wraps(original)
    def apply(
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = rotate(q, k, cos, sin, unsqueeze_dim)
        if out is None:
            return original(q, k, cos, sin, unsqueeze_dim)
        return out

    return apply
