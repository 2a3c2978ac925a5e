"""A training step's forward, loss and backward captured in one CUDA graph and replayed.

Why: turbomoe's kernels leave the host as the bottleneck of a single-GPU step. The benchmark
protocol synchronises before every step, so the GPU starts each step idle and waits whenever
Python and the autograd engine fall behind its short kernels (norms, RoPE, routing): about 10 of
75 ms per step on the 12-layer Qwen3-30B-A3B shape. A replayed graph launches the whole step at
once. turbomoe's ops never synchronise with the host inside a layer, so the step can be captured.

Contract of ``step(**batch)``, for a graph or for an eager run alike:

* it computes ``loss = loss_fn(model, **batch)`` and ``loss.backward()``, and returns
  ``loss.detach()``; a ``loss_fn`` that returns a tuple ``(loss, *reported)`` (tensors to log,
  e.g. the loss without its auxiliary term) gets the tuple back, detached;
* every trainable parameter's ``.grad`` must be ``None`` before the call
  (``optimizer.zero_grad(set_to_none=True)``, PyTorch's default). A replay *writes* the
  gradients; it cannot add to earlier ones without reading them, so accumulation over several
  calls is refused with an error instead of being silently lost;
* after a replay each ``.grad`` is the graph's own gradient buffer: use it (clip, step the
  optimizer) before the next call, which overwrites it.

Each distinct batch signature (tensor shapes, dtypes and devices, the other arguments, train
mode, autocast) runs ``warmup_steps`` times eagerly, as real steps that also warm up lazy
initialisation (cuBLAS and cuDNN plans, turbomoe's workspace sizes), and is captured on the next
call. At most ``max_graphs`` signatures are captured, each in its own memory pool (a pool shared
by graphs replayed in any order would let one graph's transients overwrite another's gradients);
other signatures run eagerly with a one-time warning. Pad batches to one length (as
``turbomoe finetune`` does with packing) to stay on the graph. Parameters or buffers moved to new
storage (``model.to``, ``load_state_dict(assign=True)``) are detected and recaptured.

On CPU every call runs eagerly. An expert-parallel model (``turbomoe.parallelize``) is captured
when its step needs nothing from the host (``turbomoe.parallel.capture``: padded expert buffers,
replicated dense weights, one chunk); each call then agrees the exchange size with the other
ranks before the step, and the graph is keyed by it. Other parallel models (FSDP, EP beyond the
padded bound) are refused with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from turbomoe.hf.capture import keep_causal_skip_while_capturing
from turbomoe.parallel.capture import agree_capacity, frozen_capacity
from turbomoe.parallel.dispatch import step_tokens

LossFn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
Output = torch.Tensor | tuple[torch.Tensor, ...]


class GraphStepError(RuntimeError):
    """The step cannot run as asked (gradients present, a bad loss, a parallel model)."""


def causal_lm_loss(model: nn.Module, **batch: Any) -> torch.Tensor:
    """The default loss: the model's own (``model(**batch).loss``, labels in the batch)."""
    loss = model(**batch).loss
    if loss is None:
        raise GraphStepError("the model returned no loss: pass labels= in the batch")
    return loss


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]  # the loss, then what loss_fn reported
    as_tuple: bool
    grads: list[tuple[nn.Parameter, torch.Tensor | None]]


@dataclass
class _Signature:
    eager_runs: int = 0
    captured: _Captured | None = None


@dataclass
class GraphStepStats:
    captures: int = 0
    replays: int = 0
    eager_steps: int = 0
    eager_signatures: set[Hashable] = field(default_factory=set)


