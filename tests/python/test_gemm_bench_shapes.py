"""bench/grouped_gemm_bench.py's shape names on CPU: the Qwen3 names, "KxN" for a sweep over K,
and a clear error for anything else (the bench itself needs a Hopper GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "grouped_gemm_bench", REPO / "bench" / "grouped_gemm_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_named_and_sweep_shapes() -> None:
    bench = load_bench()
    assert bench.parse_shape("gate_up") == (2048, 1536)
    assert bench.parse_shape("down") == (768, 2048)
    assert bench.parse_shape("4096x1536") == (4096, 1536)
    assert bench.parse_shape("512x8") == (512, 8)


@pytest.mark.parametrize("name", ["up", "4096x", "x1536", "4096x1530", "0x1536", "4096*1536"])
def test_bad_shapes_are_refused_with_the_name(name: str) -> None:
    bench = load_bench()
    with pytest.raises(SystemExit, match="--shapes"):
        bench.parse_shape(name)
