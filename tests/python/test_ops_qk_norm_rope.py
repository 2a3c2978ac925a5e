"""qk_norm_rope: the fused per-head RMSNorm + RoPE against Hugging Face's Qwen3 formulas (float64)
and, bitwise, against turbomoe's own rms_norm followed by apply_rope."""

from __future__ import annotations

import importlib

import pytest
import torch

from turbomoe.ops import apply_rope, qk_norm_rope, rms_norm
from turbomoe.ops.qk_norm_rope import fused_reason

# The module (turbomoe.ops re-exports its function under the same name).
qk_module = importlib.import_module("turbomoe.ops.qk_norm_rope")

EPS = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def hf_reference(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Qwen3MoeRMSNorm then apply_rotary_pos_emb (rotate_half) on x [B,S,NH,D], in x's dtype."""
    variance = x.pow(2).mean(-1, keepdim=True)
    normed = weight * (x * torch.rsqrt(variance + EPS))
    q = normed.transpose(1, 2)
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return (q * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).transpose(1, 2)


def composed(x, weight, cos, sin):
    return apply_rope(rms_norm(x, weight, EPS).transpose(1, 2), cos, sin).transpose(1, 2)


def inputs(b, s, nh, d, dtype, broadcast, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, nh, d, generator=gen) * 2).to(dtype).requires_grad_()
    w = (torch.rand(d, generator=gen) + 0.5).to(dtype).requires_grad_()
    cb = 1 if broadcast else b
    cos = torch.randn(cb, s, d, generator=gen).to(dtype)
    sin = torch.randn(cb, s, d, generator=gen).to(dtype)
    return x, w, cos, sin


CASES = [
    # (B, S, NH, D, dtype, cos/sin of batch 1)
    (2, 7, 3, 128, torch.float32, True),
    (1, 5, 4, 64, torch.float32, False),
    (2, 3, 2, 256, torch.bfloat16, False),
    (1, 9, 4, 128, torch.bfloat16, True),
]


@pytest.mark.parametrize(("b", "s", "nh", "d", "dtype", "broadcast"), CASES)
def test_matches_hf_in_float64(b, s, nh, d, dtype, broadcast):
    x, w, cos, sin = inputs(b, s, nh, d, torch.float32, broadcast, seed=d + s)
    assert fused_reason(x, w, cos, sin) is None
    out = qk_norm_rope(x, w, EPS, cos, sin)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = hf_reference(x64, w64, cos.double(), sin.double())
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad.double())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel(out, ref) < 1e-6
    assert rel(gx, rx) < 1e-5
    assert rel(gw, rw) < 1e-5


@pytest.mark.parametrize(("b", "s", "nh", "d", "dtype", "broadcast"), CASES)
def test_bitwise_the_two_ops_it_fuses(b, s, nh, d, dtype, broadcast):
    x, w, cos, sin = inputs(b, s, nh, d, dtype, broadcast, seed=3 * d + s)
    out = qk_norm_rope(x, w, EPS, cos, sin)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    ref = composed(x2, w2, cos, sin)
    rx, rw = torch.autograd.grad(ref, (x2, w2), grad)
    assert torch.equal(out, ref)
    assert torch.equal(gx, rx)
    assert torch.equal(gw, rw)


def test_fused_kernel_runs_for_the_head_dims_it_takes(monkeypatch):
    calls = []
    fused = qk_module._qk_norm_rope_eager
    monkeypatch.setattr(qk_module, "_qk_norm_rope_eager", lambda *a: calls.append(1) or fused(*a))
    x, w, cos, sin = inputs(1, 4, 2, 128, torch.float32, True)
    qk_norm_rope(x, w, EPS, cos, sin)
    assert calls == [1]
    # A head dim the kernel does not take composes the two ops, with the same values.
    x, w, cos, sin = inputs(1, 4, 2, 96, torch.float32, True)
    assert "head dim 96" in (fused_reason(x, w, cos, sin) or "")
    out = qk_norm_rope(x, w, EPS, cos, sin)
    assert calls == [1]
    assert torch.equal(out, composed(x, w, cos, sin))


def test_mixed_weight_dtype_composes():
    x, w, cos, sin = inputs(1, 3, 2, 64, torch.bfloat16, True)
    w32 = w.detach().float()
    assert "weight" in (fused_reason(x, w32, cos, sin) or "")


def test_without_weight_is_a_weight_of_ones():
    x, w, cos, sin = inputs(1, 3, 2, 64, torch.float32, True)
    ones = torch.ones_like(w)
    assert torch.equal(qk_norm_rope(x, None, EPS, cos, sin), qk_norm_rope(x, ones, EPS, cos, sin))


def test_rejects_mismatched_positions():
    x, w, cos, sin = inputs(1, 5, 2, 64, torch.float32, True)
    with pytest.raises(ValueError, match="sequence length"):
        qk_norm_rope(x, w, EPS, cos[:, :4], sin[:, :4])


def test_opcheck():
    x, w, cos, sin = inputs(1, 3, 2, 64, torch.float32, True)
    torch.library.opcheck(torch.ops.turbomoe.qk_norm_rope.default, (x, w, EPS, cos, sin))


def test_offset_views_compose_on_cuda_only_when_misaligned():
    """Alignment is read from the storage offset and strides (torch.compile's fake tensors have
    no data pointer): a view starting 4 elements in cannot take 8-element vector accesses."""
    x, w, cos, sin = inputs(1, 3, 2, 64, torch.float32, True)
    base = torch.randn(4 + x.numel()).view(-1)
    shifted = base[4:].view(x.shape)
    assert fused_reason(shifted, w, cos, sin) is None  # on the CPU any offset is fine
    assert qk_module._aligned(x) and not qk_module._aligned(shifted)
