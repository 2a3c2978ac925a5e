"""Timing primitives: per-step fwd/bwd timers (CUDA events or wall clock) and the bf16 GEMM peak
that MFU is measured against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class StepTimer:
    """Times forward(+loss) and backward of one step.

    On CUDA it brackets the phases with events and synchronises at the end of the step, so the
    figures are GPU time from the first forward kernel to the last backward kernel, launch gaps
    included. The caller synchronises before ``start`` so that earlier work (the optimizer step)
    is not in the window. On CPU it uses the wall clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        self._times = [0.0, 0.0, 0.0]
        # Bytes allocated at step start, forward end and backward end (CUDA): what the states,
        # the saved activations and the gradients add up to at each mark (a host-side counter,
        # no synchronisation).
        self.allocated = [0, 0, 0]

    def _mark(self, index: int) -> None:
        if self.cuda:
            self._events[index].record()
            self.allocated[index] = torch.cuda.memory_allocated()
        else:
            self._times[index] = time.perf_counter()

    def start(self) -> None:
        self._mark(0)

    def forward_done(self) -> None:
        self._mark(1)

    def backward_done(self) -> None:
        self._mark(2)

    def elapsed_ms(self) -> tuple[float, float]:
        """(forward ms, backward ms); synchronises on CUDA."""
        if self.cuda:
            self._events[2].synchronize()
            return (
                self._events[0].elapsed_time(self._events[1]),
                self._events[1].elapsed_time(self._events[2]),
            )
        return (
            (self._times[1] - self._times[0]) * 1e3,
            (self._times[2] - self._times[1]) * 1e3,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    reps: int,
    before: Callable[[], object] | None = None,
) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones: CUDA
    events on a GPU, the wall clock on CPU. ``before`` runs ahead of each timed call, outside
    the window (e.g. a barrier that lines up the ranks)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    for _ in range(reps):
        if before is not None:
            before()
        timer = StepTimer(device)
        timer.start()
        fn()
        timer.forward_done()
        timer.backward_done()
        samples.append(timer.elapsed_ms()[0])
    return statistics.median(samples)


def measure_matmul_peak_tflops(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    size: int = 8192,
    iters: int = 20,
    warmup_s: float = 1.0,
) -> float:
    """Median TFLOP/s of a square ``size``³ matmul: the practical peak MFU is quoted against.

    Timed after at least ``warmup_s`` seconds of the same matmul: the bench measures this first,
    on a GPU that has been idle at its lowest clock, and three warm-up calls (~4 ms on an H100)
    read 669-678 TFLOP/s where the GEMM bench, measuring after its correctness checks, read
    785-798 on the same kind of card (eighteenth and nineteenth sessions)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    deadline = time.perf_counter() + warmup_s
    while True:  # at least one round, so that the CPU smoke run warms up too
        for _ in range(4):
            torch.matmul(a, b, out=out)
        synchronize(device)
        if time.perf_counter() >= deadline:
            break
    ms = median_ms(lambda: torch.matmul(a, b, out=out), device, 0, iters)
    seconds = max(ms, 1e-9) / 1e3
    return 2.0 * size**3 / seconds / 1e12
