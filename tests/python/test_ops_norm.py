"""rms_norm against Hugging Face's RMSNorm formula in float64, and HF's module itself."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import rms_norm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


@pytest.mark.parametrize("shape", [(13, 72), (2, 3, 7, 72), (1, 5)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_float32_forward_backward(shape, with_weight):
    torch.manual_seed(len(shape))
    x = (torch.randn(shape) * 3 + 0.5).requires_grad_(True)
    weight = (torch.rand(shape[-1]) + 0.5).requires_grad_(True) if with_weight else None
    y = rms_norm(x, weight, 1e-6)
    ref_x = x.detach().double().requires_grad_(True)
    ref_weight = None if weight is None else weight.detach().double().requires_grad_(True)
    ref = reference(ref_x, ref_weight, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel(y, ref) < 1e-6
    upstream = torch.randn(shape, dtype=torch.float64)
    (y.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert rel(x.grad, ref_x.grad) < 1e-5
    if with_weight:
        assert weight.grad.dtype == torch.float32
        assert rel(weight.grad, ref_weight.grad) < 1e-5


def test_rms_norm_bfloat16_weight_grad_in_weight_dtype():
    torch.manual_seed(1)
    x = torch.randn(13, 72).bfloat16().requires_grad_(True)
    weight = (torch.rand(72) + 0.5).bfloat16().requires_grad_(True)
    y = rms_norm(x, weight, 1e-5)
    ref_x = x.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    ref = reference(ref_x, ref_weight, 1e-5)
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 1e-2
    upstream = torch.randn(13, 72)
    (y.float() * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert rel(x.grad, ref_x.grad) < 1e-2
    assert rel(weight.grad, ref_weight.grad) < 1e-2


def test_rms_norm_matches_hf_qwen3_moe_rmsnorm(stock_transformers):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    torch.manual_seed(2)
    norm = Qwen3MoeRMSNorm(72, eps=1e-6)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(2, 13, 72, requires_grad=True)
    ref = norm(x)
    x2 = x.detach().clone().requires_grad_(True)
    weight = norm.weight.detach().clone().requires_grad_(True)
    y = rms_norm(x2, weight, norm.variance_epsilon)
    assert rel(y, ref) < 1e-6
    ref.square().sum().backward()
    y.square().sum().backward()
    assert rel(x2.grad, x.grad) < 1e-5
    assert rel(weight.grad, norm.weight.grad) < 1e-5


def test_rms_norm_non_contiguous_input():
    base = torch.randn(72, 13, requires_grad=True)
    x = base.t()  # last dim strided
    weight = torch.rand(72) + 0.5
    y = rms_norm(x, weight, 1e-6)
    assert rel(y, reference(x.detach(), weight, 1e-6)) < 1e-6
    y.sum().backward()
    ref_base = base.detach().double().requires_grad_(True)
    reference(ref_base.t(), weight, 1e-6).sum().backward()
    assert rel(base.grad, ref_base.grad) < 1e-5


def test_rms_norm_zero_rows():
    x = torch.randn(0, 72, requires_grad=True)
    weight = torch.ones(72, requires_grad=True)
    y = rms_norm(x, weight, 1e-6)
    assert y.shape == (0, 72)
    y.sum().backward()
    assert x.grad.shape == (0, 72)
    assert torch.count_nonzero(weight.grad) == 0


def test_rms_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(4, 72), torch.ones(71), 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        rms_norm(torch.randn(4, 72).to(torch.int32), None, 1e-6)


def test_rms_norm_opcheck():
    x = torch.randn(13, 72, requires_grad=True)
    weight = torch.rand(72, requires_grad=True)
    torch.library.opcheck(torch.ops.turbomoe.rms_norm.default, (x, weight, 1e-6))
    torch.library.opcheck(torch.ops.turbomoe.rms_norm.default, (x, None, 1e-6))
    _y, rstd = torch.ops.turbomoe.rms_norm(x.detach(), weight.detach(), 1e-6)
    grad_y = torch.randn(13, 72)
    torch.library.opcheck(
        torch.ops.turbomoe.rms_norm_backward.default,
        (grad_y, x.detach(), weight.detach(), rstd, True),
    )
    torch.library.opcheck(
        torch.ops.turbomoe.rms_norm_backward.default, (grad_y, x.detach(), None, rstd, False)
    )
