"""grouped_gemm against a per-expert loop of torch matmuls in float64."""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import grouped_gemm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference(x: torch.Tensor, w: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e].T; rows past offsets[E] are zero."""
    parts = [x[offsets[e] : offsets[e + 1]] @ w[e].t() for e in range(w.shape[0])]
    tail = x.new_zeros((x.shape[0] - offsets[-1], w.shape[1]))
    return torch.cat([*parts, tail], dim=0)


def make_offsets(counts: list[int]) -> list[int]:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return offsets


# (per-expert row counts, padding rows past offsets[E])
LAYOUTS = {
    "idle_expert": ([7, 0, 5, 11, 3], 0),
    "one_expert_gets_all": ([0, 0, 26, 0, 0], 0),
    "dropped_tail": ([4, 6, 0, 3, 2], 11),
    "no_rows_at_all": ([0, 0, 0, 0, 0], 6),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_grouped_gemm_forward_backward_float32(layout, transposed_weight):
    counts, padding = LAYOUTS[layout]
    offsets = make_offsets(counts)
    rows, n, k, experts = offsets[-1] + padding, 48, 72, len(counts)
    torch.manual_seed(len(layout))
    x = torch.randn(rows, k, requires_grad=True)
    if transposed_weight:
        # GPT-OSS stores [E, K, N]; the op takes the transposed view, strides and all.
        storage = torch.randn(experts, k, n, requires_grad=True)
        w = storage.transpose(1, 2)
        leaf = storage
    else:
        w = torch.randn(experts, n, k, requires_grad=True)
        leaf = w
    y = grouped_gemm(x, w, torch.tensor(offsets, dtype=torch.int32))
    ref_x = x.detach().double().requires_grad_(True)
    ref_leaf = leaf.detach().double().requires_grad_(True)
    ref_w = ref_leaf.transpose(1, 2) if transposed_weight else ref_leaf
    ref = reference(ref_x, ref_w, offsets)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    if padding:
        assert torch.count_nonzero(y[offsets[-1] :]) == 0
    if offsets[-1] > 0:
        assert rel(y, ref) < 1e-6
    upstream = torch.randn(rows, n, dtype=torch.float64)
    (y.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert leaf.grad.shape == leaf.shape
    if offsets[-1] > 0:
        assert rel(x.grad, ref_x.grad) < 1e-6
        assert rel(leaf.grad, ref_leaf.grad) < 1e-6
    else:
        assert torch.count_nonzero(x.grad) == 0
        assert torch.count_nonzero(leaf.grad) == 0
    # experts without rows get an exactly zero weight gradient
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(leaf.grad[e]) == 0


def test_grouped_gemm_bfloat16():
    counts = [7, 0, 5, 11, 3]
    offsets = make_offsets(counts)
    torch.manual_seed(5)
    x = torch.randn(offsets[-1], 72).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(5, 40, 72).to(torch.bfloat16).requires_grad_(True)
    y = grouped_gemm(x, w, torch.tensor(offsets, dtype=torch.int32))
    ref_x = x.detach().double().requires_grad_(True)
    ref_w = w.detach().double().requires_grad_(True)
    ref = reference(ref_x, ref_w, offsets)
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 1e-2
    upstream = torch.randn(offsets[-1], 40)
    (y.float() * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert rel(x.grad, ref_x.grad) < 1e-2
    assert rel(w.grad, ref_w.grad) < 1e-2


def test_grouped_gemm_only_weight_needs_grad():
    offsets = make_offsets([3, 4, 0])
    x = torch.randn(7, 16)
    w = torch.randn(3, 8, 16, requires_grad=True)
    grouped_gemm(x, w, torch.tensor(offsets, dtype=torch.int32)).sum().backward()
    ref_w = w.detach().clone().requires_grad_(True)
    reference(x, ref_w, offsets).sum().backward()
    assert rel(w.grad, ref_w.grad) < 1e-6


def test_grouped_gemm_rejects_bad_arguments():
    offsets = torch.tensor(make_offsets([3, 4]), dtype=torch.int32)
    with pytest.raises(ValueError, match="w"):
        grouped_gemm(torch.randn(7, 16), torch.randn(2, 8, 15), offsets)
    with pytest.raises(ValueError, match="expert_offsets"):
        grouped_gemm(torch.randn(7, 16), torch.randn(3, 8, 16), offsets)
    with pytest.raises(TypeError, match="dtype"):
        grouped_gemm(torch.randn(7, 16), torch.randn(2, 8, 16).to(torch.bfloat16), offsets)


def test_grouped_gemm_opcheck():
    offsets = torch.tensor(make_offsets([7, 0, 5]), dtype=torch.int32)
    x = torch.randn(14, 24, requires_grad=True)
    w = torch.randn(3, 10, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.turbomoe.grouped_gemm.default, (x, w, offsets))
    dy = torch.randn(14, 10)
    torch.library.opcheck(
        torch.ops.turbomoe.grouped_gemm_backward_input.default, (dy, w.detach(), offsets)
    )
    torch.library.opcheck(
        torch.ops.turbomoe.grouped_gemm_backward_weight.default,
        (dy, x.detach(), offsets, torch.float32),
    )


def test_zero_empty_experts_and_the_routed_grad_weight_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tm_zero_empty_experts zeroes only the slices of experts without rows and refuses a layout
    it cannot write; on the CPU TURBOMOE_DW_ZEROS_ASIDE changes nothing (the side stream is a
    CUDA matter), and the routed grad-weight with those zeros is the grad-weight."""
    from turbomoe import _native

    offsets = torch.tensor(make_offsets([2, 0, 3, 0]), dtype=torch.int32)
    dw = torch.rand(4, 3, 6) + 1
    before = dw.clone()
    _native.call("tm_zero_empty_experts", _native.describe(offsets), _native.describe(dw), None)
    assert torch.equal(dw[0], before[0]) and torch.equal(dw[2], before[2])
    assert not dw[1].any() and not dw[3].any()
    with pytest.raises(ValueError, match="out"):
        _native.call(
            "tm_zero_empty_experts",
            _native.describe(offsets),
            _native.describe(before.transpose(1, 2)),
            None,
        )
    x = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(4, 3, 6, requires_grad=True)
    g = torch.randn(5, 3)
    grads = {}
    for aside in ("0", "1"):
        monkeypatch.setenv("TURBOMOE_DW_ZEROS_ASIDE", aside)
        x.grad = w.grad = None
        grouped_gemm(x, w, offsets).backward(g)
        grads[aside] = (x.grad.clone(), w.grad.clone())
    assert torch.equal(grads["0"][0], grads["1"][0]) and torch.equal(grads["0"][1], grads["1"][1])
    routed = torch.full_like(w, float("nan"))
    _native.call(
        "tm_grouped_gemm_backward_weight_routed",
        _native.describe(g),
        _native.describe(x.detach()),
        _native.describe(offsets),
        _native.describe(routed),
        None,
        0,
        None,
    )
    _native.call("tm_zero_empty_experts", _native.describe(offsets), _native.describe(routed), None)
    assert torch.equal(routed, grads["0"][1])


