"""Each decoder layer's attention replayed from CUDA graphs, forward and backward.

Why: a step that cannot be captured whole is host-bound with turbomoe's kernels. The
expert-parallel step is one (the owner reads its routed-token count once a layer, and the ranks
exchange tokens through the host's launches): on 4 H200s, 12 layers, each rank's GPU computed
for ~70 ms of a ~110-125 ms step while the host thread that launched the backward was busy for
53 of its 61 ms (profiled), and every rank waited at each exchange for the slowest host. The
attention block (q/k/v projections, the QK norms, RoPE, SDPA, the output projection and their
reshapes) has fixed shapes and never reads the device from the host, and it is about a third of
the host's work in a layer: with its forward and its backward each replayed from one graph, the
host launches the MoE part of the layer and two graphs.

How: ``torch.cuda.make_graphed_callables`` over every layer's attention at once (one forward and
one backward graph per layer, captured in the order they run: forwards 1..N, backwards N..1, in
one memory pool). A graph reads its inputs from static buffers and writes static outputs, so a
layer's graph serves one forward and one backward per step, in that order, which is what a
training step does. The parameters' gradients come out of the backward graph and are
accumulated by autograd as usual (gradient hooks, the dense all-reduce overlap, still fire).

Any call that is not the captured case runs the attention's own forward: another shape, dtype or
train/eval mode, an attention mask or a KV cache, no gradient, a forward re-run inside the
backward (activation checkpointing), a whole-step capture already in progress, or a second
forward before the backward of the first (its replay would overwrite what that backward reads).
Parameters moved to new storage (``model.to``) or frozen/unfrozen since the capture drop the
layer's graphs with a warning.

    graphs = capture_attention_graphs(model)  # after one eager step (records the shapes)
    ...
    graphs.release()  # restores the eager forwards and frees the graphs' memory pool

or, capturing by itself at the first forward after an eager training step,
``enable_attention_graphs(model)`` (what ``parallelize(..., attention_graphs=True)`` uses).
Packed or padded batches carry an attention mask, so their attention always runs eagerly.
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ATTENTION_SUFFIX = "self_attn"
_STATE_ATTR = "_turbomoe_attention_graph"


@dataclass(frozen=True)
class _Signature:
    hidden: tuple[tuple[int, ...], torch.dtype, torch.device]
    rotary: tuple[tuple[int, ...], torch.dtype]
    training: bool


def _signature(module: nn.Module, hidden: torch.Tensor, cos: torch.Tensor) -> _Signature:
    return _Signature(
        (tuple(hidden.shape), hidden.dtype, hidden.device),
        (tuple(cos.shape), cos.dtype),
        module.training,
    )


class _Core(nn.Module):
    """The attention as a function of (hidden, cos, sin) alone, without a mask or a cache; its
    parameters are the attention's, so the graphs return their gradients."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _eager_forward(self.attention)(hidden, (cos, sin), None)[0]


def _eager_forward(module: nn.Module) -> Callable[..., Any]:
    # The class's forward (turbomoe's patches replace class methods), not the instance override.
    return types.MethodType(type(module).forward, module)


def _parameters_key(module: nn.Module) -> tuple[tuple[int, bool], ...]:
    return tuple((p.data_ptr(), p.requires_grad) for p in module.parameters())


@dataclass
class _LayerState:
    """What the instance ``forward`` of one attention module knows."""

    seen: _Signature | None = None  # the last eager call's signature, when it could be graphed
    captured: _Signature | None = None
    graphed: Callable[..., Any] | None = None
    parameters: tuple[tuple[int, bool], ...] = ()  # storage and trainability at the capture
    replays: int = 0
    # The last replay's autograd node, and whether its backward has run: a second forward
    # replay before that backward would overwrite what the backward graph reads.
    _node: weakref.ref[Any] | None = None
    _backward_ran: bool = True

    def backward_pending(self) -> bool:
        return not self._backward_ran and self._node is not None and self._node() is not None

    def replayed(self, output: torch.Tensor) -> None:
        self.replays += 1
        self._backward_ran = False
        self._node = weakref.ref(output.grad_fn) if output.grad_fn is not None else None

        def ran(grad: torch.Tensor) -> None:
            self._backward_ran = True

        output.register_hook(ran)

    def drop(self) -> None:
        self.graphed = self.captured = None
        self.parameters = ()


