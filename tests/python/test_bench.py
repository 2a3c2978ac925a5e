"""``turbomoe bench`` on CPU: the FLOP formula, the end-to-end tiny run and its outputs, the
environment errors. The GPU protocol itself runs in scripts/gpu_suite.sh."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import turbomoe
from turbomoe.bench import main
from turbomoe.bench.flops import active_matmul_params, flops_per_token
from turbomoe.bench.models import FAMILIES, build_model, qwen3_30b_a3b_config, tiny_config
from turbomoe.bench.report import compare, git_commit
from turbomoe.bench.runner import RunResult
from turbomoe.bench.timing import measure_matmul_peak_tflops


def test_flops_qwen3_30b_a3b_hand_count() -> None:
    """DESIGN §6: 6 × 3.04 B active matmul params + causal attention ≈ 23.1 GFLOP/token."""
    hidden, heads, kv_heads, head_dim = 2048, 32, 4, 128
    experts, top_k, ffn, vocab, layers, seq = 128, 8, 768, 151_936, 48, 4096
    attention = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    moe = hidden * experts + top_k * 3 * hidden * ffn  # router + 8 experts' gate/up/down
    params = layers * (attention + moe) + hidden * vocab  # + lm_head
    # QKᵀ and PV: 2 matmuls × 2 FLOP × heads × head_dim × seq/2 keys (causal), × 3 for fwd+bwd.
    attention_flops = layers * 3 * 2 * 2 * heads * head_dim * seq / 2
    hand = 6 * params + attention_flops

    config = qwen3_30b_a3b_config(layers)
    assert active_matmul_params(config).total == params
    assert params == pytest.approx(3.04e9, rel=2e-3)
    assert flops_per_token(config, seq) == pytest.approx(hand, rel=1e-12)
    assert flops_per_token(config, seq) == pytest.approx(23.1e9, rel=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_active_params_match_built_model(family: str) -> None:
    """The formula against the parameters a built model really has: every matrix except the
    embedding counts, routed experts scaled by top_k / num_experts."""
    config = tiny_config(family, layers=2)
    model = build_model(
        config, device=torch.device("cpu"), dtype=torch.float32, seed=0,
        experts_implementation="eager",
    )  # fmt: skip
    counted = 0.0
    for name, param in model.named_parameters():
        if param.dim() < 2 or "embed_tokens" in name:
            continue
        if ".experts." in name:
            counted += param.numel() * config.num_experts_per_tok / param.shape[0]
        else:
            counted += param.numel()
    assert active_matmul_params(config).total == pytest.approx(counted, rel=1e-12)


def test_matmul_peak_is_timed_after_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GEMM peak is measured after warmup_s seconds of the same matmul (a GPU fresh from idle
    runs its first milliseconds at low clocks, which read 15% under the peak), and every call
    before the timed ones counts as warm-up, not as a sample."""
    calls: list[float] = []
    real_matmul = torch.matmul

    def counting_matmul(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(time.perf_counter())
        return real_matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", counting_matmul)
    start = time.perf_counter()
    tflops = measure_matmul_peak_tflops(torch.device("cpu"), torch.float32, 32, 5, warmup_s=0.3)
    assert tflops > 0
    assert len(calls) > 5 + 4 and calls[-5] - start >= 0.3  # timing starts after the warm-up
    calls.clear()
    measure_matmul_peak_tflops(torch.device("cpu"), torch.float32, 32, 5, warmup_s=0.0)
    assert len(calls) == 4 + 5  # one round of warm-up, then the timed calls


def test_compare_flags_loss_mismatch() -> None:
    hf = RunResult("hf", "stock transformers", False, True, first_loss=10.0, tps_per_gpu=100.0)
    tm = RunResult("turbomoe", "turbomoe", True, True, first_loss=11.0, tps_per_gpu=150.0)
    ratios, failures = compare({"hf": hf, "turbomoe": tm}, rtol=5e-2)
    assert ratios["speedup"] == pytest.approx(1.5)
    assert not ratios["loss_check"]["ok"]
    assert any("loss mismatch" in f for f in failures)
    tm.first_loss = 10.001
    ratios, failures = compare({"hf": hf, "turbomoe": tm}, rtol=5e-2)
    assert ratios["loss_check"]["ok"] and not failures


def test_cpu_tiny_end_to_end(tmp_path: Path) -> None:
    """Both runs, JSON + PNG + profile + benchmarks.jsonl line, patch state left as found."""
    before = turbomoe.patched_families()
    out = {k: tmp_path / n for k, n in [("json", "b.json"), ("png", "b.png"), ("md", "p.md")]}
    record = tmp_path / "docs" / "benchmarks.jsonl"
    # fp32: bf16 matmuls are very slow on CPUs without bf16 instructions; the CPU run is a
    # smoke test of the machinery, the bf16 protocol runs on the GPU.
    argv = ["--device", "cpu", "--tiny", "--dtype", "fp32", "--json", str(out["json"])]
    argv += ["--png", str(out["png"]), "--profile", "--profile-out", str(out["md"])]
    argv += ["--profile-steps", "1", "--record", "--record-path", str(record)]
    argv += ["--trace-dir", str(tmp_path / "traces")]
    assert main(argv) == 0
    assert turbomoe.patched_families() == before

    payload = json.loads(out["json"].read_text())
    assert payload["ok"] and not payload["failures"]
    assert payload["config"]["tiny"] and payload["world_size"] == 1
    assert payload["flops_per_token"] > 0 and payload["peak_tflops"] > 0
    assert set(payload["runs"]) == {"hf", "turbomoe"}
    steps = payload["config"]["warmup"] + payload["config"]["steps"]
    for name, run in payload["runs"].items():
        assert run["error"] is None, run["error"]
        assert run["patch_in_effect"], name
        assert run["tps_per_gpu"] > 0 and run["tflops_per_gpu"] > 0 and run["mfu"] > 0
        assert 0 < run["step_ms_min"] <= run["step_ms_mean"] <= run["step_ms_max"]
        assert run["fwd_ms_mean"] > 0 and run["bwd_ms_mean"] > 0
        assert len(run["losses"]) == steps and all(math.isfinite(x) for x in run["losses"])
        # Random init: the loss starts near ln(vocab).
        assert abs(run["first_loss"] - math.log(payload["config"]["vocab"])) < 1.0
    runs = payload["runs"]
    # Both runs route the first batch with the same weights: the same record, one per layer.
    routing = runs["hf"]["routing"]
    assert routing is not None and routing["layers"] == payload["config"]["layers"]
    assert routing == runs["turbomoe"]["routing"]
    assert runs["hf"]["experts_implementation"] == "grouped_mm (transformers)"
    assert "turbomoe" in runs["turbomoe"]["experts_implementation"]
    ratios = payload["ratios"]
    assert ratios["same_weights"] and ratios["speedup"] > 0
    check = ratios["loss_check"]
    assert check["ok"] and check["rel_diff"] <= 5e-2
    assert check["hf"] == runs["hf"]["first_loss"]

    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = out["md"].read_text()
    assert "## stock transformers" in profile and "## turbomoe" in profile
    for name in ("hf", "turbomoe"):  # one gzipped Chrome trace per run (rank 0)
        with gzip.open(tmp_path / "traces" / f"trace_{name}_rank0.json.gz", "rt") as f:
            assert any(e.get("ph") == "X" for e in json.load(f)["traceEvents"])
    line = json.loads(record.read_text().splitlines()[-1])
    assert line["layers"] == 1 and line["speedup"] == pytest.approx(ratios["speedup"])
    assert line["command"].startswith("turbomoe bench --device cpu")
    for field in ["date", "commit", "gpu", "world_size", "seq", "batch", "hf_tps_per_gpu"]:
        assert line[field] is not None, field
    for field in ["tm_tps_per_gpu", "hf_peak_gib", "tm_peak_gib", "tm_tflops_per_gpu"]:
        assert field in line
    assert line["hf_tflops_per_gpu"] > 0 and line["tm_mfu"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_no_cuda_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "hf"]) == 2
    assert "--device cpu" in capsys.readouterr().err