def test_zeros_are_deferred_only_where_nothing_reads_the_gradient_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The empty experts' zeros may be written after the gradient is handed to autograd only
    for a leaf weight used once, with no .grad yet and no hooks, outside create_graph: anything
    else (accumulation, a hook, a second use, whose gradients autograd sums) reads it at once."""
    from turbomoe.ops import empty_experts

    monkeypatch.setenv("TURBOMOE_DW_ZEROS_ASIDE", "1")
    empty_experts._uses.clear()
    w = torch.randn(3, 4, 5, requires_grad=True)
    assert empty_experts.track_weight(w * 2) is None  # not a leaf: its backward reads dw
    assert empty_experts.track_weight(w) is w
    with torch.no_grad():  # inside a backward without create_graph
        assert empty_experts.can_defer(w)
        w.grad = torch.zeros_like(w)
        assert not empty_experts.can_defer(w)  # accumulation reads the new gradient
        w.grad = None
        handle = w.register_hook(lambda g: g)
        assert not empty_experts.can_defer(w)
        handle.remove()
        handle = w.register_post_accumulate_grad_hook(lambda p: None)
        assert not empty_experts.can_defer(w)
        handle.remove()
        assert empty_experts.can_defer(w)
        empty_experts.track_weight(w)  # a second use in the same forward
        assert not empty_experts.can_defer(w)
    assert not empty_experts.can_defer(None)
    empty_experts._uses.clear()
    empty_experts.track_weight(w)
    assert not empty_experts.can_defer(w)  # under create_graph (grad mode on)
    empty_experts._uses.clear()
