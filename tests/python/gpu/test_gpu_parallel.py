"""Expert parallelism on GPUs: N ranks over NCCL (torchrun, one GPU each) against one GPU.

Needs at least two GPUs: with one it is skipped (reported as skipped, not passed). Uses every GPU
up to four. Tolerances: float32 loss and gradient norm 1e-5, gradients 1e-4 (as the gloo tests);
bfloat16 loss 2e-2 and gradients 5e-2 (bf16 rounding at different points of the sums).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

MAIN = Path(__file__).resolve().parent / "ep_parity_main.py"
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (2e-2, 5e-2)}


@pytest.mark.parametrize(
    ("family", "dtype", "env"),
    [
        ("qwen3_moe", "bf16", {}),
        ("qwen3_moe", "fp32", {}),
        ("deepseek_v3", "bf16", {}),
        ("deepseek_v3", "fp32", {}),
        # the exchanges in token chunks on a side stream, overlapped with the experts
        ("qwen3_moe", "fp32", {"TURBOMOE_EP_CHUNKS": "2"}),
        ("qwen3_moe", "bf16", {"TURBOMOE_EP_CHUNKS": "3"}),
        # the owner's lean autograd record
        ("qwen3_moe", "fp32", {"TURBOMOE_EP_RECOMPUTE": "1"}),
        ("deepseek_v3", "bf16", {"TURBOMOE_EP_RECOMPUTE": "1", "TURBOMOE_EP_CHUNKS": "2"}),
        # the experts placed on ranks by load (turbomoe.parallel.balance_experts)
        ("deepseek_v3", "bf16", {"TM_TEST_PLACEMENT": "balanced"}),
        ("qwen3_moe", "fp32", {"TM_TEST_PLACEMENT": "random"}),
    ],
    ids=[
        "qwen3_moe-bf16",
        "qwen3_moe-fp32",
        "deepseek_v3-bf16",
        "deepseek_v3-fp32",
        "qwen3_moe-fp32-chunks2",
        "qwen3_moe-bf16-chunks3",
        "qwen3_moe-fp32-recompute",
        "deepseek_v3-bf16-recompute-chunks2",
        "deepseek_v3-bf16-placed-by-load",
        "qwen3_moe-fp32-placed-at-random",
    ],
)
def test_expert_parallel_matches_one_gpu(
    family: str, dtype: str, env: dict[str, str], tmp_path: Path
) -> None:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"expert parallelism on GPUs needs 2 or more, this machine has {gpus}")
    world = 4 if gpus >= 4 else 2
    out = tmp_path / "parity.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={world}", str(MAIN), family, dtype, str(out)]
    run_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert report["world"] == world
    assert report["missing"] == [], report
    assert report["grads_compared"] > 10, report
    assert report["loss_rel"] <= loss_tol, report
    assert report["norm_rel"] <= loss_tol * 10, report
    assert report["grad_rel_max"] <= grad_tol, report
    chunked = int(env.get("TURBOMOE_EP_CHUNKS", "1")) > 1
    assert report["gemm_sm_margin"] == (18 if chunked else 0), report  # 16 push SMs + 2


def test_expert_parallel_step_captured_in_one_graph(tmp_path: Path) -> None:
    """EP 2 over NVLink: GraphedStep captures forward, exchanges, backward and the dense
    gradients' all-reduce, and its replays give the eager step's loss and gradients."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"expert parallelism on GPUs needs 2 or more, this machine has {gpus}")
    out = tmp_path / "graph.json"
    main = Path(__file__).resolve().parent / "ep_graph_main.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(main), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["captures"] == 1 and report["replays"] == 3, report
    assert report["eager_steps"] == 1 and report["missing"] == [], report
    assert report["loss_rel_max"] <= 1e-5, report
    assert report["grad_rel_max"] <= 1e-4, report
