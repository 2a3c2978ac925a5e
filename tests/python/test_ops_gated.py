"""The fused gate/up activation op against plain torch, gradients included."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import gated


def _reference(gate_up: torch.Tensor, activation: str, interleaved: bool) -> torch.Tensor:
    if interleaved:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    gate = gate.clamp(max=7.0)
    up = up.clamp(-7.0, 7.0)
    return (up + 1) * gate * torch.sigmoid(1.702 * gate)


@pytest.mark.parametrize("activation", ["silu", "clamped"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 13])
def test_matches_torch_with_gradient(activation: str, interleaved: bool, rows: int) -> None:
    torch.manual_seed(rows * 4 + interleaved * 2 + (activation == "silu"))
    gate_up = (torch.randn(rows, 2 * 36, dtype=torch.float64) * 5).float().requires_grad_()
    ours = gated(gate_up, activation, interleaved=interleaved)
    ref_in = gate_up.detach().double().requires_grad_()
    ref = _reference(ref_in, activation, interleaved)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, gate_up, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad_out.double())
    torch.testing.assert_close(ours_grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


def test_opcheck() -> None:
    gate_up = torch.randn(7, 10, requires_grad=True)
    torch.library.opcheck(
        torch.ops.turbomoe.gated_activation.default, (gate_up, 1, 1.0, 1.0, False)
    )


def test_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="gate_up must be"):
        gated(torch.randn(3, 7))
