"""permute_plan, gather_rows and combine against straight torch references."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import combine, gather_rows, permute_plan
from turbomoe.ops.permute import invert_sorted_pairs

TOKENS, HIDDEN, EXPERTS, TOP_K = 13, 72, 5, 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference_plan(ids: torch.Tensor, num_experts: int) -> tuple[list[int], list[int], list[int]]:
    """Stable counting sort of the pairs p = t*K + k by expert, written as plain loops."""
    flat = ids.reshape(-1).tolist()
    sorted_pairs = [p for e in range(num_experts) for p, i in enumerate(flat) if i == e]
    sorted_pairs += [-1] * (len(flat) - len(sorted_pairs))
    pair_to_row = [-1] * len(flat)
    for row, pair in enumerate(sorted_pairs):
        if pair >= 0:
            pair_to_row[pair] = row
    counts = [sum(1 for i in flat if i == e) for e in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return sorted_pairs, pair_to_row, offsets


def random_ids(tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Distinct experts per token (as a router gives), expert num_experts-1 never used."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randperm(num_experts - 1, generator=g)[:top_k] for _ in range(tokens)]
    )


def id_cases() -> dict[str, torch.Tensor]:
    ids = random_ids(TOKENS, TOP_K, EXPERTS, 0)
    one_expert = torch.full((TOKENS, TOP_K), 3)
    dropped = ids.clone()
    dropped[::3, 1] = EXPERTS  # Hugging Face's expert-parallel sentinel
    dropped[5, :] = EXPERTS
    return {
        "random_with_idle_expert": ids,
        "all_to_one_expert": one_expert,
        "sentinel_dropped": dropped,
        "all_dropped": torch.full((TOKENS, TOP_K), EXPERTS),
    }


CASES = id_cases()


def reference_gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out[r] = x[token of sorted pair r], zero rows for the dropped tail (differentiable)."""
    sorted_pairs, _, _ = reference_plan(ids, EXPERTS)
    top_k = ids.shape[1]
    token = torch.tensor([max(p, 0) // top_k for p in sorted_pairs], dtype=torch.int64)
    valid = torch.tensor([p >= 0 for p in sorted_pairs], dtype=x.dtype)
    return x[token] * valid[:, None]


def reference_combine(
    rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * rows[row of pair t*K+k] over kept pairs (differentiable)."""
    _, pair_to_row, _ = reference_plan(ids, EXPERTS)
    tokens, top_k = ids.shape
    row = torch.tensor([max(r, 0) for r in pair_to_row], dtype=torch.int64).view(tokens, top_k)
    valid = torch.tensor([r >= 0 for r in pair_to_row], dtype=rows.dtype).view(tokens, top_k)
    scale = valid if weights is None else valid * weights
    return (rows[row] * scale[..., None]).sum(dim=1)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_permute_plan_matches_stable_counting_sort(case, index_dtype):
    ids = CASES[case].to(index_dtype)
    sorted_pairs, pair_to_row, offsets = permute_plan(ids, EXPERTS)
    ref_sorted, ref_inverse, ref_offsets = reference_plan(ids, EXPERTS)
    assert sorted_pairs.dtype == pair_to_row.dtype == offsets.dtype == torch.int32
    assert sorted_pairs.tolist() == ref_sorted
    assert pair_to_row.tolist() == ref_inverse
    assert offsets.tolist() == ref_offsets
    assert torch.equal(invert_sorted_pairs(sorted_pairs), pair_to_row)


def test_permute_plan_zero_tokens():
    sorted_pairs, pair_to_row, offsets = permute_plan(torch.zeros(0, 2, dtype=torch.int64), 5)
    assert sorted_pairs.shape == (0,) and pair_to_row.shape == (0,)
    assert offsets.tolist() == [0] * 6


def test_permute_plan_rejects_out_of_range_ids():
    ids = torch.tensor([[0, 6]])
    with pytest.raises(ValueError, match="topk_ids"):
        permute_plan(ids, 5)
    with pytest.raises(ValueError, match="topk_ids"):
        permute_plan(torch.tensor([[0, -1]]), 5)
    with pytest.raises(TypeError, match="topk_ids"):
        permute_plan(torch.zeros(2, 2, dtype=torch.float32), 5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_forward_and_backward(case, dtype):
    ids = CASES[case]
    torch.manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN).to(dtype).requires_grad_(True)
    sorted_pairs, pair_to_row, offsets = permute_plan(ids, EXPERTS)
    out = gather_rows(x, sorted_pairs, offsets, TOP_K, pair_to_row=pair_to_row)
    ref_x = x.detach().double().requires_grad_(True)
    ref = reference_gather(ref_x, ids)
    assert out.shape == (TOKENS * TOP_K, HIDDEN) and out.dtype == dtype
    assert torch.equal(out.double(), ref.detach())  # a copy: exact
    upstream = torch.randn(TOKENS * TOP_K, HIDDEN)
    (out.double() * upstream.double()).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert x.grad.dtype == dtype
    if case == "all_dropped":
        assert torch.count_nonzero(x.grad) == 0
    else:
        assert rel(x.grad, ref_x.grad) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_gather_rows_without_pair_to_row_rebuilds_it():
    ids = CASES["sentinel_dropped"]
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    sorted_pairs, _, offsets = permute_plan(ids, EXPERTS)
    out = gather_rows(x, sorted_pairs, offsets, TOP_K)
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    reference_gather(ref_x, ids).sum().backward()
    assert rel(x.grad, ref_x.grad) < 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("with_offsets", [True, False])
def test_combine_forward_and_backward(case, with_weights, with_offsets):
    ids = CASES[case]
    torch.manual_seed(2)
    rows = torch.randn(TOKENS * TOP_K, HIDDEN, requires_grad=True)
    weights = torch.rand(TOKENS, TOP_K, requires_grad=True) if with_weights else None
    _, pair_to_row, offsets = permute_plan(ids, EXPERTS)
    out = combine(
        rows, pair_to_row, weights, TOP_K, expert_offsets=offsets if with_offsets else None
    )
    ref_rows = rows.detach().double().requires_grad_(True)
    ref_weights = None if weights is None else weights.detach().double().requires_grad_(True)
    ref = reference_combine(ref_rows, ids, ref_weights)
    assert out.shape == (TOKENS, HIDDEN) and out.dtype == torch.float32
    if case == "all_dropped":
        assert torch.count_nonzero(out) == 0
    else:
        assert rel(out, ref) < 1e-6
    upstream = torch.randn(TOKENS, HIDDEN, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    if case == "all_dropped":
        assert torch.count_nonzero(rows.grad) == 0
    else:
        assert rel(rows.grad, ref_rows.grad) < 1e-6
    # The rows of the dropped pairs, past the routed ones, get an exact zero gradient.
    assert torch.count_nonzero(rows.grad[int(offsets[-1]) :]) == 0
    if with_weights:
        if case == "all_dropped":
            assert torch.count_nonzero(weights.grad) == 0
        else:
            assert rel(weights.grad, ref_weights.grad) < 1e-6


def test_combine_bfloat16_rows_float32_weights():
    ids = CASES["random_with_idle_expert"]
    rows = torch.randn(TOKENS * TOP_K, HIDDEN).to(torch.bfloat16).requires_grad_(True)
    weights = torch.rand(TOKENS, TOP_K, requires_grad=True)
    _, pair_to_row, _ = permute_plan(ids, EXPERTS)
    out = combine(rows, pair_to_row, weights, TOP_K)
    ref_rows = rows.detach().double().requires_grad_(True)
    ref_weights = weights.detach().double().requires_grad_(True)
    ref = reference_combine(ref_rows, ids, ref_weights)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 1e-2
    out.float().sum().backward()
    ref.sum().backward()
    assert rows.grad.dtype == torch.bfloat16 and weights.grad.dtype == torch.float32
    assert rel(rows.grad, ref_rows.grad) < 1e-2
    assert rel(weights.grad, ref_weights.grad) < 1e-2


def test_gather_then_combine_zero_tokens():
    ids = torch.zeros(0, TOP_K, dtype=torch.int64)
    x = torch.randn(0, HIDDEN, requires_grad=True)
    weights = torch.rand(0, TOP_K, requires_grad=True)
    sorted_pairs, pair_to_row, offsets = permute_plan(ids, EXPERTS)
    rows = gather_rows(x, sorted_pairs, offsets, TOP_K, pair_to_row=pair_to_row)
    out = combine(rows * 2.0, pair_to_row, weights, TOP_K)
    assert rows.shape == (0, HIDDEN) and out.shape == (0, HIDDEN)
    out.sum().backward()
    assert x.grad.shape == (0, HIDDEN) and weights.grad.shape == (0, TOP_K)


def test_combine_rejects_bad_arguments():
    _, pair_to_row, _ = permute_plan(CASES["random_with_idle_expert"], EXPERTS)
    rows = torch.randn(TOKENS * TOP_K, HIDDEN)
    with pytest.raises(ValueError, match="weights"):
        combine(rows, pair_to_row, torch.rand(TOKENS - 1, TOP_K), TOP_K)
    with pytest.raises(TypeError, match="weights"):
        combine(rows, pair_to_row, torch.ones(TOKENS, TOP_K, dtype=torch.int32), TOP_K)
    with pytest.raises(ValueError, match="pair_to_row"):
        combine(rows[:-1], pair_to_row, None, TOP_K)  # a row index past the end


def test_combine_rejects_offsets_that_do_not_describe_its_rows():
    """The offsets promise that the pairs fill rows [0, offsets[-1]); the CPU backward checks."""
    ids = CASES["sentinel_dropped"]
    _, pair_to_row, offsets = permute_plan(ids, EXPERTS)
    rows = torch.randn(TOKENS * TOP_K, HIDDEN, requires_grad=True)
    routed = int(offsets[-1])
    assert routed < TOKENS * TOP_K  # some pairs dropped, so some rows are unmapped
    short = offsets.clone()
    short[-1] = routed - 1
    out = combine(rows, pair_to_row, None, TOP_K, expert_offsets=short)
    with pytest.raises(ValueError, match=f"row {routed - 1} is mapped"):
        out.sum().backward()
    long = offsets.clone()
    long[-1] = routed + 1
    out = combine(rows, pair_to_row, None, TOP_K, expert_offsets=long)
    with pytest.raises(ValueError, match=f"row {routed} is not mapped"):
        out.sum().backward()
    out = combine(rows, pair_to_row, None, TOP_K, expert_offsets=offsets.long())
    with pytest.raises(TypeError, match="expert_offsets"):
        out.sum().backward()


def test_gather_rows_rejects_bad_arguments():
    sorted_pairs, _, offsets = permute_plan(CASES["random_with_idle_expert"], EXPERTS)
    x = torch.randn(TOKENS, HIDDEN)
    with pytest.raises(TypeError, match="sorted_pairs"):
        gather_rows(x, sorted_pairs.long(), offsets, TOP_K)
    with pytest.raises(TypeError, match="expert_offsets"):
        gather_rows(x, sorted_pairs, offsets.long(), TOP_K)
    with pytest.raises(ValueError, match="top_k"):
        gather_rows(x, sorted_pairs, offsets, 0)
    with pytest.raises(ValueError, match="rows must be"):
        gather_rows(x, sorted_pairs, offsets, TOP_K, rows=sorted_pairs.shape[0] + 1)
    routed = int(offsets[-1])
    assert routed > 0
    with pytest.raises(ValueError, match="expert_offsets"):  # fewer rows than the routed pairs
        gather_rows(x, sorted_pairs, offsets, TOP_K, rows=routed - 1)


def test_permute_opcheck():
    ids = CASES["sentinel_dropped"]
    torch.library.opcheck(torch.ops.turbomoe.permute_plan.default, (ids, EXPERTS))
    sorted_pairs, pair_to_row, offsets = permute_plan(ids, EXPERTS)
    x = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    pairs = sorted_pairs.shape[0]
    torch.library.opcheck(
        torch.ops.turbomoe.gather_rows.default,
        (x, sorted_pairs, offsets, pair_to_row, TOP_K, pairs),
    )
    routed = int(offsets[-1])  # only the routed rows
    torch.library.opcheck(
        torch.ops.turbomoe.gather_rows.default,
        (x, sorted_pairs, offsets, pair_to_row, TOP_K, routed),
    )
    rows = torch.randn(TOKENS * TOP_K, HIDDEN, requires_grad=True)
    weights = torch.rand(TOKENS, TOP_K, requires_grad=True)
    for plan_offsets in (None, offsets):
        torch.library.opcheck(
            torch.ops.turbomoe.combine.default, (rows, pair_to_row, weights, TOP_K, plan_offsets)
        )
        torch.library.opcheck(
            torch.ops.turbomoe.combine.default, (rows, pair_to_row, None, TOP_K, plan_offsets)
        )
        grad_out = torch.randn(TOKENS, HIDDEN)
        torch.library.opcheck(
            torch.ops.turbomoe.combine_backward.default,
            (grad_out, rows.detach(), pair_to_row, weights.detach(), plan_offsets),
        )
        torch.library.opcheck(
            torch.ops.turbomoe.combine_backward_rows.default,
            (grad_out, pair_to_row, None, TOKENS * TOP_K, plan_offsets),
        )


def test_gather_rows_pairs_past_the_tokens_give_zero_rows_and_no_gradient():
    """The expert-parallel dispatch's padding: pairs naming tokens past x (here tokens 3 and 4 of
    a 3-token x) come out as zero rows; the backward needs pair_to_row for x's own pairs."""
    g = torch.Generator().manual_seed(11)
    top_k, hidden = 2, 6
    x = torch.randn(3, hidden, generator=g, requires_grad=True)
    order = torch.tensor([5, 8, 0, 6, 9, 1, 7, 2, 3, 4], dtype=torch.int32)
    offsets = torch.tensor([0, 10], dtype=torch.int32)
    inverse = invert_sorted_pairs(order)
    out = gather_rows(x, order, offsets, top_k, pair_to_row=inverse[: 3 * top_k])
    tokens = order.long() // top_k
    want = torch.where((tokens < 3)[:, None], x.detach()[tokens.clamp(max=2)], 0.0)
    assert torch.equal(out.detach(), want)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    want_grad = torch.zeros_like(x)
    for r, t in enumerate(tokens.tolist()):
        if t < 3:
            want_grad[t] += weights[r]
    assert torch.allclose(x.grad, want_grad)
    with pytest.raises(ValueError, match="pair_to_row has 10 entries"):
        gather_rows(x, order, offsets, top_k, pair_to_row=inverse)
