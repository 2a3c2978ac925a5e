"""Where a profiled step's GPU time went, from the Chrome trace `turbomoe bench --trace-dir` wrote.

Reports, per trace (one per run and rank):
  * the GPU span, the time some kernel/copy was running (busy) and the idle rest;
  * communication kernel time (NCCL's, and the NVLink exchange's barrier and push), and how
    much of it ran while a compute kernel was running on another
    stream (communication hidden behind compute, measured rather than assumed);
  * the longest idle gaps with the host calls that were blocking at the time (a host sync shows
    up as cudaStreamSynchronize / cudaMemcpy* / aten::item spanning the gap);
  * host calls that waited on the GPU: count and time per name.

    python bench/trace_summary.py out/trace_turbomoe_rank0.json.gz [--steps 2] [--gaps 15]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# Host calls that block until the GPU catches up (or that copy device memory to the host).
BLOCKING_NAMES = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",  # and cudaMemcpyAsync (names are matched by prefix)
    "aten::item",
    "aten::_local_scalar_dense",
)

Interval = tuple[float, float]
# The NVLink exchange's kernels (csrc/peer) count as communication, like NCCL's.
PEER_BARRIER = "peer::(anonymous namespace)::barrier_kernel"
PEER_PUSH = "peer::(anonymous namespace)::push_kernel"


def is_communication(name: str) -> bool:
    return "nccl" in name.lower() or PEER_BARRIER in name or PEER_PUSH in name


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def total(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def intersect(a: list[Interval], b: list[Interval]) -> float:
    """Length of the overlap of two sorted, disjoint interval lists."""
    i = j = 0
    out = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            out += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarise(path: Path, steps: int, gaps: int) -> str:
    events = load_events(path)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return f"{path}: no GPU events"
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in gpu if is_communication(e["name"])]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in gpu if not is_communication(e["name"])]
    barrier = [e["dur"] for e in gpu if PEER_BARRIER in e["name"]]
    push = [e["dur"] for e in gpu if PEER_PUSH in e["name"]]
    busy_u, nccl_u, compute_u = union(spans), union(nccl), union(compute)
    start, end = busy_u[0][0], busy_u[-1][1]
    span, busy = end - start, total(busy_u)
    nccl_t, compute_t = total(nccl_u), total(compute_u)
    hidden = intersect(nccl_u, compute_u)
    ms = 1e-3 / steps
    lines = [
        f"== {path.name} ({steps} step(s); times per step)",
        f"GPU span {span * ms:9.2f} ms   busy {busy * ms:9.2f}   idle {(span - busy) * ms:9.2f}",
        f"compute  {compute_t * ms:9.2f} ms   comm {nccl_t * ms:9.2f}   comm hidden behind "
        f"compute {hidden * ms:.2f} ms ({hidden / nccl_t:.0%} of comm)"
        if nccl_t
        else f"compute  {compute_t * ms:9.2f} ms   no communication kernels",
        f"comm alone (nothing else running) {(nccl_t - hidden) * ms:.2f} ms",
    ]
    if barrier or push:
        lines.append(
            f"  of which NVLink peer barriers {sum(barrier) * ms:.2f} ms "
            f"({len(barrier) / steps:.0f} calls: waiting for the slowest rank), "
            f"pushes {sum(push) * ms:.2f} ms "
            f"({len(push) / steps:.0f} calls)"
        )
    host = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver", "cpu_op")]
    blocking = [e for e in host if e["name"].startswith(BLOCKING_NAMES)]
    per_name: dict[str, list[float]] = defaultdict(list)
    for e in blocking:
        per_name[e["name"]].append(e["dur"])
    lines.append("host calls that can wait on the GPU (calls/step, ms/step, longest ms):")
    for name, durs in sorted(per_name.items(), key=lambda kv: -sum(kv[1])):
        lines.append(
            f"  {name:<34} {len(durs) / steps:7.1f} {sum(durs) * ms:9.2f} {max(durs) / 1e3:8.2f}"
        )
    idle = [(a[1], b[0]) for a, b in pairwise(busy_u) if b[0] > a[1]]
    idle.sort(key=lambda g: g[0] - g[1])
    small = sum(1 for g in idle if g[1] - g[0] < 20)
    lines.append(
        f"idle gaps: {len(idle) / steps:.0f}/step, {small / steps:.0f} under 20 us; "
        f"the {gaps} longest, with the host calls spanning them:"
    )
    for g0, g1 in idle[:gaps]:
        spanning = sorted(
            {e["name"] for e in host if e["ts"] <= g0 + 1 and e["ts"] + e["dur"] >= g1 - 1},
            key=len,
        )[:4]
        lines.append(f"  {(g1 - g0) / 1e3:7.3f} ms at +{(g0 - start) / 1e3:8.2f}: {spanning}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--steps", type=int, default=2, help="profiled steps in each trace")
    p.add_argument("--gaps", type=int, default=15, help="longest idle gaps listed")
    args = p.parse_args()
    for path in args.traces:
        print(summarise(path, args.steps, args.gaps))
        print()


if __name__ == "__main__":
    main()
