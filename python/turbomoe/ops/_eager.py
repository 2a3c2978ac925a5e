"""Eager-mode calls of turbomoe's custom ops without the dispatcher round trip.

Each op is a ``torch.library.custom_op`` so that ``torch.compile``, ``opcheck``, fake tensors and
dispatch modes see a named operator with a fake kernel and an autograd formula. In plain eager
mode that machinery costs 40-80 µs of host time per call (schema handling, a redispatch, a
generated ``autograd.Function``); a 12-layer MoE step makes several hundred such calls, and on a
GPU the host then falls behind the kernels (measured: 69 ms of kernels in a 91 ms step).

:func:`direct` and :func:`differentiable` return callables that run the op's own Python
implementation (the function the op was made from) directly, through a plain
``autograd.Function`` carrying the same ``setup_context`` / ``backward`` when a gradient is
needed, whenever nothing else needs to see the op: not compiling, no dispatch mode active, only
plain tensors. Otherwise they call the registered custom op, so the semantics are the op's in
every case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


def eager_ok(args: tuple[Any, ...]) -> bool:
    """True when calling the implementation directly is indistinguishable from the op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    # A plain loop, not all() over a generator: this runs a few hundred times a step, and the
    # generator alone cost ~1 µs a call (measured, CPU).
    for a in args:
        kind = type(a)
        if kind is not _TENSOR and kind is not _PARAMETER and isinstance(a, _TENSOR):
            return False  # a subclass (FakeTensor, DTensor, ...): the op's own dispatch
    return True


def _implementation(op: Any) -> Callable[..., Any] | None:
    """The Python function a custom op was made from; None where torch does not expose it (then
    every call goes through the op)."""
    fn = getattr(op, "_init_fn", None)
    return fn if callable(fn) else None


def direct(op: Any) -> Callable[..., Any]:
    """``op`` (a custom op without autograd, e.g. a backward kernel) with an eager fast path."""
    impl = _implementation(op)
    if impl is None:
        return op

    def call(*args: Any) -> Any:
        return impl(*args) if eager_ok(args) else op(*args)

    call.__name__ = getattr(impl, "__name__", "call")
    call.__doc__ = impl.__doc__
    return call


def differentiable(
    op: Any, setup_context: Callable[..., None], backward: Callable[..., Any]
) -> Callable[..., Any]:
    """``op`` with this ``setup_context`` / ``backward`` registered as its autograd formula, and
    an eager fast path.

    Positional arguments only, all of them passed (setup_context unpacks the full input tuple).
    An op with several outputs (a result and side outputs: statistics, ids, stored gradients)
    gets no materialised zeros for the outputs nobody differentiates: autograd would otherwise
    hand its backward a zero tensor of each, a memset on every backward (the whole [V, H] lm_head
    gradient among them); such a backward takes a missing gradient as "nothing to do".
    """

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        setup_context(ctx, inputs, output)
        if isinstance(output, tuple) and len(output) > 1:
            ctx.set_materialize_grads(False)

    op.register_autograd(backward, setup_context=setup)
    impl = _implementation(op)
    if impl is None:
        return op

    def forward(ctx: Any, *args: Any) -> Any:
        output = impl(*args)
        setup(ctx, args, output)
        return output

    # The ctx-in-forward style: a Function with a separate setup_context goes through functorch's
    # path and costs about 2.5x the host time per call. Built with type() so that the autograd
    # node is named after the op ("<impl>_eagerBackward") in graphs and profiles.
    name = f"{getattr(impl, '__name__', 'op').lstrip('_')}_eager"
    function: Any = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def call(*args: Any) -> Any:
        if not eager_ok(args):
            return op(*args)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args)
        return impl(*args)

    call.__name__ = getattr(impl, "__name__", "call")
    call.__doc__ = impl.__doc__
    return call
