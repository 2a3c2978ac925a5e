"""cross_entropy and linear_cross_entropy against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbomoe.ops import cross_entropy, linear_cross_entropy

ROWS, HIDDEN, VOCAB = 13, 72, 101


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def labels_with_ignored(rows: int, vocab: int, ignore_index: int = -100) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows,))
    labels[::4] = ignore_index
    return labels


def reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(logits.double(), labels, ignore_index=ignore_index, reduction="none")


@pytest.mark.parametrize("ignore_index", [-100, 7])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_cross_entropy_float32(ignore_index, label_dtype):
    torch.manual_seed(0)
    logits = (torch.randn(ROWS, VOCAB) * 4).requires_grad_(True)
    labels = labels_with_ignored(ROWS, VOCAB, ignore_index)
    loss = cross_entropy(logits, labels.to(label_dtype), ignore_index)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference(ref_logits, labels, ignore_index)
    assert loss.shape == (ROWS,) and loss.dtype == torch.float32
    assert torch.count_nonzero(loss[labels == ignore_index]) == 0
    assert rel(loss, ref) < 1e-6
    upstream = torch.rand(ROWS, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert rel(logits.grad, ref_logits.grad) < 1e-6
    assert torch.count_nonzero(logits.grad[labels == ignore_index]) == 0


def test_cross_entropy_bfloat16():
    torch.manual_seed(1)
    logits = (torch.randn(ROWS, VOCAB) * 4).bfloat16().requires_grad_(True)
    labels = labels_with_ignored(ROWS, VOCAB)
    loss = cross_entropy(logits, labels)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = reference(ref_logits, labels, -100)
    assert loss.dtype == torch.float32
    assert rel(loss, ref) < 1e-5  # computed in float32 from the same bf16 values
    loss.sum().backward()
    ref.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert rel(logits.grad, ref_logits.grad) < 1e-2


def test_cross_entropy_zero_rows():
    logits = torch.randn(0, VOCAB, requires_grad=True)
    loss = cross_entropy(logits, torch.zeros(0, dtype=torch.int64))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert logits.grad.shape == (0, VOCAB)


def test_cross_entropy_rejects_bad_labels():
    logits = torch.randn(4, VOCAB)
    with pytest.raises(ValueError, match="label"):
        cross_entropy(logits, torch.tensor([0, 1, VOCAB, 2]))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("chunk_rows", [4096, 5, 1])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_cross_entropy_float32(chunk_rows, weight_grad):
    torch.manual_seed(chunk_rows)
    hidden = torch.randn(ROWS, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.3).requires_grad_(weight_grad)
    labels = labels_with_ignored(ROWS, VOCAB)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(weight_grad)
    ref = reference(ref_hidden @ ref_weight.t(), labels, -100)
    assert loss.shape == (ROWS,) and loss.dtype == torch.float32
    assert torch.count_nonzero(loss[labels == -100]) == 0
    assert rel(loss, ref) < 1e-6
    upstream = torch.rand(ROWS, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert rel(hidden.grad, ref_hidden.grad) < 1e-5
    if weight_grad:
        assert weight.grad.dtype == torch.float32
        assert rel(weight.grad, ref_weight.grad) < 1e-5
    else:
        assert weight.grad is None


def test_linear_cross_entropy_bfloat16():
    torch.manual_seed(2)
    hidden = torch.randn(ROWS, HIDDEN).bfloat16().requires_grad_(True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.3).bfloat16().requires_grad_(True)
    labels = labels_with_ignored(ROWS, VOCAB)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=4)
    ref_hidden = hidden.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    ref = reference(ref_hidden @ ref_weight.t(), labels, -100)
    assert rel(loss, ref) < 1e-2
    loss.sum().backward()
    ref.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert rel(hidden.grad, ref_hidden.grad) < 1e-2
    assert rel(weight.grad, ref_weight.grad) < 1e-2


def test_linear_cross_entropy_all_ignored_and_zero_rows():
    hidden = torch.randn(5, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((5,), -100))
    assert torch.count_nonzero(loss) == 0
    loss.sum().backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
    empty = torch.randn(0, HIDDEN, requires_grad=True)
    loss = linear_cross_entropy(empty, weight, torch.zeros(0, dtype=torch.int64))
    assert loss.shape == (0,)
    loss.sum().backward()
    assert empty.grad.shape == (0, HIDDEN)


def test_linear_cross_entropy_rejects_bad_arguments():
    hidden = torch.randn(4, HIDDEN)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, torch.randn(VOCAB, HIDDEN + 1), torch.zeros(4).long())
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, torch.randn(VOCAB, HIDDEN), torch.zeros(4).long(), -100, 0)
    with pytest.raises(ValueError, match="label"):
        linear_cross_entropy(hidden, torch.randn(VOCAB, HIDDEN), torch.full((4,), VOCAB))


def test_loss_opcheck():
    torch.manual_seed(3)
    logits = torch.randn(ROWS, VOCAB, requires_grad=True)
    labels = labels_with_ignored(ROWS, VOCAB)
    torch.library.opcheck(torch.ops.turbomoe.cross_entropy.default, (logits, labels, -100))
    _loss, lse = torch.ops.turbomoe.cross_entropy(logits.detach(), labels, -100)
    torch.library.opcheck(
        torch.ops.turbomoe.cross_entropy_backward.default,
        (torch.rand(ROWS), logits.detach(), labels, lse, -100),
    )
    hidden = torch.randn(ROWS, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    torch.library.opcheck(
        torch.ops.turbomoe.linear_cross_entropy.default, (hidden, weight, labels, -100, 5)
    )
    _loss, lse = torch.ops.turbomoe.linear_cross_entropy(
        hidden.detach(), weight.detach(), labels, -100, 5
    )
    for need_weight_grad in (True, False):
        torch.library.opcheck(
            torch.ops.turbomoe.linear_cross_entropy_backward.default,
            (
                torch.rand(ROWS),
                hidden.detach(),
                weight.detach(),
                labels,
                lse,
                -100,
                5,
                need_weight_grad,
            ),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_unless_one(dtype):
    """In place by the scale rounded to x's dtype; a unit scale leaves every bit, NaNs too."""
    from turbomoe.ops.loss import scale_unless_one

    x = torch.randn(37).to(dtype)
    x[5] = float("nan")
    before = x.clone()
    scale_unless_one(torch.ones(1), x)
    assert torch.equal(x.view(torch.uint8), before.view(torch.uint8))
    scale_unless_one(torch.full((1,), 0.3), x)
    want = (before.float() * torch.tensor(0.3).to(dtype).float()).to(dtype)
    assert torch.equal(x.isnan(), want.isnan())
    assert torch.equal(x[~want.isnan()], want[~want.isnan()])
    with pytest.raises(ValueError, match="expected 1"):
        scale_unless_one(torch.ones(2), x)
    torch.library.opcheck(
        torch.ops.turbomoe.scale_unless_one.default, (torch.full((1,), 2.0), torch.randn(8))
    )
