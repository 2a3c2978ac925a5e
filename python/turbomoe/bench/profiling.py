"""Per-kernel time breakdown with torch.profiler, rendered as markdown (``--profile``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls_per_step: float
    ms_per_step: float
    share: float  # of all kernel (or, on CPU, operator self) time


@dataclass(frozen=True)
class Profile:
    device: str
    steps: int
    total_ms_per_step: float
    rows: list[KernelRow]
    # Wall time per profiled step: against total_ms_per_step it shows how long the GPU idled
    # (launch-bound stretches, host syncs). The profiler's own overhead inflates it somewhat.
    wall_ms_per_step: float | None = None


def profile_steps(
    step: Callable[[], None],
    device: torch.device,
    steps: int,
    top: int,
    trace_path: Path | None = None,
) -> Profile:
    """Run ``step`` ``steps`` times under the profiler; return the ``top`` entries by self time:
    CUDA kernels on a GPU, operators on CPU (where there are no kernels). With ``trace_path``
    the timeline is also written there as a gzipped Chrome trace (bench/trace_summary.py reads
    it: GPU idle gaps, the host calls that waited on the GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3 / steps
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))  # gzipped by torch for a ".gz" path
    events = prof.key_averages()
    if device.type == "cuda":
        # "nccl:<op>" ranges are annotations spanning the NCCL kernel that is listed too.
        chosen = [
            (e.key, e.count, e.self_device_time_total)
            for e in events
            if e.device_type == DeviceType.CUDA and not e.key.startswith("nccl:")
        ]
    else:
        chosen = [(e.key, e.count, e.self_cpu_time_total) for e in events]
    total_us = sum(us for _, _, us in chosen) or 1.0
    chosen.sort(key=lambda c: c[2], reverse=True)
    rows = [
        KernelRow(name, count / steps, us / 1e3 / steps, us / total_us)
        for name, count, us in chosen[:top]
    ]
    return Profile(device.type, steps, total_us / 1e3 / steps, rows, wall_ms)


def _cell(text: str, width: int = 110) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_markdown(profiles: dict[str, Profile], header: str) -> str:
    """One section per run: rank, kernel, calls/step, ms/step, share, µs/call."""
    lines = [header, ""]
    for label, prof in profiles.items():
        what = "CUDA kernels" if prof.device == "cuda" else "CPU operators"
        lines += [
            f"## {label}",
            "",
            f"Top {len(prof.rows)} {what} by self time, averaged over {prof.steps} profiled "
            f"step(s) of forward + loss + backward; all {what} together: "
            f"{prof.total_ms_per_step:.2f} ms/step"
            + (
                f" (wall time {prof.wall_ms_per_step:.2f} ms/step under the profiler)."
                if prof.wall_ms_per_step is not None
                else "."
            ),
            "",
            "| # | name | calls/step | ms/step | share | µs/call |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for i, row in enumerate(prof.rows, 1):
            per_call = row.ms_per_step * 1e3 / row.calls_per_step if row.calls_per_step else 0.0
            lines.append(
                f"| {i} | `{_cell(row.name)}` | {row.calls_per_step:g} | {row.ms_per_step:.3f} "
                f"| {row.share:.1%} | {per_call:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)
