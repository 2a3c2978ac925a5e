"""The package's public surface: lazy expert-parallel exports and the version."""

from __future__ import annotations

import pytest

import turbomoe


def test_parallel_entry_points_are_exported() -> None:
    from turbomoe import parallel

    assert turbomoe.AutoModelForCausalLM is parallel.AutoModelForCausalLM
    assert turbomoe.parallelize is parallel.parallelize


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = turbomoe.nope  # type: ignore[attr-defined]


def test_version_matches_the_library() -> None:
    from turbomoe import _native

    assert _native.lib().tm_version_string().decode() == turbomoe.__version__
