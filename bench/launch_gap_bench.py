"""What a boundary between two dependent turbomoe kernels costs in a CUDA graph, with and without
programmatic dependent launch (TURBOMOE_PDL=1, csrc/common/launch.cuh).

A chain of N RMSNorms over [rows, 2048] bf16, each reading the previous one's output, is
captured in a graph once with the switch off and once on (the switch is read at each launch, so
at capture time); each graph is replayed and timed with CUDA events. Per kernel: time / N. The
difference between the two is what PDL saves a boundary; at small rows the kernels are mostly
boundary, at large rows mostly copy. GPU only:

    TURBOMOE_LIBRARY=.prebuilt/libturbomoe.so PYTHONPATH=python python3 bench/launch_gap_bench.py

Prints one line a row count: µs a kernel without and with PDL, and the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import median_ms

import turbomoe.ops as tops


def chain_graph(x: torch.Tensor, w: torch.Tensor, length: int, pdl: bool) -> torch.cuda.CUDAGraph:
    os.environ["TURBOMOE_PDL"] = "1" if pdl else "0"
    try:

        def body() -> torch.Tensor:
            y = x
            for _ in range(length):
                y = tops.rms_norm(y, w, 1e-6)
            return y

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()  # first launches (kernel attributes, the allocator's blocks) outside capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph
    finally:
        os.environ.pop("TURBOMOE_PDL", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,256,4096", help="comma-separated row counts")
    parser.add_argument("--length", type=int, default=200, help="kernels in the chain")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the results as one JSON object")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_gap_bench needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}: RMSNorm chains of {args.length}, bf16, hidden 2048")
    print(f"{'rows':>6} {'no PDL µs/kernel':>17} {'PDL µs/kernel':>14} {'saved µs':>9}")
    results: dict[str, dict[str, float]] = {}
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
        per_kernel = {}
        for pdl in (False, True):
            graph = chain_graph(x, w, args.length, pdl)
            for _ in range(3):
                graph.replay()
            per_kernel[pdl] = median_ms(graph.replay, args.reps) * 1e3 / args.length
        saved = per_kernel[False] - per_kernel[True]
        print(f"{rows:>6} {per_kernel[False]:>17.2f} {per_kernel[True]:>14.2f} {saved:>9.2f}")
        results[str(rows)] = {"no_pdl_us": per_kernel[False], "pdl_us": per_kernel[True]}
    if args.json is not None:
        config = {"length": args.length, "reps": args.reps, "device": torch.cuda.get_device_name()}
        args.json.write_text(json.dumps({"config": config, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
