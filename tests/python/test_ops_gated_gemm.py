"""grouped_gemm_gated (the gate/up GEMM with its activation) against plain torch in float64:
both outputs, and the gradients of x and w through either of them."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import grouped_gemm_gated
from turbomoe.ops.activation import CLAMPED, SILU

LIMIT, ALPHA = 7.0, 1.702


def reference(
    x: torch.Tensor, w: torch.Tensor, offsets: list[int], variant: int
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [x[offsets[e] : offsets[e + 1]] @ w[e].t() for e in range(w.shape[0])]
    gate_up = torch.cat([*parts, x.new_zeros((x.shape[0] - offsets[-1], w.shape[1]))])
    gate, up = gate_up.chunk(2, dim=-1)
    if variant == SILU:
        return gate_up, torch.nn.functional.silu(gate) * up
    gate, up = gate.clamp(max=LIMIT), up.clamp(-LIMIT, LIMIT)
    return gate_up, (up + 1) * gate * torch.sigmoid(ALPHA * gate)


def offsets_of(counts: list[int]) -> list[int]:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return offsets


@pytest.mark.parametrize("variant", [SILU, CLAMPED])
@pytest.mark.parametrize(
    ("counts", "tail"), [([7, 0, 5, 11], 0), ([0, 0, 9, 0], 4), ([0, 0, 0, 0], 3)]
)
@pytest.mark.parametrize("use", ["act", "both"])
def test_matches_torch_with_gradients(variant: int, counts: list[int], tail: int, use: str) -> None:
    """Rows past offsets[E] come out zero in both outputs; gate_up's own gradient (where a
    caller uses it) adds to the activation's."""
    torch.manual_seed(sum(counts) + tail + variant)
    offsets = offsets_of(counts)
    x = torch.randn(offsets[-1] + tail, 24, dtype=torch.float64) * 2
    w = torch.randn(len(counts), 2 * 10, 24, dtype=torch.float64) * 0.5
    xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
    gate_up, act = grouped_gemm_gated(
        xs, ws, torch.tensor(offsets, dtype=torch.int32), variant, ALPHA, LIMIT
    )
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref_gate_up, ref_act = reference(xr, wr, offsets, variant)
    torch.testing.assert_close(gate_up.double(), ref_gate_up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act.double(), ref_act, rtol=1e-5, atol=1e-5)
    assert float(act.detach()[offsets[-1] :].abs().sum()) == 0.0

    g_act = torch.randn(act.shape, dtype=torch.float64)
    outs, ref_outs, upstream = [act], [ref_act], [g_act]
    if use == "both":
        outs.append(gate_up)
        ref_outs.append(ref_gate_up)
        upstream.append(torch.randn(gate_up.shape, dtype=torch.float64))
    grads = torch.autograd.grad(outs, [xs, ws], [u.float() for u in upstream])
    ref_grads = torch.autograd.grad(ref_outs, [xr, wr], upstream)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_equals_the_gemm_then_the_activation() -> None:
    """In bf16 the op is the grouped GEMM followed by the activation of its rounded halves."""
    from turbomoe.ops import gated, grouped_gemm

    torch.manual_seed(3)
    offsets = torch.tensor(offsets_of([5, 0, 8]), dtype=torch.int32)
    x = torch.randn(15, 32).to(torch.bfloat16)
    w = (torch.randn(3, 2 * 64, 32) * 0.3).to(torch.bfloat16)
    gate_up, act = grouped_gemm_gated(x, w, offsets, SILU)
    ref_gate_up = grouped_gemm(x, w, offsets)
    assert torch.equal(gate_up, ref_gate_up)
    assert torch.equal(act, gated(ref_gate_up))


def test_opcheck() -> None:
    offsets = torch.tensor(offsets_of([4, 0, 6]), dtype=torch.int32)
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(3, 12, 16, requires_grad=True)
    torch.library.opcheck(
        torch.ops.turbomoe.grouped_gemm_gated.default, (x, w, offsets, SILU, 1.0, 1.0)
    )


def test_rejects_bad_arguments() -> None:
    offsets = torch.tensor(offsets_of([3, 4]), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w \[E, 2I, K\]"):
        grouped_gemm_gated(torch.randn(7, 16), torch.randn(2, 9, 16), offsets, SILU)
    with pytest.raises(ValueError, match="w"):
        grouped_gemm_gated(torch.randn(7, 16), torch.randn(2, 8, 15), offsets, SILU)
    with pytest.raises(ValueError, match="variant"):
        grouped_gemm_gated(torch.randn(7, 16), torch.randn(2, 8, 16), offsets, 9)
