"""Applies and reverts the patches the family table (``hf/registry.py``) declares.

Mechanisms, official extension points first:
- experts: transformers' experts registry. ``"turbomoe"`` is registered in the global mapping
  (so ``experts_implementation="turbomoe"`` validates) and the singleton
  ``ALL_EXPERTS_FUNCTIONS``'s local mapping makes the default name ``"grouped_mm"`` resolve to
  it; the decorator of every experts class holds that same singleton, so existing and future
  models pick it up at their next call.
- router / rmsnorm / dense_mlp / loss: method replacement of ``forward`` on the family's classes,
  found by structure (what their stock ``forward`` computes and returns), not by name alone.
  Replacing the method rather than the class keeps every module, parameter name, hook target and
  checkpoint key as stock, and reaches models built before the import as well.
- rope: the modeling module's ``apply_rotary_pos_emb*`` globals, looked up by the attention at
  call time.
- qk_norm_rope: method replacement of the attention's ``forward``, only where the stock forward
  holds every line the replacement reproduces (``hf/attention.py``).
- residual_norm: method replacement of the decoder layer's ``forward``, only where the stock
  forward is exactly the body the replacement reproduces (``hf/decoder_layer.py``), and only with
  the rmsnorm hook.

Every change is recorded with the value it replaced; :func:`unpatch` puts those exact objects
back, so stock behaviour returns bit for bit.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import textwrap
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import nn

from turbomoe.hf import experts as experts_hook
from turbomoe.hf.attention import make_attention_forward, matches_stock
from turbomoe.hf.decoder_layer import make_decoder_layer_forward
from turbomoe.hf.decoder_layer import matches_stock as decoder_layer_matches_stock
from turbomoe.hf.fallback import warn_once
from turbomoe.hf.loss import CAUSAL_LM_FORWARDS
from turbomoe.hf.mlp import make_mlp_forward
from turbomoe.hf.norms import make_rmsnorm_forward
from turbomoe.hf.registry import (
    FAMILIES,
    HOOK_OPS,
    HOOKS,
    MAX_TRANSFORMERS_EXCLUSIVE,
    MIN_TRANSFORMERS,
    Family,
)
from turbomoe.hf.rope import make_rope
from turbomoe.hf.routers import make_router_forward

_MISSING = object()


@dataclass
class _Change:
    """One replaced attribute (``is_item=False``) or mapping entry (``is_item=True``)."""

    target: Any
    name: str
    old: Any
    is_item: bool = False

    def revert(self) -> None:
        if self.is_item:
            if self.old is _MISSING:
                self.target.pop(self.name, None)
            else:
                self.target[self.name] = self.old
        elif self.old is _MISSING:
            delattr(self.target, self.name)
        else:
            setattr(self.target, self.name, self.old)


_lock = threading.RLock()
_changes: list[_Change] = []
_patched: dict[str, tuple[str, ...]] = {}


def _set_attr(target: Any, name: str, value: Any) -> None:
    # Read from __dict__ so a class's own attribute (not an inherited one) is what comes back.
    old = (
        vars(target).get(name, _MISSING)
        if isinstance(target, type)
        else getattr(target, name, _MISSING)
    )
    _changes.append(_Change(target, name, old))
    setattr(target, name, value)


def _set_item(mapping: dict[str, Any], key: str, value: Any) -> None:
    _changes.append(_Change(mapping, key, mapping.get(key, _MISSING), is_item=True))
    mapping[key] = value


# ----------------------------------------------------------------------------- discovery


def _source(fn: Callable[..., Any]) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""


def _module_classes(module: ModuleType) -> list[type[nn.Module]]:
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and obj.__module__ == module.__name__
    ]


def _own_forward(cls: type) -> Callable[..., Any] | None:
    forward = vars(cls).get("forward")
    return forward if callable(forward) else None


def _returns_triple(source: str) -> bool:
    """True when every ``return`` of the (single) function in ``source`` returns a 3-tuple."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    returns = [node for node in ast.walk(tree) if isinstance(node, ast.Return)]
    return bool(returns) and all(
        isinstance(node.value, ast.Tuple) and len(node.value.elts) == 3 for node in returns
    )


def _is_router(cls: type, family: Family) -> bool:
    """A linear top-k router: ``F.linear`` logits, a top-k, and ``(logits, weights, ids)`` out."""
    forward = _own_forward(cls)
    if forward is None or hasattr(cls, "_apply_gate"):  # decorated experts are not routers
        return False
    src = _source(forward)
    if "F.linear(" not in src or "topk(" not in src or not _returns_triple(src):
        return False
    params = list(inspect.signature(forward).parameters)
    if len(params) != 2:
        return False
    if family.routing.grouped:
        return "sigmoid()" in src and "e_score_correction_bias" in src
    return "softmax(" in src


