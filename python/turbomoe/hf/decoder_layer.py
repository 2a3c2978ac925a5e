"""Decoder-layer ``forward`` with the residual adds folded into the RMSNorms (``residual_norm``).

Every supported family's decoder layer is, line for line, ``STOCK_BODY`` below: norm, attention,
add, norm, MLP, add, with the residual kept across each half.

This forward computes the same values with ``turbomoe.ops.rms_norm_keep_input`` for the first
norm and ``turbomoe.ops.add_rms_norm`` for the first add and the second norm: the add runs inside
the norm's pass, and the gradients that autograd would add at the layer's input and at the
attention block's output are added inside the two norms' backward passes (bitwise the same
values: ``ops/residual_norm.py``). The last add stays torch's.

It is installed only on classes whose stock ``forward`` is exactly that body (compared as
syntax trees, so formatting and comments do not matter), and only where the rmsnorm hook is on
too. A call whose norms are not the family's plain RMSNorm (hooks of their own, a weight in
another dtype than the activations) runs the stock forward; an attention output in another
dtype than the residual (autocast) takes stock's add and norm after the attention.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from turbomoe import ops
from turbomoe.hf.norms import fused_norm_reason, global_hooks_registered
from turbomoe.hf.registry import KERNEL_DTYPES

LayerForward = Callable[..., torch.Tensor]

# The stock body; {arguments} are the forward's own named parameters after hidden_states, each
# passed on to the attention by name in the order of the signature.
STOCK_BODY = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, _ = self.self_attn(hidden_states=hidden_states, {arguments}**kwargs)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = residual + hidden_states
return hidden_states
"""


def _attention_arguments(forward: Callable[..., Any]) -> list[str] | None:
    """The named parameters between hidden_states and **kwargs, or None for another shape."""
    params = list(inspect.signature(forward).parameters.values())
    if len(params) < 3 or [p.name for p in params[:2]] != ["self", "hidden_states"]:
        return None
    last = params[-1]
    if last.kind is not inspect.Parameter.VAR_KEYWORD or last.name != "kwargs":
        return None
    middle = params[2:-1]
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in middle):
        return None
    return [p.name for p in middle]


def matches_stock(forward: Callable[..., Any]) -> bool:
    """True when ``forward``'s body is ``STOCK_BODY`` for its signature (docstring aside)."""
    names = _attention_arguments(forward)
    if names is None:
        return False
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        return False
    return body_matches_stock(source, names)


def body_matches_stock(source: str, names: list[str]) -> bool:
    """True when the function defined by ``source`` has ``STOCK_BODY``'s statements, with
    ``names`` passed on to the attention, docstring aside (compared as syntax trees)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef):
        return False
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    arguments = "".join(f"{name}={name}, " for name in names)
    expected = ast.parse(STOCK_BODY.format(arguments=arguments)).body
    return [ast.dump(s) for s in body] == [ast.dump(s) for s in expected]


def _unfused_reason(
    layer: nn.Module, hidden_states: torch.Tensor, norm_classes: tuple[type, ...]
) -> str | None:
    """Why this call runs the stock forward (None: the fused one computes it)."""
    if hidden_states.dtype not in KERNEL_DTYPES or hidden_states.device.type not in ("cpu", "cuda"):
        return f"hidden states in {hidden_states.dtype} on {hidden_states.device.type}"
    if hidden_states.dim() == 0:
        return "0-d hidden states"
    if global_hooks_registered():
        return "global module forward hooks are registered"
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        reason = fused_norm_reason(
            norm, hidden_states.dtype, hidden_states.shape[-1], norm_classes, "layer norm"
        )
        if reason is not None:
            return reason
    return None


def make_decoder_layer_forward(
    original: LayerForward, norm_classes: tuple[type, ...]
) -> LayerForward:
    """The fused forward for a decoder-layer class whose ``original`` forward matches the stock
    body; ``norm_classes`` are the family's RMSNorm classes, the only norms it folds."""
    signature = inspect.signature(original)
    names = _attention_arguments(original)
    if names is None:
        raise ValueError(f"{original.__qualname__} does not have a decoder layer's signature")

    defaults = {name: signature.parameters[name].default for name in names}
    all_defaulted = all(value is not inspect.Parameter.empty for value in defaults.values())

    def attention_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """What stock passes to the attention besides hidden_states, for this call's arguments."""
        if not args and all_defaulted:  # how the model calls its layers: a plain dict merge
            return {**defaults, **kwargs}
        bound = signature.bind(None, None, *args, **kwargs)
        bound.apply_defaults()
        return {**{name: bound.arguments[name] for name in names}, **bound.arguments["kwargs"]}

    @functools.wraps(original)
    def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _unfused_reason(self, hidden_states, norm_classes) is not None:
            return original(self, hidden_states, *args, **kwargs)
        attention_kwargs = attention_arguments(args, kwargs)
        first, second = self.input_layernorm, self.post_attention_layernorm
        residual, hidden = ops.rms_norm_keep_input(
            hidden_states, first.weight, float(first.variance_epsilon)
        )
        hidden, _ = self.self_attn(hidden_states=hidden, **attention_kwargs)
        if hidden.dtype == residual.dtype and hidden.shape == residual.shape:
            residual, hidden = ops.add_rms_norm(
                hidden, residual, second.weight, float(second.variance_epsilon)
            )
        else:  # an attention output that the add promotes or broadcasts (autocast): stock's
            hidden = residual + hidden
            residual = hidden
            hidden = second(hidden)
        hidden = self.mlp(hidden)
        return residual + hidden

    return forward
