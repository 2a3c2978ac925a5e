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


def _composed_weighted_backward(
    grad_rows: torch.Tensor,
    gate_up: torch.Tensor,
    row_weights: torch.Tensor,
    activation: str,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the lean experts' backward ran before the fused op, from torch ops and ours."""
    act = gated(gate_up, activation, interleaved=interleaved)
    grad_row_weights = (grad_rows.float() * act.float()).sum(dim=1)
    weighted_act = act * row_weights.unsqueeze(1).to(act.dtype)
    grad_act = (row_weights.float().unsqueeze(1) * grad_rows.float()).to(grad_rows.dtype)
    variant = 1 if activation == "silu" else 2
    grad_gate_up = torch.ops.turbomoe.gated_activation_backward(
        grad_act, gate_up, variant, 1.702, 7.0, interleaved
    )
    return grad_gate_up, weighted_act, grad_row_weights


@pytest.mark.parametrize("activation", ["silu", "clamped"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_weighted_backward_equals_the_composed_ops(
    activation: str, interleaved: bool, dtype: torch.dtype, weights_dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(int(interleaved) + 2 * (dtype == torch.bfloat16))
    rows, inter = 23, 40
    grad_rows = torch.randn(rows, inter, generator=g).to(dtype)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    row_weights = torch.rand(rows, generator=g).to(weights_dtype)
    row_weights[:3] = 0  # rows past the routed ones
    variant = 1 if activation == "silu" else 2
    got = torch.ops.turbomoe.gated_activation_weighted_backward(
        grad_rows, gate_up, row_weights, variant, 1.702, 7.0, interleaved, True
    )
    want = _composed_weighted_backward(grad_rows, gate_up, row_weights, activation, interleaved)
    # Same roundings in the same places: the element-wise outputs are equal; the row sums differ
    # only in summation order.
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


def test_weighted_backward_without_the_weighted_activation() -> None:
    grad_rows, gate_up, row_weights = torch.randn(5, 8), torch.randn(5, 16), torch.rand(5)
    op = torch.ops.turbomoe.gated_activation_weighted_backward
    full = op(grad_rows, gate_up, row_weights, 1, 1.0, 1.0, False, True)
    lean = op(grad_rows, gate_up, row_weights, 1, 1.0, 1.0, False, False)
    assert lean[1].shape == (0, 8)
    torch.testing.assert_close(lean[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(lean[2], full[2], rtol=0, atol=0)


def test_weighted_backward_opcheck() -> None:
    args = (torch.randn(6, 5), torch.randn(6, 10), torch.rand(6), 2, 1.702, 7.0, True, True)
    torch.library.opcheck(torch.ops.turbomoe.gated_activation_weighted_backward.default, args)


def test_weighted_backward_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match=r"row_weights has shape \[4\]"):
        torch.ops.turbomoe.gated_activation_weighted_backward(
            torch.randn(6, 5), torch.randn(6, 10), torch.rand(4), 1, 1.0, 1.0, False, True
        )
