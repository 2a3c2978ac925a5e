"""bench/trace_summary.py on a hand-made trace: busy/idle, hidden NCCL time, blocking calls."""

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
    assert "NCCL      0.10" in text and "hidden behind compute 0.05 ms (50% of NCCL)" in text
    assert "NCCL alone (nothing else running) 0.05 ms" in text
    assert "cudaStreamSynchronize" in text and "aten::item" in text
    assert "0.350 ms at +    0.15" in text
