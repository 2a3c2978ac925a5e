"""pytest plugin of scripts/memcheck_rounds.py (loaded with ``-p memcheck_plugin``).

Appends to $TURBOMOE_TEST_DONE_LOG one line per event: ``started ID`` when a test begins,
``passed|failed|skipped ID`` for its outcome (the call's, or a setup or teardown that did not
pass), ``done ID`` when its teardown is over. After a test that leaves less than
$TURBOMOE_TEST_MIN_FREE_GIB of device memory free it writes ``stopped: ...`` and ends the
session, so that the next round can go on in a fresh process. With $TURBOMOE_TEST_MEMORY_LOG
it also appends there, after each test, the free device memory and torch's live-tensor bytes
(live ~0 while free memory falls: the memory is held outside torch, e.g. by the sanitizer).
"""

from __future__ import annotations

import gc
import os
import sys

import pytest


def free_gib() -> float | None:
    """Free device memory after a garbage collection; None while the test process has no CUDA
    context (then there is nothing to run out of)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    gc.collect()
    return torch.cuda.mem_get_info()[0] / 2**30


def _write(line: str, variable: str = "TURBOMOE_TEST_DONE_LOG") -> None:
    path = os.environ.get(variable, "")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _write(f"started {nodeid}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        _write(f"{report.outcome} {report.nodeid}")


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown: their memory is back by then
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    _write(f"done {item.nodeid}")
    floor = float(os.environ.get("TURBOMOE_TEST_MIN_FREE_GIB", "0") or 0)
    logged = bool(os.environ.get("TURBOMOE_TEST_MEMORY_LOG"))
    if not logged and (floor <= 0 or nextitem is None):
        return
    free = free_gib()
    if free is None:
        return
    if logged:
        live = sys.modules["torch"].cuda.memory_allocated() / 2**30
        line = f"free {free:7.2f} GiB, live tensors {live:7.2f} GiB after {item.nodeid}"
        _write(line, "TURBOMOE_TEST_MEMORY_LOG")
    if floor > 0 and nextitem is not None and free < floor:
        reason = f"{free:.2f} GiB free after {item.nodeid}, below {floor:g} GiB"
        _write(f"stopped: {reason}")
        item.session.shouldstop = reason
