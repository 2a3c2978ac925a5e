"""One warning per reason whenever turbomoe hands a call back to stock transformers code."""

from __future__ import annotations

import threading
import warnings


class TurbomoeFallbackWarning(UserWarning):
    """A model (or part of one) runs stock transformers code; the message names the reason."""


_lock = threading.Lock()
_warned: set[str] = set()


def warn_once(reason: str) -> None:
    """Warns that stock code runs because of ``reason``, once per distinct reason per process.

    A training loop calls the same fallback thousands of times; one line per reason is what a
    user needs to see, so the set of reasons already reported is kept here rather than relying
    on the warnings filter (whose "default" action is per call site, not per reason).
    """
    with _lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(
        f"turbomoe: running stock transformers code: {reason}",
        TurbomoeFallbackWarning,
        stacklevel=3,
    )


def reset_warnings() -> None:
    """Forgets which reasons were reported (tests use it to observe a warning again)."""
    with _lock:
        _warned.clear()