def _is_rmsnorm(cls: type) -> bool:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(dtype): not (1 + weight), not gated."""
    forward = _own_forward(cls)
    src = _source(forward) if forward is not None else ""
    return (
        "variance_epsilon" in src
        and "rsqrt(" in src
        and "return self.weight * hidden_states.to(input_dtype)" in src
    )


def _is_swiglu_mlp(cls: type) -> bool:
    forward = _own_forward(cls)
    src = _source(forward) if forward is not None else ""
    return "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))" in src


def _is_causal_lm(cls: type, family: Family) -> bool:
    forward = _own_forward(cls)
    if forward is None:
        return False
    src = _source(forward)
    has_aux = "load_balancing_loss_func(" in src
    return (
        "logits = self.lm_head(hidden_states[:, slice_indices, :])" in src
        and "self.loss_function(" in src
        and has_aux == (family.causal_lm_output == "moe")
    )


def _is_qk_norm_attention(cls: type) -> bool:
    """An attention whose forward is Qwen3's: per-head q/k norms, then RoPE, then the interface."""
    forward = _own_forward(cls)
    if forward is None or not matches_stock(_source(forward)):
        return False
    params = list(inspect.signature(forward).parameters)
    return params == [
        "self",
        "hidden_states",
        "position_embeddings",
        "attention_mask",
        "past_key_values",
        "kwargs",
    ]


def _is_decoder_layer(cls: type) -> bool:
    """A pre-norm decoder layer: norm, attention, add, norm, MLP, add (``hf/decoder_layer.py``)."""
    forward = _own_forward(cls)
    return forward is not None and decoder_layer_matches_stock(forward)


_ROPE_FINGERPRINTS = {
    False: "(rotate_half(q) * sin)",
    True: "q[..., 0::2], q[..., 1::2]",
}


# ----------------------------------------------------------------------------- per hook


