"""The one-line import: Hugging Face Transformers MoE models on turbomoe's ops.

``import turbomoe`` calls :func:`patch` (unless ``TURBOMOE_DISABLE=1``); what is patched, per
family, is the table in :mod:`turbomoe.hf.registry`, and :func:`unpatch` restores stock
transformers exactly. Models keep their classes, parameter names, hooks and checkpoint format;
anything turbomoe does not run (another family, another activation, biases, mixed dtypes, ...)
runs stock code after one :class:`TurbomoeFallbackWarning` naming the reason.

Behaviour that differs from stock, on purpose:
- While ``model.training`` and labels are given, ``XForCausalLM.forward`` returns
  ``logits=None``: the loss comes from fused linear cross-entropy and the full logits are never
  built. In eval mode, or without labels, logits are returned as stock. To keep stock logits
  in training, patch without the loss hook:
  ``turbomoe.patch(hooks=[h for h in HOOKS if h != "loss"])``.
- Numerics: the same math with different summation orders (fp32 parity with stock is ~1e-6).

Unchanged stock behaviour worth knowing: an explicit ``experts_implementation="eager"`` /
``"batched_mm"`` keeps the user's choice (only the default ``"grouped_mm"`` name resolves to
turbomoe); ``generate()`` on GPU still switches ``grouped_mm`` to ``batched_mm`` for decoding;
Mixtral's ``router_jitter_noise`` is applied by the stock sparse block before the patched router.
"""

from turbomoe.hf.fallback import TurbomoeFallbackWarning
from turbomoe.hf.patcher import patch, patched_families, unpatch
from turbomoe.hf.registry import FAMILIES, HOOKS

__all__ = ["FAMILIES", "HOOKS", "TurbomoeFallbackWarning", "patch", "patched_families", "unpatch"]
