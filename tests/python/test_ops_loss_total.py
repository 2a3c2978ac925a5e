"""linear_cross_entropy_total (gradients formed in the forward) against float64 torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbomoe.ops import linear_cross_entropy, linear_cross_entropy_total

ROWS, HIDDEN, VOCAB = 13, 40, 97


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(seed: int, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN).to(dtype).requires_grad_(True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (ROWS,))
    labels[::3] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels):  # type: ignore[no-untyped-def]
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    total = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    return h, w, total


@pytest.mark.parametrize("chunk_rows", [4, 4096])
@pytest.mark.parametrize("scale", [1.0, 0.125, -3.0])
def test_total_and_gradients_float32(chunk_rows, scale):
    hidden, weight, labels = inputs(0)
    total = linear_cross_entropy_total(hidden, weight, labels, chunk_rows=chunk_rows)
    assert total.shape == () and total.dtype == torch.float32
    (total * scale).backward()
    h, w, ref = reference(hidden, weight, labels)
    (ref * scale).backward()
    assert rel(total, ref) < 1e-6
    assert rel(hidden.grad, h.grad) < 1e-5
    assert rel(weight.grad, w.grad) < 1e-5
    # Ignored rows get no gradient.
    assert torch.count_nonzero(hidden.grad[labels == -100]) == 0


def test_equals_sum_of_per_row_op_bfloat16():
    hidden, weight, labels = inputs(1, torch.bfloat16)
    total = linear_cross_entropy_total(hidden, weight, labels)
    total.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    per_row = linear_cross_entropy(hidden, weight, labels)
    per_row.sum().backward()
    assert rel(total, per_row.sum()) < 1e-6
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
    assert rel(grads[0], hidden.grad) < 1e-2
    assert rel(grads[1], weight.grad) < 1e-2


@pytest.mark.parametrize("divisor", [7, 2.5, torch.tensor(9), torch.tensor([4.0])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divisor_is_folded_into_the_gradients(divisor, dtype):
    """total / divisor, and its gradients, as if the caller had divided: the division is applied
    per row in float32 before the gradients are rounded to the tensors' dtype."""
    hidden, weight, labels = inputs(7, dtype)
    mean = linear_cross_entropy_total(hidden, weight, labels, divisor=divisor)
    mean.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = linear_cross_entropy_total(hidden, weight, labels)
    by = float(divisor) if not torch.is_tensor(divisor) else float(divisor.item())
    (plain / by).backward()
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel(mean, plain / by) < 1e-6
    assert rel(got[0], hidden.grad) < tol and rel(got[1], weight.grad) < tol
    h, w, ref = reference(hidden, weight, labels)
    (ref / by).backward()
    ref_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got[0], h.grad) < ref_tol and rel(got[1], w.grad) < ref_tol


def test_a_divisor_with_several_elements_is_refused():
    hidden, weight, labels = inputs(8)
    with pytest.raises(ValueError, match="one element"):
        linear_cross_entropy_total(hidden, weight, labels, divisor=torch.ones(2))


def test_frozen_weight_gets_no_gradient():
    hidden, weight, labels = inputs(2)
    weight.requires_grad_(False)
    linear_cross_entropy_total(hidden, weight, labels).backward()
    assert weight.grad is None and hidden.grad is not None


def test_a_second_backward_through_a_retained_graph_is_refused():
    """The backward hands out the gradients formed in the forward, without a copy; a second
    backward could only return what the caller may since have changed, so it raises."""
    hidden, weight, labels = inputs(3)
    total = linear_cross_entropy_total(hidden, weight, labels)
    (0.5 * total).backward(retain_graph=True)
    h, w, ref = reference(hidden, weight, labels)
    (0.5 * ref).backward()
    assert rel(hidden.grad, h.grad) < 1e-5 and rel(weight.grad, w.grad) < 1e-5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (0.5 * total).backward()


def test_no_grad_forward_matches():
    hidden, weight, labels = inputs(4)
    with torch.no_grad():
        total = linear_cross_entropy_total(hidden, weight, labels)
    _h, _w, ref = reference(hidden, weight, labels)
    assert rel(total, ref) < 1e-6


def test_bad_chunk_rows():
    hidden, weight, labels = inputs(5)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy_total(hidden, weight, labels, chunk_rows=0)


def test_opcheck():
    hidden, weight, labels = inputs(6)
    torch.library.opcheck(
        torch.ops.turbomoe.linear_cross_entropy_total.default,
        (hidden, weight, labels, -100, 5, True, torch.tensor(3.0)),
    )
