"""``XForCausalLM.forward`` replacements that compute the loss with fused linear cross-entropy.

Stock 5.17 materialises ``logits = lm_head(hidden)`` ([B,S,V], then upcast to float32 by
``ForCausalLMLoss``) before the loss; with a 152k vocabulary that is gigabytes per step. When
labels are given (and the model uses the stock ``ForCausalLM`` loss), these forwards instead pass
the hidden states and ``lm_head.weight`` to ``turbomoe.ops.linear_cross_entropy``, which never
holds more than a chunk of logits. Everything else follows the stock forward line by line:
``logits_to_keep`` slicing, ``shift_labels`` / label shifting with ``ignore_index``,
``num_items_in_batch`` (sum / count) or the mean over non-ignored tokens, and
``router_aux_loss_coef * aux_loss`` with ``output_router_logits``.

Documented difference: while ``model.training`` and labels are given, the returned ``logits``
are ``None`` (computing them would bring back the memory the fused loss saves). In eval mode,
or without labels, logits are computed exactly as stock. Without labels, with a custom
``loss_function``, or when ``lm_head`` is not a plain ``nn.Linear`` (e.g. a PEFT-wrapped head)
the stock forward runs unchanged.

``LOSS_MAPPING`` is deliberately left alone: ``Trainer`` compares its entry by identity to decide
how to count ``num_items_in_batch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from turbomoe import ops
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.registry import KERNEL_DTYPES

ForwardFn = Callable[..., Any]


def _uses_stock_loss(model: nn.Module) -> bool:
    # A user-set loss_function (or a non-causal loss_type) is the user's choice: honour it.
    return model.loss_function is LOSS_MAPPING.get("ForCausalLM")


def _head_reason(model: nn.Module, vocab_size: int) -> str | None:
    """Why lm_head cannot be folded into the fused loss, or None."""
    head = getattr(model, "lm_head", None)
    name = type(model).__name__
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        # PEFT-wrapped heads (lora.Linear) or quantised linears compute something else.
        return (
            f"{name}: lm_head is a {type(head).__name__}, not a plain nn.Linear (fused CE skipped)"
        )
    if head.bias is not None:
        return f"{name}: lm_head has a bias (fused CE skipped)"
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        # e.g. tensor-parallel gather hooks or accelerate's device-map/offload wrappers, which
        # only run when lm_head is called as a module.
        return f"{name}: lm_head has forward hooks or a wrapped forward (fused CE skipped)"
    weight = head.weight
    if weight.dim() != 2 or weight.shape[0] != vocab_size:
        return f"{name}: lm_head does not produce vocab_size={vocab_size} logits"
    if weight.device.type not in ("cpu", "cuda") or weight.dtype not in KERNEL_DTYPES:
        return f"{name}: lm_head weight is {weight.dtype} on {weight.device.type}"
    return None


def fused_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor:
    """``ForCausalLMLoss(lm_head(hidden), labels, ...)`` without the logits."""
    if shift_labels is None:
        # Shift so that tokens < n predict n, exactly as ForCausalLMLoss pads and slices.
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(rows.device)
    if num_items_in_batch is not None:
        divisor = num_items_in_batch
        if torch.is_tensor(divisor):
            divisor = divisor.to(rows.device)
    else:
        divisor = (targets != ignore_index).sum()
    if rows.is_cuda and torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        # Training on the GPU: the gradient of the mean is formed with the logits (three lm_head
        # GEMMs instead of four), HF's division folded into it.
        return ops.linear_cross_entropy_total(
            rows, weight, targets, ignore_index=ignore_index, divisor=divisor
        )
    per_row = ops.linear_cross_entropy(rows, weight, targets, ignore_index=ignore_index)
    return per_row.sum() / divisor


def _loss_and_logits(
    model: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    logits_to_keep: int | torch.Tensor,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    slice_indices = (
        slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    )
    kept = hidden_states[:, slice_indices, :]
    rows, weight = kept, model.lm_head.weight
    device_type = kept.device.type
    if torch.is_autocast_enabled(device_type):
        # Stock runs lm_head (an autocast-listed linear) in the autocast dtype before upcasting
        # the logits; give the fused loss the same operands, so precision and speed match.
        autocast_dtype = torch.get_autocast_dtype(device_type)
        rows, weight = kept.to(autocast_dtype), weight.to(autocast_dtype)
    if rows.dtype != weight.dtype or rows.dtype not in KERNEL_DTYPES:
        warn_once(
            f"{type(model).__name__}: lm_head operands in {rows.dtype} and {weight.dtype} "
            "(fused CE skipped)"
        )
        logits = model.lm_head(kept)
        loss = model.loss_function(logits, labels, model.config.vocab_size, **kwargs)
        return loss, logits
    loss = fused_causal_lm_loss(rows, weight, labels, **kwargs)
    logits = None if model.training else model.lm_head(kept)
    return loss, logits


def _fused_blocked(model: nn.Module) -> bool:
    if not _uses_stock_loss(model):
        return True
    reason = _head_reason(model, model.config.vocab_size)
    if reason is not None:
        warn_once(reason)
        return True
    return False


def make_moe_causal_lm_forward(original: ForwardFn, family_module: ModuleType) -> ForwardFn:
    """Forward of Qwen2/3-MoE, Mixtral, OLMoE ``ForCausalLM`` (MoeCausalLMOutputWithPast)."""

    @can_return_tuple
    def fused(
        self: nn.Module,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Any,
        inputs_embeds: torch.FloatTensor | None,
        labels: torch.Tensor,
        use_cache: bool | None,
        output_router_logits: bool | None,
        logits_to_keep: int | torch.Tensor,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        output_router_logits = (
            output_router_logits
            if output_router_logits is not None
            else self.config.output_router_logits
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        loss, logits = _loss_and_logits(
            self, outputs.last_hidden_state, labels, logits_to_keep, kwargs
        )
        aux_loss = None
        if output_router_logits:
            # Looked up at call time, like the stock forward's module global.
            aux_loss = family_module.load_balancing_loss_func(
                outputs.router_logits,
                self.num_experts,
                self.num_experts_per_tok,
                attention_mask,
            )
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    @functools.wraps(original)
    def forward(
        self: nn.Module,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        if labels is None or _fused_blocked(self):
            return original(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                output_router_logits=output_router_logits,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        return fused(
            self,
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            labels,
            use_cache,
            output_router_logits,
            logits_to_keep,
            **kwargs,
        )

    return forward


def make_dense_causal_lm_forward(original: ForwardFn, family_module: ModuleType) -> ForwardFn:
    """Forward of DeepSeek-V3 ``ForCausalLM`` (CausalLMOutputWithPast, no router aux loss)."""
    del family_module  # no module globals are needed: there is no aux loss

    @can_return_tuple
    def fused(
        self: nn.Module,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Any,
        inputs_embeds: torch.FloatTensor | None,
        labels: torch.Tensor,
        use_cache: bool | None,
        logits_to_keep: int | torch.Tensor,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        loss, logits = _loss_and_logits(
            self, outputs.last_hidden_state, labels, logits_to_keep, kwargs
        )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @functools.wraps(original)
    def forward(
        self: nn.Module,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        if labels is None or _fused_blocked(self):
            return original(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        return fused(
            self,
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            labels,
            use_cache,
            logits_to_keep,
            **kwargs,
        )

    return forward


CAUSAL_LM_FORWARDS: dict[str, Callable[[ForwardFn, ModuleType], ForwardFn]] = {
    "moe": make_moe_causal_lm_forward,
    "dense": make_dense_causal_lm_forward,
}
