"""One optimizer step over accumulated micro-batches, and evaluation on the validation split."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from turbomoe.parallel.grads import sum_of_squares
from turbomoe.train.batching import Batch
from turbomoe.train.graph_step import GraphedStep
from turbomoe.train.optim import AdamW


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    micro: list[Batch],
    lr: float,
    *,
    max_grad_norm: float,
    aux_coef: float,
    device: torch.device,
    parallel: bool,
    global_supervised: float,
    graphed: GraphedStep | None = None,
) -> tuple[float, float | None, float]:
    """Returns (this rank's share of the loss, router aux loss, grad norm).

    ``graphed`` (from :func:`graphed_train_step`, one micro-batch): the forward and backward run
    through it, replayed from a CUDA graph once captured.

    Every micro-batch's loss is divided by the supervised tokens of the whole step over all
    ranks (global_supervised), so the accumulated gradient is that of one big batch regardless
    of how tokens fall into micro-batches and ranks; the ranks' losses then sum to the step loss.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Only a step with no supervised token at all needs a stand-in divisor; under torchrun the
    # divisor is a per-rank share and may legitimately be below 1. Always float32, so that a
    # captured step (graphed) sees the same input dtype at every step.
    divisor = float(global_supervised if global_supervised > 0 else 1)
    inputs = {
        "use_cache": False,
        "num_items_in_batch": torch.tensor(divisor, dtype=torch.float32, device=device),
        "output_router_logits": aux_coef > 0 or None,
    }
    if graphed is not None:
        if len(micro) != 1:
            raise ValueError(f"a graphed step takes one micro-batch, got {len(micro)}")
        outputs = graphed(**micro[0].to(device).model_inputs(), **inputs)
        assert isinstance(outputs, tuple)
        total, aux_total = outputs[1], (outputs[2] if len(outputs) > 2 else None)
    else:
        total = torch.zeros((), device=device)
        aux_total = None
        for batch in micro:
            arguments = {**batch.to(device).model_inputs(), **inputs}
            trained, loss, aux = micro_loss(model, arguments, aux_coef, len(micro))
            trained.backward()
            total += loss.detach()
            if aux is not None:
                share = aux.detach() / len(micro)
                aux_total = share if aux_total is None else aux_total + share
    params = [p for p in model.parameters() if p.grad is not None]
    clip = max_grad_norm if max_grad_norm > 0 else math.inf
    if parallel:
        from turbomoe.parallel import clip_grad_norm_

        grad_norm = clip_grad_norm_(model, clip)
        optimizer.step()
    elif isinstance(optimizer, AdamW):
        # The clipping factor stays on the device and the fused step multiplies it into each
        # gradient as it reads it: no pass that rescales the gradients, no host sync.
        grad_norm = _grad_norm(params)
        scale = (clip / (grad_norm + 1e-6)).clamp(max=1.0) if math.isfinite(clip) else None
        optimizer.step(grad_scale=scale)
    else:
        grad_norm = clip_grad_norm_if_needed(params, clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), None if aux_total is None else float(aux_total), float(grad_norm)


def clip_grad_norm_if_needed(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that scales the gradients only when the norm exceeds
    max_norm: torch's multiplies every gradient by the clamped factor, 1 included, a pass over
    all gradients (4 bytes an element in bf16) on every step that clips nothing. Costs one host
    sync, which the step takes anyway to report the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = _grad_norm(params)
    if math.isfinite(max_norm) and grads:
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return norm


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The float32 2-norm of all gradients, on their device (one multi-tensor pass)."""
    grads = [p.grad for p in params if p.grad is not None]
    return sum_of_squares(grads, grads[0].device if grads else torch.device("cpu")).sqrt()


def micro_loss(
    model: Any, arguments: dict[str, Any], aux_coef: float, parts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(what one of ``parts`` micro-batches differentiates, the model's loss, the router aux
    loss or None). The model's own aux coefficient is 0 (see loop._prepare_aux_loss): the aux
    term is added here, once per step in all, averaged over the micro-batches."""
    out = model(**arguments)
    aux = getattr(out, "aux_loss", None)
    if aux_coef > 0 and aux is not None:
        return out.loss + aux_coef * aux / parts, out.loss, aux
    return out.loss, out.loss, aux


def graphed_train_step(model: Any, aux_coef: float) -> GraphedStep:
    """The GraphedStep for :func:`train_step` (one micro-batch): it differentiates and reports
    what :func:`micro_loss` returns."""

    def loss_fn(m: Any, **arguments: Any) -> tuple[torch.Tensor, ...]:
        trained, loss, aux = micro_loss(m, arguments, aux_coef, 1)
        return (trained, loss) if aux is None else (trained, loss, aux)

    return GraphedStep(model, loss_fn)


@torch.no_grad()
def evaluate(model: Any, batches: Iterable[Batch], device: torch.device) -> tuple[float, int]:
    """(summed token loss, supervised tokens) over the batches; the caller divides (after
    summing over ranks), so the validation loss is a per-token mean whatever the batching."""
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        for batch in batches:
            batch = batch.to(device)
            out = model(
                **batch.model_inputs(),
                use_cache=False,
                num_items_in_batch=torch.tensor(1, device=device),
            )
            total += float(out.loss)
            count += batch.supervised
    finally:
        model.train(was_training)
    return total, count
