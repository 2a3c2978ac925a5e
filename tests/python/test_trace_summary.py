"""bench/trace_summary.py on hand-made traces: busy/idle, hidden communication time (NCCL's and
the NVLink exchange's kernels), blocking calls."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "bench/trace_summary.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _x(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


def test_summary_measures_overlap_idle_and_syncs(tmp_path: Path) -> None:
    events = [
        _x("gemm", "kernel", 0, 100),
        _x("ncclDevKernel_SendRecv", "kernel", 50, 100),  # 50 us under gemm, 50 alone
        _x("cudaStreamSynchronize", "cuda_runtime", 150, 400),
        _x("rmsnorm", "kernel", 500, 50),  # idle gap 150..500 = 350 us
        _x("aten::item", "cpu_op", 140, 420),
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    mod = _module()
    assert mod.intersect([(0, 10), (20, 30)], [(5, 25)]) == 10
    text = mod.summarise(path, steps=1, gaps=3)
    assert "GPU span      0.55 ms   busy      0.20   idle      0.35" in text
    assert "comm      0.10" in text and "hidden behind compute 0.05 ms (50% of comm)" in text
    assert "comm alone (nothing else running) 0.05 ms" in text
    assert "peer barriers" not in text  # no NVLink exchange in this trace
    assert "cudaStreamSynchronize" in text and "aten::item" in text
    assert "0.350 ms at +    0.15" in text


def test_nvlink_exchange_kernels_count_as_communication(tmp_path: Path) -> None:
    barrier = "void turbomoe::peer::(anonymous namespace)::barrier_kernel(Peers, int, int)"
    push = "void turbomoe::peer::(anonymous namespace)::push_kernel(uint4 const*, Peers)"
    events = [
        _x("gemm", "kernel", 0, 100),
        _x(barrier, "kernel", 100, 30),  # waiting alone
        _x(push, "kernel", 130, 20),
        _x(barrier, "kernel", 150, 10),
        _x("gemm2", "kernel", 140, 60),  # overlaps the push's last 10 us and the barrier
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = _module().summarise(path, steps=1, gaps=1)
    assert "comm      0.06" in text and "hidden behind compute 0.02 ms" in text
    assert "peer barriers 0.04 ms (2 calls" in text and "pushes 0.02 ms (1 calls)" in text
