"""bench/ep_dispatch_bench.py on CPU: 2 gloo ranks, sparse routing (top-2 of 16 experts, so
tokens go to one rank or both and the fixed blocks carry padding); dispatch and combine must be
bitwise exact on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import turbomoe

REPO = Path(__file__).resolve().parents[2]


def test_dispatch_bench_is_exact_on_two_gloo_ranks(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(turbomoe.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "bench" / "ep_dispatch_bench.py"), "--tokens", "96", "--hidden", "40"]
    cmd += ["--experts", "16", "--top-k", "2", "--reps", "2", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exact: yes" in proc.stdout
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["gloo_dispatch_exact"] and r["gloo_combine_exact"]
        assert r["gloo_dispatch_ms"] > 0 and r["gloo_combine_ms"] > 0
        assert r["all_to_all_peak_gbs"] > 0
