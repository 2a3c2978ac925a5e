"""turbomoe: one import makes Hugging Face Transformers v5 MoE fine-tuning fast.

``import turbomoe`` patches transformers so that supported MoE families run on turbomoe's ops
(see :mod:`turbomoe.hf`). Set ``TURBOMOE_DISABLE=1`` to import without patching anything;
``turbomoe.unpatch()`` reverts the patches and ``turbomoe.patch()`` applies them again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLM",
    "__version__",
    "parallelize",
    "patch",
    "patched_families",
    "unpatch",
]

# Expert-parallel entry points, imported on first use so that `import turbomoe` does not pull in
# torch.distributed's FSDP machinery for single-GPU users.
_PARALLEL_EXPORTS = ("AutoModelForCausalLM", "parallelize")


def __getattr__(name: str) -> object:
    if name in _PARALLEL_EXPORTS:
        from turbomoe import parallel

        return getattr(parallel, name)
    raise AttributeError(f"module 'turbomoe' has no attribute {name!r}")


def patch(
    families: Iterable[str] | None = None, hooks: Iterable[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Patches transformers (all supported families and hooks by default); see turbomoe.hf."""
    from turbomoe.hf import patcher

    return patcher.patch(families, hooks)


def unpatch() -> None:
    """Restores stock transformers behaviour exactly."""
    if _hf_loaded():
        from turbomoe.hf import patcher

        patcher.unpatch()


def patched_families() -> dict[str, tuple[str, ...]]:
    """Family (config.model_type) → hooks currently applied."""
    if not _hf_loaded():
        return {}
    from turbomoe.hf import patcher

    return patcher.patched_families()


def _hf_loaded() -> bool:
    # With TURBOMOE_DISABLE=1 nothing imported transformers on turbomoe's behalf; keep it so.
    import sys

    return "turbomoe.hf.patcher" in sys.modules


def _disabled() -> bool:
    return os.environ.get("TURBOMOE_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _patch_on_import() -> None:
    import importlib.util
    import warnings

    if importlib.util.find_spec("transformers") is None:
        # The ops and the C++ core are usable without transformers; there is nothing to patch.
        warnings.warn("turbomoe: transformers is not installed; nothing patched", stacklevel=3)
        return
    try:
        patch()
    except Exception as error:  # an import must not break the user's script: run stock instead
        warnings.warn(
            f"turbomoe: patching transformers failed ({type(error).__name__}: {error}); "
            "running stock transformers",
            stacklevel=3,
        )


if not _disabled():
    _patch_on_import()
