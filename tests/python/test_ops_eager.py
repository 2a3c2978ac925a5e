"""The eager fast path of the custom ops (ops/_eager.py) against the registered ops.

In plain eager mode the public functions skip the dispatcher; anything that must see the op (a
dispatch mode, torch.compile, fake tensors) gets the op itself. Both paths must give the same
values and gradients, and the fast path must never hide an op from a dispatch mode.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from turbomoe import ops
from turbomoe.ops._eager import differentiable, direct


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _moe_inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = 9, 16, 12, 4, 2
    x = torch.randn(tokens, hidden, requires_grad=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, requires_grad=True)
    down = torch.randn(experts, hidden, inter, requires_grad=True)
    logits = torch.randn(tokens, experts, requires_grad=True)
    return x, gate_up, down, logits, torch.tensor(top_k)


def _layer(x, gate_up, down, logits, top_k):  # type: ignore[no-untyped-def]
    weights, ids = ops.route(logits, int(top_k), "softmax_topk", True)
    h = ops.rms_norm(x, None, 1e-6)
    return ops.moe_experts(h, ids, weights, gate_up, down).square().sum()


def test_fast_path_and_op_path_give_the_same_values_and_gradients():
    inputs = _moe_inputs()
    fast = _layer(*inputs)
    fast_grads = torch.autograd.grad(fast, inputs[:4])
    with RecordOps() as mode:  # a dispatch mode forces every call through the registered ops
        slow = _layer(*inputs)
        slow_grads = torch.autograd.grad(slow, inputs[:4])
    assert "turbomoe.grouped_gemm" in mode.names
    assert "turbomoe.grouped_gemm_backward_weight" in mode.names
    assert "turbomoe.route" in mode.names and "turbomoe.rms_norm" in mode.names
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _graph_node_names(root: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_eager_calls_take_the_fast_path():
    x, gate_up, down, logits, top_k = _moe_inputs()
    out = _layer(x, gate_up, down, logits, top_k)
    names = _graph_node_names(out)
    # The fast path's Functions are named after the op implementations; the op path's nodes are
    # torch's generated "GeneratedBackwardFor_turbomoe_*" classes.
    assert any("_eager" in n for n in names), names
    assert not any("GeneratedBackwardFor_turbomoe" in n for n in names), names
    # Every differentiable input got a gradient path through the eager autograd.Functions.
    grads = torch.autograd.grad(out, (x, gate_up, down, logits), allow_unused=False)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_no_grad_call_runs_the_implementation_without_a_graph():
    x, gate_up, down, logits, top_k = _moe_inputs()
    with torch.no_grad():
        out = _layer(x, gate_up, down, logits, top_k)
    assert out.grad_fn is None


def test_wrappers_fall_back_to_the_op_when_torch_hides_the_implementation():
    class Opaque:  # a custom-op stand-in without the _init_fn attribute
        registered = False

        def __call__(self, *args):  # type: ignore[no-untyped-def]
            return "op"

        def register_autograd(self, backward, setup_context):  # type: ignore[no-untyped-def]
            self.registered = True

    op = Opaque()
    assert direct(op) is op
    assert differentiable(op, lambda *a: None, lambda *a: None) is op
    assert op.registered  # the op path keeps its autograd formula


class _CountZeroFills(TorchDispatchMode):
    """Counts the ops that fill a tensor with zeros (what autograd runs to materialise the
    gradient of an output the backward never reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.fills: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket)
        if name in ("aten.zeros", "aten.zero_", "aten.zeros_like", "aten.new_zeros") or (
            name == "aten.fill_" and len(args) > 1 and args[1] == 0
        ):
            self.fills.append(name)
        return func(*args, **(kwargs or {}))


def test_backwards_fill_no_zero_gradients_for_side_outputs():
    """rms_norm (rstd), route (ids, scores) and linear_cross_entropy_total (the stored gradients,
    the whole [V, H] lm_head among them) return outputs that get no gradient; autograd must not
    hand their backwards zero tensors (a memset of each, every step)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = torch.rand(16, generator=gen).requires_grad_()
    logits = torch.randn(6, 8, generator=gen, requires_grad=True)
    lm_head = torch.randn(32, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 32, (6,), generator=gen)

    normed = ops.rms_norm(x, w, 1e-6)
    weights, _ids = ops.route(logits, 2, "softmax_topk", True)
    loss = ops.linear_cross_entropy_total(normed, lm_head, labels)
    total = loss + (weights * normed[:, :2]).sum()
    with _CountZeroFills() as counter:
        total.backward()
    assert counter.fills == [], counter.fills
    # Not vacuous: every input got its gradient.
    for t in (x, w, logits, lm_head):
        assert t.grad is not None and float(t.grad.abs().max()) > 0
