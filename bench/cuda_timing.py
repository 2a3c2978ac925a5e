"""CUDA-event timing shared by the single-GPU micro-benchmarks in bench/."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median over reps calls of fn, each timed alone between two CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_rate(nbytes: int, reps: int = 10) -> float:
    """Bytes a second a device-to-device copy of nbytes moves, counting reads and writes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), reps) * 1e-3)
