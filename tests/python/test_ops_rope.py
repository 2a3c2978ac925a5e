"""apply_rope against Hugging Face's rotary helpers (Qwen3 rotate_half, DeepSeek-V3 interleave)."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import apply_rope

# Hugging Face's rotary helpers are the reference: compare against them unpatched.
pytestmark = pytest.mark.usefixtures("stock_transformers")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """HF's formulas on the first R dims of each head (partial rotary passes the rest through)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb_interleave,
    )
    from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

    rotary = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    if interleaved:
        out, _ = apply_rotary_pos_emb_interleave(x_rot, x_rot, cos, sin)
    else:
        out, _ = apply_rotary_pos_emb(x_rot, x_rot, cos, sin)
    return torch.cat([out, x_pass], dim=-1)


def tables(batch: int, seq: int, rotary: int, generic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B,S,R]: HF's cat(freqs, freqs) layout, or arbitrary values (rotate_half form).

    Arbitrary tables check that each of the R positions reads its own cos/sin entry; the
    interleaved form is only defined on HF's duplicated layout.
    """
    if generic:
        return torch.randn(batch, seq, rotary), torch.randn(batch, seq, rotary)
    positions = torch.arange(seq, dtype=torch.float32)[None, :, None] + torch.randint(
        0, 50, (batch, 1, 1)
    )
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    freqs = positions * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


CASES = [
    # (B, NH, S, D, R, interleaved, generic tables, transposed x)
    (2, 3, 7, 16, 16, False, True, False),
    (2, 3, 7, 16, 16, False, False, True),
    (1, 4, 5, 24, 8, False, True, True),
    (2, 3, 7, 16, 16, True, False, False),
    (2, 2, 9, 24, 8, True, False, True),
]


@pytest.mark.parametrize(("b", "nh", "s", "d", "r", "interleaved", "generic", "transposed"), CASES)
def test_rope_matches_hf(b, nh, s, d, r, interleaved, generic, transposed):
    torch.manual_seed(b * 100 + d + r)
    if transposed:
        # attention hands over q as [B,S,NH,D].transpose(1, 2): strided, not contiguous
        base = torch.randn(b, s, nh, d, requires_grad=True)
        x = base.transpose(1, 2)
    else:
        base = torch.randn(b, nh, s, d, requires_grad=True)
        x = base
    cos, sin = tables(b, s, r, generic)
    out = apply_rope(x, cos, sin, interleaved)
    ref_base = base.detach().double().requires_grad_(True)
    ref_x = ref_base.transpose(1, 2) if transposed else ref_base
    ref = reference(ref_x, cos.double(), sin.double(), interleaved)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel(out, ref) < 1e-6
    upstream = torch.randn(x.shape, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert rel(base.grad, ref_base.grad) < 1e-6


def test_rope_broadcasts_batch_one_tables():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 16)
    cos, sin = tables(1, 5, 16, False)
    out = apply_rope(x, cos, sin)
    ref = reference(x, cos.expand(3, -1, -1), sin.expand(3, -1, -1), False)
    assert rel(out, ref) < 1e-6


def test_rope_bfloat16():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 9, 32).bfloat16().requires_grad_(True)
    cos, sin = tables(2, 9, 32, False)
    out = apply_rope(x, cos.bfloat16(), sin.bfloat16())
    ref_x = x.detach().double().requires_grad_(True)
    ref = reference(ref_x, cos.bfloat16().double(), sin.bfloat16().double(), False)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 1e-2
    upstream = torch.randn(x.shape)
    (out.float() * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert rel(x.grad, ref_x.grad) < 1e-2


def test_rope_zero_tokens():
    x = torch.randn(2, 3, 0, 16, requires_grad=True)
    cos, sin = torch.randn(2, 0, 16), torch.randn(2, 0, 16)
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_rope_rejects_bad_arguments():
    x = torch.randn(2, 3, 7, 16)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(x, torch.randn(2, 6, 16), torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="cos"):
        apply_rope(x, torch.randn(2, 7, 18), torch.randn(2, 7, 18))
    with pytest.raises(ValueError, match="x"):
        apply_rope(torch.randn(3, 7, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16))


def test_rope_opcheck():
    x = torch.randn(2, 3, 7, 16, requires_grad=True)
    cos, sin = tables(2, 7, 16, False)
    torch.library.opcheck(torch.ops.turbomoe.rope.default, (x, cos, sin, False))
    torch.library.opcheck(torch.ops.turbomoe.rope.default, (x, cos, sin, True))
    torch.library.opcheck(
        torch.ops.turbomoe.rope_backward.default, (torch.randn(2, 3, 7, 16), cos, sin, False)
    )


def test_rope_keeps_the_layout_of_its_input():
    """q/k arrive as [B, S, NH, D] buffers seen transposed; the rotation (and its gradient) keep
    that layout, as stock's elementwise formula does, so that attention's output, allocated in
    q's layout, needs no copy before o_proj."""
    b, s, nh, d = 2, 7, 3, 16
    buf = torch.randn(b, s, nh, d, requires_grad=True)
    x = buf.transpose(1, 2)
    cos, sin = tables(b, s, d, False)
    out = apply_rope(x, cos, sin)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, reference(x, cos, sin, False), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out, buf, torch.randn_like(out))
    assert grad.is_contiguous(), "the gradient of the [B, S, NH, D] buffer needs no copy"
    contiguous = apply_rope(torch.randn(b, nh, s, d), cos, sin)
    assert contiguous.is_contiguous()