def _why_eager(
    module: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: Any,
    attention_mask: Any,
    past_key_values: Any,
    kwargs: dict[str, Any],
) -> str | None:
    if attention_mask is not None:
        return "an attention mask"
    if past_key_values is not None or kwargs.get("use_cache"):
        return "a KV cache"
    if kwargs.get("output_attentions"):
        return "attention weights asked for"
    if getattr(getattr(module, "config", None), "_attn_implementation", None) != "sdpa":
        return "not SDPA attention"
    if not (isinstance(position_embeddings, tuple) and len(position_embeddings) == 2):
        return "no (cos, sin) position embeddings"
    if not hidden.is_cuda or not torch.is_grad_enabled() or not hidden.requires_grad:
        return "not a CUDA training forward"
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return "inside a capture or a compile"
    if torch._C._current_graph_task_id() != -1:
        return "a forward inside the backward (recomputation)"
    return None


def _install(module: nn.Module, state: _LayerState) -> None:
    def forward(
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> Any:
        eager = _eager_forward(module)
        why = _why_eager(
            module, hidden_states, position_embeddings, attention_mask, past_key_values, kwargs
        )
        if why is not None:
            return eager(
                hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
            )
        cos, sin = position_embeddings
        signature = _signature(module, hidden_states, cos)
        if state.graphed is not None and signature == state.captured:
            if _parameters_key(module) != state.parameters:
                # The graphs read the parameters at their old addresses (model.to, a new
                # Parameter, a change of requires_grad): never replay them again.
                state.drop()
                warnings.warn(
                    f"attention graphs of {type(module).__name__} dropped: its parameters "
                    "changed storage or trainability since the capture; capture again",
                    stacklevel=2,
                )
            elif not state.backward_pending():
                output = state.graphed(hidden_states, cos, sin)
                state.replayed(output)
                return output, None
        state.seen = signature
        return eager(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder layers' attention modules (named ``...self_attn``), in layer order."""
    return [m for name, m in model.named_modules() if name.split(".")[-1] == ATTENTION_SUFFIX]


def prepare_attention_graphs(model: nn.Module) -> int:
    """Makes every attention module record the signature of its eager calls, so that
    :func:`capture_attention_graphs` knows what to capture; returns the number of modules. Runs
    nothing on the GPU; idempotent."""
    modules = attention_modules(model)
    for module in modules:
        if getattr(module, _STATE_ATTR, None) is None:
            state = _LayerState()
            setattr(module, _STATE_ATTR, state)
            _install(module, state)
    return len(modules)


@dataclass
class AttentionGraphs:
    """The captured graphs of one model; ``release`` undoes the capture."""

    modules: list[nn.Module] = field(default_factory=list)

    @property
    def replays(self) -> int:
        """Graph replays of the forward, summed over the layers, since the capture."""
        return sum(_state(m).replays for m in self.modules)

    def release(self) -> None:
        """Every attention module runs its own forward again; the graphs and their pool go."""
        for module in self.modules:
            if _STATE_ATTR in module.__dict__:
                delattr(module, _STATE_ATTR)
            module.__dict__.pop("forward", None)
        self.modules = []


def _state(module: nn.Module) -> _LayerState:
    state = getattr(module, _STATE_ATTR, None)
    if not isinstance(state, _LayerState):
        raise RuntimeError(f"{type(module).__name__} was not prepared for attention graphs")
    return state


def capture_attention_graphs(model: nn.Module, num_warmup_iters: int = 1) -> AttentionGraphs:
    """Captures one forward and one backward graph per attention module, for the signature its
    last eager training call had (run one step after :func:`prepare_attention_graphs` first).

    Raises ValueError when a module has no such call (nothing to capture from), when the
    parameters are distributed tensors (FSDP) or when CUDA is not in use.
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no '{ATTENTION_SUFFIX}' modules to graph")
    states = [_state(m) for m in modules]
    missing = [i for i, s in enumerate(states) if s.seen is None]
    if missing:
        raise ValueError(
            f"{len(missing)} attention module(s) (first: layer {missing[0]}) ran no eager CUDA "
            "training forward since prepare_attention_graphs: run one step first"
        )
    from turbomoe.parallel.grads import DTensor  # here: turbomoe.parallel imports this module

    for module in modules:
        for p in module.parameters():
            if isinstance(p, DTensor):
                raise ValueError("attention graphs need plain parameters, not FSDP's DTensors")
            if p.device.type != "cuda":
                raise ValueError("attention graphs need the attention's parameters on CUDA")
    cores, samples = [], []
    for module, state in zip(modules, states, strict=True):
        assert state.seen is not None
        (shape, dtype, device), (rot_shape, rot_dtype) = state.seen.hidden, state.seen.rotary
        hidden = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        cos = torch.randn(rot_shape, dtype=rot_dtype, device=device)
        sin = torch.randn(rot_shape, dtype=rot_dtype, device=device)
        core = _Core(module)
        core.train(state.seen.training)
        cores.append(core)
        samples.append((hidden, cos, sin))
    graphed = torch.cuda.make_graphed_callables(
        tuple(cores), tuple(samples), num_warmup_iters=num_warmup_iters
    )
    for module, state, fn in zip(modules, states, graphed, strict=True):
        state.graphed = fn
        state.captured = state.seen
        state.parameters = _parameters_key(module)
        state.replays = 0
    return AttentionGraphs(list(modules))


class AutoAttentionGraphs:
    """Captures a model's attention graphs by itself: prepares the model now, and a forward
    pre-hook captures at the first forward after one eager CUDA training step has recorded every
    layer's call (no collective inside, so ranks may capture independently). A failed capture
    warns once and leaves the attention eager. ``release`` undoes everything."""

    def __init__(self, model: nn.Module) -> None:
        if prepare_attention_graphs(model) == 0:
            raise ValueError(f"{type(model).__name__} has no '{ATTENTION_SUFFIX}' modules to graph")
        self.model = model
        # Found once: the pre-hook runs in every forward until the capture (or forever, when
        # batches never qualify), and a walk over a 48-layer model's modules costs host time.
        self.modules = attention_modules(model)
        self.graphs: AttentionGraphs | None = None
        self.failure: str | None = None
        self._hook = model.register_forward_pre_hook(self._maybe_capture)

    def _ready(self) -> bool:
        if self.graphs is not None or self.failure is not None or not torch.is_grad_enabled():
            return False
        if not all(_state(m).seen is not None for m in self.modules):
            return False  # (a CPU model never gets here: its calls are never recorded)
        return not torch.cuda.is_current_stream_capturing()

    def _maybe_capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._ready():
            return
        try:
            self.graphs = capture_attention_graphs(self.model)
        except Exception as exc:  # a graph is an optimisation: never fail the step for it
            self.failure = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"attention graphs were not captured ({self.failure}); the attention runs eagerly",
                stacklevel=2,
            )

    def release(self) -> None:
        self._hook.remove()
        AttentionGraphs(self.modules).release()
        self.graphs = None


def enable_attention_graphs(model: nn.Module) -> AutoAttentionGraphs:
    """Replays ``model``'s attention from CUDA graphs from its second training step on (see
    :class:`AutoAttentionGraphs`); for steps that cannot be captured whole, such as the
    expert-parallel one. Batches must keep one shape and come without an attention mask (and
    with ``use_cache=False``) for the graphs to replay; other calls run eagerly."""
    return AutoAttentionGraphs(model)
