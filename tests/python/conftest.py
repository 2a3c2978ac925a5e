"""pytest setup for turbomoe's Python tests.

- An installed package (``pip install .``, which puts libturbomoe.so inside it) is used as is:
  nothing here sets TURBOMOE_LIBRARY or shadows the installed package. Only when ``turbomoe``
  cannot be imported at all is the source tree's ``python/`` folder put on sys.path, so a
  developer can run the tests from a checkout with a built library.
- Tests marked ``gpu`` run only when TURBOMOE_GPU_TESTS=1. Without it they are deselected (so
  they are not counted as passed or skipped); with it but without a CUDA device the session
  stops with an error instead of skipping them silently.
- Under pytest-xdist (PYTEST_XDIST_WORKER set; the GPU suite's PYTEST_WORKERS) each gpu test's
  cached device memory is released when it ends, so that the workers share the device.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("turbomoe") is None:
    sys.path.insert(0, str(REPO / "python"))


def gpu_tests_requested() -> bool:
    return os.environ.get("TURBOMOE_GPU_TESTS", "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; runs only with TURBOMOE_GPU_TESTS=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests_requested():
        if gpu_items:
            config.hook.pytest_deselected(items=gpu_items)
            items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
        return
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(
                "TURBOMOE_GPU_TESTS=1 but torch finds no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): the "
                f"{len(gpu_items)} gpu tests cannot run"
            )


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Under pytest-xdist (several test processes on one device) a gpu test's cached blocks go
    back to the driver when it ends: otherwise each worker keeps the largest test's peak (and
    its poison) reserved, and together they outgrow the device."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or item.get_closest_marker("gpu") is None:
        return
    import gc

    import torch

    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture
def stock_transformers() -> Iterator[None]:
    """Stock transformers for the duration of a test, then turbomoe's patches as they were.

    ``import turbomoe`` patches transformers; tests that use Hugging Face code as the reference
    must not compare turbomoe with itself.
    """
    import turbomoe

    before = turbomoe.patched_families()
    turbomoe.unpatch()
    try:
        yield
    finally:
        if before:
            hooks = sorted({hook for applied in before.values() for hook in applied})
            turbomoe.patch(sorted(before), hooks)