class GraphedStep:
    """``loss = step(**batch)`` = forward + loss + backward, replayed from a CUDA graph.

    ``loss_fn(model, **batch)`` must return a scalar loss tensor, or a tuple of it and tensors to
    report; the default is the model's own loss. See the module docstring for the gradient
    contract.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = causal_lm_loss,
        *,
        warmup_steps: int = 2,
        max_graphs: int = 1,
    ) -> None:
        if warmup_steps < 1:
            # Capture records without running: lazy initialisation (handles, plans, workspace
            # attributes) must already have happened in an eager step.
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        if max_graphs < 0:
            raise ValueError(f"max_graphs must be >= 0, got {max_graphs}")
        self.parallel = _refuse_parallel(model)
        self.model = model
        self.loss_fn = loss_fn
        self.warmup_steps = warmup_steps
        self.max_graphs = max_graphs
        self.stats = GraphStepStats()
        self._signatures: dict[Hashable, _Signature] = {}
        self._storage: tuple[int, ...] | None = None

    @property
    def graphs(self) -> int:
        """Signatures captured and held now."""
        return sum(1 for s in self._signatures.values() if s.captured is not None)

    def reset(self) -> None:
        """Drops every graph and its memory pool; the next calls warm up and capture again."""
        self._signatures.clear()
        self._storage = None

    def __call__(self, **batch: Any) -> Output:
        if not torch.is_grad_enabled():
            raise GraphStepError("a training step needs gradients: called under no_grad")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise GraphStepError("the model has no parameter that requires grad")
        _require_no_grads(self.model, trainable)
        key = _signature(self.model, batch)  # checked on CPU too: the same calls work on both
        if not _on_cuda(trainable, batch):
            return self._eager(batch)
        if self.parallel:
            # Every rank, every step: the exchange size, agreed here rather than inside the
            # forward, keys the graph (ranks may replay and run eagerly side by side: they issue
            # the same exchanges in the same order).
            tokens = _tokens(batch)
            capacity = agree_capacity(self.model, tokens)
            key = (*key, ("ep_capacity", capacity))
            with frozen_capacity(self.model):
                return self._step(key, batch, trainable)
        return self._step(key, batch, trainable)

    def _step(self, key: Hashable, batch: dict[str, Any], trainable: list[nn.Parameter]) -> Output:
        storage = _storage_fingerprint(self.model)
        if storage != self._storage:
            self.reset()  # the graphs read parameters at addresses that are gone
            self._storage = storage
        sig = self._signatures.setdefault(key, _Signature())
        if sig.captured is not None:
            return self._replay(sig.captured, batch)
        if self.graphs >= self.max_graphs:
            if key not in self.stats.eager_signatures:
                self.stats.eager_signatures.add(key)
                warnings.warn(
                    f"GraphedStep: {self.max_graphs} batch signature(s) already captured; "
                    f"this one ({_describe(batch)}) runs eagerly. Pad batches to one shape or "
                    "raise max_graphs.",
                    stacklevel=2,
                )
            return self._eager(batch)
        if sig.eager_runs < self.warmup_steps:
            sig.eager_runs += 1
            return self._eager(batch)
        sig.captured = self._capture(batch, trainable)
        return self._replay(sig.captured, batch)

    def _eager(self, batch: dict[str, Any]) -> Output:
        outputs, as_tuple = _checked_outputs(self.loss_fn(self.model, **batch))
        outputs[0].backward()
        self.stats.eager_steps += 1
        detached = tuple(t.detach() for t in outputs)
        return detached if as_tuple else detached[0]

    def _capture(self, batch: dict[str, Any], trainable: list[nn.Parameter]) -> _Captured:
        inputs = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        arguments = {**batch, **inputs}
        graph = torch.cuda.CUDAGraph()
        try:
            positions_generated = batch.get("position_ids") is None
            # Thread-local capture under expert parallelism: NCCL's watchdog thread keeps making
            # CUDA calls while this thread captures.
            mode = "thread_local" if self.parallel else "global"
            with (
                keep_causal_skip_while_capturing(positions_generated),
                torch.cuda.graph(graph, capture_error_mode=mode),
            ):
                outputs, as_tuple = _checked_outputs(self.loss_fn(self.model, **arguments))
                outputs[0].backward()
        except Exception as exc:
            for p in trainable:
                p.grad = None
            also = ""
            try:
                _end_rng_capture()
            except Exception as rng_exc:  # the capture's own error stays the one reported
                also = f" Resetting the CUDA generator failed too ({rng_exc})."
            raise GraphStepError(
                f"capturing the step in a CUDA graph failed ({type(exc).__name__}: {exc}). "
                "Something in the forward or backward synchronises with the host or allocates "
                f"outside PyTorch; run the step eagerly instead of through GraphedStep.{also}"
            ) from exc
        grads = [(p, p.grad) for p in trainable]
        for p in trainable:
            p.grad = None
        self.stats.captures += 1
        static = tuple(t.detach() for t in outputs)
        return _Captured(graph, inputs, static, as_tuple, grads)

    def _replay(self, captured: _Captured, batch: dict[str, Any]) -> Output:
        for name, static in captured.inputs.items():
            static.copy_(batch[name])
        captured.graph.replay()
        for p, grad in captured.grads:
            p.grad = grad
        self.stats.replays += 1
        # Copies: the static outputs are overwritten by the next replay.
        copies = tuple(t.clone() for t in captured.outputs)
        return copies if captured.as_tuple else copies[0]


def _end_rng_capture() -> None:
    """After a failed capture the CUDA generator still counts offsets as if inside a graph, and
    every later random op in the process fails ("Offset increment outside graph capture"). A
    capture that succeeds ends that state; it records one fill and is thrown away."""
    scratch = torch.empty(1, device="cuda")
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        scratch.zero_()


def _checked_outputs(output: Any) -> tuple[tuple[torch.Tensor, ...], bool]:
    """(loss, *reported) and whether loss_fn returned a tuple."""
    as_tuple = isinstance(output, tuple)
    outputs = output if as_tuple else (output,)
    if not outputs or not all(isinstance(t, torch.Tensor) for t in outputs):
        raise GraphStepError(
            f"loss_fn must return a tensor or a tuple of tensors, got {type(output)!r}"
        )
    loss = outputs[0]
    if loss.numel() != 1:
        shape = tuple(loss.shape)
        raise GraphStepError(f"the loss must be a one-element tensor, got shape {shape}")
    if not loss.requires_grad:
        raise GraphStepError("the loss does not require grad: nothing to train")
    return outputs, as_tuple


def _refuse_parallel(model: nn.Module) -> bool:
    """Whether the model is expert-parallel (and capturable); raises when it cannot be."""
    from turbomoe.parallel.capture import capture_refusal
    from turbomoe.parallel.grads import DTensor
    from turbomoe.parallel.shard import is_parallelized

    if not is_parallelized(model):
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise GraphStepError(
                "GraphedStep cannot capture FSDP's all-gathers and hooks: shard with "
                "turbomoe.parallelize and replicated dense parameters, or run eagerly"
            )
        return False
    why = capture_refusal(model)
    if why is not None:
        raise GraphStepError(f"this expert-parallel step cannot be captured: {why}")
    return True


def _require_no_grads(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    if any(p.grad is not None for p in trainable):
        raise GraphStepError(
            "GraphedStep needs every trainable .grad to be None before a step "
            "(optimizer.zero_grad(set_to_none=True)). A replay writes the gradients and cannot "
            "add to earlier ones: accumulate over a larger batch, or run accumulated "
            f"micro-batches eagerly ({type(model).__name__})"
        )


def _tokens(batch: dict[str, Any]) -> int:
    tokens = step_tokens(batch.get("input_ids"), batch.get("inputs_embeds"))
    if tokens is None:
        raise GraphStepError(
            "an expert-parallel step needs input_ids or inputs_embeds in the batch"
        )
    return tokens


def _on_cuda(trainable: list[nn.Parameter], batch: dict[str, Any]) -> bool:
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return all(t.is_cuda for t in [*trainable, *tensors])


def _storage_fingerprint(model: nn.Module) -> tuple[int, ...]:
    tensors = [*model.parameters(), *model.buffers()]
    return tuple(t.data_ptr() for t in tensors) + tuple(int(t.requires_grad) for t in tensors)


def _signature(model: nn.Module, batch: dict[str, Any]) -> Hashable:
    items: list[Hashable] = []
    for name in sorted(batch):
        value = batch[name]
        if isinstance(value, torch.Tensor):
            items.append((name, tuple(value.shape), value.dtype, value.device))
            continue
        try:
            hash(value)
        except TypeError:
            raise GraphStepError(
                f"batch argument {name!r} is a {type(value).__name__}: only tensors and hashable "
                "values can key a captured step"
            ) from None
        items.append((name, "value", value))
    autocast = torch.is_autocast_enabled("cuda")
    items.append(("training", model.training))
    items.append(("autocast", autocast, torch.get_autocast_dtype("cuda") if autocast else None))
    return tuple(items)


def _describe(batch: dict[str, Any]) -> str:
    parts = [
        f"{k}={tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v!r}"
        for k, v in sorted(batch.items())
    ]
    return ", ".join(parts)