@pytest.mark.parametrize(("ranks", "placement"), [(2, "blocks"), (2, "load"), (8, "load")])
def test_gloo_ranks_fsdp_against_expert_parallel(
    ranks: int, placement: str, tmp_path: Path
) -> None:
    """The multi-GPU protocol on CPU: torchrun with gloo ranks, stock under per-layer FSDP2 and
    turbomoe with expert parallelism over all of them (experts in blocks or placed by load; at 8
    ranks one expert each, the shape of the 8-GPU headline run), one JSON written by rank 0
    only."""
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(turbomoe.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
    )
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={ranks}"]
    cmd += ["-m", "turbomoe.bench", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    cmd += ["--json", str(out), "--ep-placement", placement]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("turbomoe / stock:") == 1  # rank 0 alone prints the table
    payload = json.loads(out.read_text())
    assert payload["world_size"] == ranks and payload["ok"]
    hf, tm = payload["runs"]["hf"], payload["runs"]["turbomoe"]
    assert hf["parallelism"] == f"FSDP2 per layer over {ranks}"
    placed = ", experts placed by load" if placement == "load" else ""
    assert tm["parallelism"] == f"EP {ranks} over gloo, dense replicated" + placed
    for run in (hf, tm):
        assert run["error"] is None
        assert len(run["tps_per_rank"]) == ranks and min(run["tps_per_rank"]) > 0
        # Counted on every rank and summed: the rank load at this EP size is reported.
        assert str(ranks) in run["routing"]["ep_busiest_over_mean"]
        assert run["tps_per_gpu"] == pytest.approx(sum(run["tps_per_rank"]) / ranks)
    check = payload["ratios"]["loss_check"]
    assert check["ok"] and check["rel_diff"] < 1e-3  # same rank-0 batch, same weights


def test_recorded_commit_names_what_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HEAD of a clean tree; HEAD-dirty once a tracked file differs from it (a copied tree whose
    git metadata is older than its files); TURBOMOE_BENCH_COMMIT over both."""
    monkeypatch.delenv("TURBOMOE_BENCH_COMMIT", raising=False)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(tmp_path) == head + "-dirty"
    monkeypatch.setenv("TURBOMOE_BENCH_COMMIT", "4ab7474")
    assert git_commit(tmp_path) == "4ab7474"
    monkeypatch.delenv("TURBOMOE_BENCH_COMMIT")
    assert git_commit(tmp_path / "code.py") == "unknown"  # not a directory git can run in
