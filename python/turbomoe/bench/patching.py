"""Switching turbomoe's Hugging Face patches off (stock run) and on (turbomoe run).

``import turbomoe`` patches transformers; ``turbomoe.unpatch()`` / ``turbomoe.patch()`` switch
that off and on. The bench must leave the process as it found it, because ``turbomoe bench`` may
be called from a longer-lived process (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import turbomoe


def patch_api_available() -> bool:
    return callable(getattr(turbomoe, "patch", None)) and callable(
        getattr(turbomoe, "unpatch", None)
    )


def is_patched() -> bool:
    """Whether any family is patched right now (``turbomoe.patched_families()``); without that
    query, what ``import turbomoe`` does by default."""
    query = getattr(turbomoe, "patched_families", None)
    if callable(query):
        return bool(query())
    return patch_api_available() and os.environ.get("TURBOMOE_DISABLE", "0") != "1"


def _set(enabled: bool) -> None:
    if not patch_api_available():
        return
    if enabled:
        turbomoe.patch()
    else:
        turbomoe.unpatch()


@contextlib.contextmanager
def patch_state(enabled: bool) -> Iterator[bool]:
    """Run the body with the patches on or off; yields whether that state is really in effect
    (False when turbomoe's patch API is missing and patches were asked for). Restores the
    previous state on exit."""
    before = is_patched()
    _set(enabled)
    try:
        yield is_patched() == enabled
    finally:
        _set(before)