def _patch_classes(
    classes: list[type[nn.Module]], make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> int:
    for cls in classes:
        _set_attr(cls, "forward", make(vars(cls)["forward"]))
    return len(classes)


def _apply_hook(hook: str, family: Family, module: ModuleType) -> int:
    """Patches one hook of one family; returns how many classes/functions it touched."""
    classes = _module_classes(module)
    if hook == "router":
        routers = [cls for cls in classes if _is_router(cls, family)]
        return _patch_classes(routers, lambda fwd: make_router_forward(fwd, family.routing))
    if hook == "rmsnorm":
        return _patch_classes([cls for cls in classes if _is_rmsnorm(cls)], make_rmsnorm_forward)
    if hook == "dense_mlp":
        return _patch_classes([cls for cls in classes if _is_swiglu_mlp(cls)], make_mlp_forward)
    if hook == "loss":
        make_forward = CAUSAL_LM_FORWARDS[family.causal_lm_output]
        heads = [cls for cls in classes if _is_causal_lm(cls, family)]
        return _patch_classes(heads, lambda fwd: make_forward(fwd, module))
    if hook == "qk_norm_rope":
        norms = tuple(cls for cls in classes if _is_rmsnorm(cls))
        attentions = [cls for cls in classes if _is_qk_norm_attention(cls)]
        if not norms:
            return 0
        return _patch_classes(attentions, lambda fwd: make_attention_forward(fwd, module, norms))
    if hook == "residual_norm":
        norms = tuple(cls for cls in classes if _is_rmsnorm(cls))
        layers = [cls for cls in classes if _is_decoder_layer(cls)]
        if not norms:
            return 0
        return _patch_classes(layers, lambda fwd: make_decoder_layer_forward(fwd, norms))
    if hook == "rope":
        count = 0
        for name, interleaved in family.rope_functions:
            original = getattr(module, name, None)
            if callable(original) and _ROPE_FINGERPRINTS[interleaved] in _source(original):
                _set_attr(module, name, make_rope(original, interleaved))
                count += 1
        return count
    raise ValueError(f"unknown hook {hook!r}")


def _install_experts(families: frozenset[str]) -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    fn = experts_hook.turbomoe_experts_forward
    stock = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    experts_hook.configure(families, stock)
    # An official global registration makes the name valid for from_pretrained/set_...; the
    # singleton's local mapping wins over the global one for the default key.
    _set_item(ExpertsInterface._global_mapping, "turbomoe", fn)
    _set_item(ALL_EXPERTS_FUNCTIONS._local_mapping, "grouped_mm", fn)


# ----------------------------------------------------------------------------- checks


def _version_reason() -> str | None:
    import transformers
    from packaging.version import InvalidVersion, Version

    try:
        version = Version(transformers.__version__)
    except InvalidVersion:
        return f"cannot parse the transformers version {transformers.__version__!r}"
    if not Version(MIN_TRANSFORMERS) <= version < Version(MAX_TRANSFORMERS_EXCLUSIVE):
        return (
            f"transformers {transformers.__version__} is outside the range turbomoe's patches "
            f"were written for (>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}); "
            "nothing is patched"
        )
    return None


def _library_reason() -> str | None:
    from turbomoe import _native

    try:
        _native.lib()
    except (ImportError, OSError) as error:
        return f"libturbomoe cannot be loaded ({error}); nothing is patched"
    return None


def _available_hooks() -> set[str]:
    from turbomoe import ops

    available = set()
    for hook, op in HOOK_OPS.items():
        if callable(getattr(ops, op, None)):
            available.add(hook)
        else:
            warn_once(f"turbomoe.ops.{op} is not available; the {hook} hook is skipped")
    return available


def skipped_hooks() -> set[str]:
    """The hooks that ``TURBOMOE_SKIP_HOOKS`` (comma-separated names) leaves out of a default
    :func:`patch`: an A/B of one fusion, or a way around one, without touching the code."""
    text = os.environ.get("TURBOMOE_SKIP_HOOKS", "")
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(HOOKS)
    if unknown:
        raise ValueError(
            f"TURBOMOE_SKIP_HOOKS names unknown hooks {sorted(unknown)}; hooks: {list(HOOKS)}"
        )
    return names


# ----------------------------------------------------------------------------- public


def patch(
    families: Iterable[str] | None = None, hooks: Iterable[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Applies turbomoe's patches (all families and hooks of the table by default, less those
    named in ``TURBOMOE_SKIP_HOOKS``).

    Calling it again first reverts the previous patches, so the arguments of the last call are
    what is in force. Returns :func:`patched_families`.
    """
    wanted_families = set(FAMILIES) if families is None else set(families)
    wanted_hooks = set(HOOKS) - skipped_hooks() if hooks is None else set(hooks)
    unknown = (wanted_families - set(FAMILIES)) | (wanted_hooks - set(HOOKS))
    if unknown:
        raise ValueError(
            f"unknown families/hooks {sorted(unknown)}; families: {sorted(FAMILIES)}, "
            f"hooks: {list(HOOKS)}"
        )
    with _lock:
        unpatch()
        try:
            reason = _version_reason() or _library_reason()
            if reason is not None:
                warn_once(reason)
                return {}
            available = _available_hooks()
            experts_families: set[str] = set()
            for model_type, family in FAMILIES.items():
                if model_type not in wanted_families:
                    continue
                try:
                    module = importlib.import_module(family.module)
                except ImportError as error:
                    warn_once(f"{model_type}: cannot import {family.module} ({error})")
                    continue
                applied = []
                for hook in HOOKS:
                    if (
                        hook not in family.hooks
                        or hook not in wanted_hooks
                        or hook not in available
                    ):
                        continue
                    if hook == "experts":
                        experts_families.add(model_type)
                        applied.append(hook)
                    elif hook == "residual_norm" and "rmsnorm" not in applied:
                        # The fused forward runs turbomoe's norm: not where the user kept stock's.
                        warn_once(
                            f"{model_type}: the residual_norm hook needs the rmsnorm hook, which "
                            "is off; the decoder layers keep their stock forward"
                        )
                    elif _apply_hook(hook, family, module) > 0:
                        applied.append(hook)
                    else:
                        warn_once(
                            f"{model_type}: found nothing to patch for the {hook} hook in "
                            f"{family.module} (its code differs from what turbomoe expects)"
                        )
                if applied:
                    _patched[model_type] = tuple(applied)
            if experts_families:
                _install_experts(frozenset(experts_families))
            return dict(_patched)
        except BaseException:
            # Never leave transformers half patched.
            unpatch()
            raise


def unpatch() -> None:
    """Reverts every patch: transformers behaves exactly as if turbomoe was never imported."""
    with _lock:
        while _changes:
            _changes.pop().revert()
        experts_hook.configure(frozenset(), None)
        _patched.clear()


def patched_families() -> dict[str, tuple[str, ...]]:
    """Family (``config.model_type``) → the hooks currently applied to it."""
    with _lock:
        return dict(_patched)
