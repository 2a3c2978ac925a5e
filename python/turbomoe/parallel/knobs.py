"""Environment knobs of expert parallelism, read and checked in one way: a bad value is a
ValueError naming the variable, never a silent default."""

from __future__ import annotations

import os


def env_int(name: str, default: int, low: int, high: int) -> int:
    """The integer ``name`` holds (``default`` when unset), which must lie in [low, high]."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} must be in [{low}, {high}]")
    return value


def env_switch(name: str, default: bool) -> bool:
    """A 0/1 switch (``default`` when unset)."""
    text = os.environ.get(name)
    if text is None:
        return default
    if text not in ("0", "1"):
        raise ValueError(f"{name}={text!r} must be 0 or 1")
    return text == "1"
