"""The GPU linear cross-entropy path (chunks of torch.mm + turbomoe's CE kernel) checked on CPU.

The chunk loop is plain torch around the CE op, so it runs on CPU tensors too: it must give the
C++ fused linear cross-entropy's loss and gradients whether it takes one chunk (grad_weight written
directly) or several (float32 running sum).
"""

from __future__ import annotations

import pytest
import torch

from turbomoe.ops import linear_cross_entropy
from turbomoe.ops.loss import _lce_backward_cuda, _lce_forward_cuda


@pytest.mark.parametrize("chunk_rows", [64, 5])  # one chunk; several with a remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_torch_path_matches_fused_reference(chunk_rows: int, dtype: torch.dtype) -> None:
    torch.manual_seed(chunk_rows + (dtype == torch.bfloat16))
    rows, hidden_size, vocab = 13, 24, 37
    hidden = torch.randn(rows, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[[2, 7]] = -100
    grad_loss = torch.rand(rows)

    h_ref = hidden.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    loss_ref = linear_cross_entropy(h_ref, w_ref, labels, -100, chunk_rows)
    loss_ref.backward(grad_loss)

    loss = torch.full((rows,), float("nan"))
    lse = torch.full((rows,), float("nan"))
    _lce_forward_cuda(hidden, weight, labels, -100, chunk_rows, loss, lse)
    grad_hidden = torch.full_like(hidden, float("nan"))
    grad_weight = torch.full_like(weight, float("nan"))
    _lce_backward_cuda(
        grad_loss, hidden, weight, labels, lse, -100, chunk_rows, grad_hidden, grad_weight
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad_hidden.float(), h_ref.grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad_weight.float(), w_ref.grad.float(), rtol=tol, atol=tol)
