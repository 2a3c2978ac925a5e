"""grouped_gemm_gathered (the gather folded into the first expert GEMM) against the unfused pair,
gather_rows then grouped_gemm: forward and both gradients equal to the bit on the CPU, where the
same rows go through the same loops."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import gather_rows, grouped_gemm, permute_plan
from turbomoe.ops.gathered_gemm import grouped_gemm_gathered


def routing(tokens: int, top_k: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token; expert 2's pairs are dropped (the sentinel id E)."""
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[ids == 2] = experts
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routed_rows", [False, True])
def test_gathered_gemm_equals_gather_then_grouped_gemm(dtype: torch.dtype, routed_rows: bool):
    gen = torch.Generator().manual_seed(5)
    tokens, top_k, experts, k, n = 11, 3, 5, 16, 24
    sorted_pairs, pair_to_row, offsets = permute_plan(routing(tokens, top_k, experts, gen), experts)
    rows = int(offsets[-1]) if routed_rows else sorted_pairs.shape[0]
    src = torch.randn(tokens, k, generator=gen).to(dtype)
    w = (torch.randn(experts, n, k, generator=gen) * 0.3).to(dtype)
    grad_y = torch.randn(rows, n, generator=gen).to(dtype)

    src_a, w_a = src.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_gemm_gathered(src_a, sorted_pairs, pair_to_row, w_a, offsets, top_k, rows)
    y.backward(grad_y)

    src_b, w_b = src.clone().requires_grad_(), w.clone().requires_grad_()
    x = gather_rows(src_b, sorted_pairs, offsets, top_k, pair_to_row=pair_to_row, rows=rows)
    expected = grouped_gemm(x, w_b, offsets)
    expected.backward(grad_y)

    assert y.shape == (rows, n)
    assert torch.equal(y, expected)
    assert torch.equal(src_a.grad, src_b.grad)
    assert torch.equal(w_a.grad, w_b.grad)
    # Not vacuous: routed rows and both gradients carry values; expert 2 got no rows.
    assert float(y.detach()[: int(offsets[-1])].abs().max()) > 0
    assert float(w_a.grad.abs().max()) > 0 and float(src_a.grad.abs().max()) > 0
    assert float(w_a.grad[2].abs().max()) == 0


def test_gathered_gemm_only_weight_needs_grad():
    gen = torch.Generator().manual_seed(6)
    sorted_pairs, pair_to_row, offsets = permute_plan(routing(6, 2, 4, gen), 4)
    src = torch.randn(6, 8, generator=gen)
    w = torch.randn(4, 5, 8, generator=gen, requires_grad=True)
    y = grouped_gemm_gathered(src, sorted_pairs, pair_to_row, w, offsets, 2, sorted_pairs.shape[0])
    y.sum().backward()
    x = gather_rows(src, sorted_pairs, offsets, 2, pair_to_row=pair_to_row)
    w_ref = w.detach().clone().requires_grad_()
    grouped_gemm(x, w_ref, offsets).sum().backward()
    assert torch.equal(w.grad, w_ref.grad)


def test_gathered_gemm_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(7)
    sorted_pairs, pair_to_row, offsets = permute_plan(routing(6, 2, 4, gen), 4)
    src, w = torch.randn(6, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match="top_k"):
        grouped_gemm_gathered(src, sorted_pairs, pair_to_row, w, offsets, 0, 12)
    with pytest.raises(ValueError, match="pair_to_row"):
        grouped_gemm_gathered(src, sorted_pairs, pair_to_row[:-1], w, offsets, 2, 12)
    with pytest.raises(ValueError, match="sorted_pairs has 5 entries"):
        grouped_gemm_gathered(src, sorted_pairs[:5], pair_to_row, w, offsets, 2, 12)


def test_gathered_gemm_opcheck():
    gen = torch.Generator().manual_seed(8)
    sorted_pairs, pair_to_row, offsets = permute_plan(routing(5, 2, 4, gen), 4)
    src = torch.randn(5, 8, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, 8, generator=gen, requires_grad=True)
    torch.library.opcheck(
        torch.ops.turbomoe.grouped_gemm_gathered.default,
        (src, sorted_pairs, pair_to_row, w, offsets, 2, sorted_pairs.shape[0]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_down_projection_passes_equal_gather_then_pass(dtype: torch.dtype):
    """The lean experts' down-projection backward with a per-token gradient: grad-input and
    grad-weight reading dy's rows from the token rows equal gather_rows then the plain pass."""
    from turbomoe.ops.gathered_gemm import (
        _backward_input_gathered,
        _backward_weight_gathered,
    )
    from turbomoe.ops.grouped_gemm import (
        _grouped_gemm_backward_input,
        _grouped_gemm_backward_weight,
    )

    gen = torch.Generator().manual_seed(9)
    tokens, top_k, experts, h, i = 9, 3, 5, 16, 8
    sorted_pairs, _, offsets = permute_plan(routing(tokens, top_k, experts, gen), experts)
    rows = int(offsets[-1]) + 2  # two rows past the routed ones: zero rows of dx
    grad_tokens = torch.randn(tokens, h, generator=gen).to(dtype)
    w_down = (torch.randn(experts, h, i, generator=gen) * 0.3).to(dtype)
    act = torch.randn(rows, i, generator=gen).to(dtype)
    gathered = gather_rows(grad_tokens, sorted_pairs, offsets, top_k, rows=rows)

    dx = _backward_input_gathered(grad_tokens, sorted_pairs, w_down, offsets, top_k, rows)
    assert torch.equal(dx, _grouped_gemm_backward_input(gathered, w_down, offsets))
    dw = _backward_weight_gathered(grad_tokens, act, sorted_pairs, offsets, top_k, dtype, True)
    assert torch.equal(dw, _grouped_gemm_backward_weight(gathered, act, offsets, dtype))
    # Not vacuous: routed rows carry products, the rows past them are zero, expert 2 got none.
    routed = int(offsets[-1])
    assert float(dx[:routed].abs().max()) > 0 and float(dx[routed:].abs().max()) == 0
    assert float(dw.abs().max()) > 0 and float(dw[2].abs().max()) == 0


def test_gathered_down_projection_passes_opcheck():
    gen = torch.Generator().manual_seed(10)
    sorted_pairs, _, offsets = permute_plan(routing(5, 2, 4, gen), 4)
    grad_tokens, w_down = torch.randn(5, 8, generator=gen), torch.randn(4, 8, 6, generator=gen)
    rows = sorted_pairs.shape[0]
    act = torch.randn(rows, 6, generator=gen)
    torch.library.opcheck(
        torch.ops.turbomoe.grouped_gemm_backward_input_gathered.default,
        (grad_tokens, sorted_pairs, w_down, offsets, 2, rows),
    )
    torch.library.opcheck(
        torch.ops.turbomoe.grouped_gemm_backward_weight_gathered.default,
        (grad_tokens, act, sorted_pairs, offsets, 2, torch.float32, True),
    )
