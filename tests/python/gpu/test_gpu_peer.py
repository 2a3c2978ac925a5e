"""The NVLink peer exchange (tm_peer_*, turbomoe.parallel.nvlink) on 2-4 GPUs under torchrun.

Needs at least two GPUs: with one it is skipped (reported as skipped, not passed). Bitwise equal
to NCCL's all-to-all across dtypes, block sizes, buffer growth, the backward and CUDA-graph
replays; a peer that leaves makes the exchange fail within the time-out instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

MAIN = Path(__file__).resolve().parent / "peer_exchange_main.py"


def _world() -> int:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"the NVLink exchange needs 2 or more GPUs, this machine has {gpus}")
    return 4 if gpus >= 4 else 2


def _torchrun(world: int, args: list[str], env: dict[str, str], timeout: float):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={world}", str(MAIN), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_peer_exchange_is_bitwise_nccl(tmp_path: Path) -> None:
    world = _world()
    out = tmp_path / "peer.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = _torchrun(world, ["exact", str(out)], env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == world
    assert len(report["ranks"]) == world
    for rank, verdicts in enumerate(report["ranks"]):
        assert len(verdicts) == 9, verdicts
        assert all(verdicts.values()), f"rank {rank}: {verdicts}"


def test_missing_peer_fails_instead_of_hanging(tmp_path: Path) -> None:
    world = _world()
    env = dict(os.environ, OMP_NUM_THREADS="1", TURBOMOE_EP_PEER_TIMEOUT_S="3")
    start = time.monotonic()
    proc = _torchrun(world, ["timeout", str(tmp_path / "unused.json")], env, timeout=150)
    took = time.monotonic() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "PEER-TIMEOUT-RAISED" in text, text[-3000:]
    assert re.search(r"waited more than 3\.0 s for rank [1-9]", text), text[-3000:]
    assert took < 120, f"took {took:.0f} s"
