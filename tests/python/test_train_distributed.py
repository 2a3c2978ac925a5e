"""`turbomoe finetune` under torchrun, on CPU: two gloo ranks, expert parallel (train.ep_size=2).

The two ranks are `python -m turbomoe.cli finetune` processes started with the environment
torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so each rank's
stdout and stderr can be read separately. While they run, the one-process reference trains in
this process over the same global batches: each rank takes every other batch of
train.batch_size, so 2 ranks x batch 4 see, step for step, the examples (and the padding) of one
process at batch 4 with train.grad_accum=2. Both normalise the loss by the step's supervised
tokens, so the loss curves, the gradient norms and the final weights agree to rounding.

Checked: exit codes; only rank 0 prints the banner, progress and summary and writes the run
files; the final checkpoint (every expert, gathered from both ranks) loads in stock transformers
in a fresh process with turbomoe disabled, with the reference's weights and logits; a run
resumed from the step-2 checkpoint takes the same step 3 as the uninterrupted run. The same with
the experts placed on the ranks by load (train.ep_placement=load), resumed into that placement.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import turbomoe
from turbomoe.train import FinetuneConfig, finetune
from turbomoe.train.checkpoint import CHECKPOINTS_DIR, step_dir

STEPS = 3
BATCH = 4  # per rank
WORLD = 2
COMMON = [
    f"--max-steps={STEPS}",
    f"--batch-size={BATCH}",
    "--threads=1",
    "--device=cpu",
    "--progress=lines",
    "--log.plots=false",
    "--checkpoint.keep_last=0",
]
PYTHON_DIR = Path(turbomoe.__file__).resolve().parents[1]
TIMEOUT_S = 150.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PYTHON_DIR), env.get("PYTHONPATH", "")) if p
    )
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _start(cmd: list[str], logs: Path, env: dict[str, str]) -> dict[str, Any]:
    """A process whose stdout and stderr go to files (no pipe to fill up while it is polled)."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True)
    return {"proc": proc, "out_path": out, "err_path": err}


def _launch(args: list[str], logs: Path) -> list[dict[str, Any]]:
    """The ranks of one torchrun-style job, each running the CLI's own entry."""
    port = str(_free_port())
    env = {"WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return [
        _start(
            [sys.executable, "-m", "turbomoe.cli", "finetune", *COMMON, *args],
            logs.parent / f"{logs.name}-rank{rank}",
            _env(RANK=str(rank), LOCAL_RANK=str(rank), **env),
        )
        for rank in range(WORLD)
    ]


def _finish(started: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Waits for all; when one fails (its peers would wait in a collective) or the time is up,
    the others are killed. Returns each one's exit code and output."""
    deadline = time.monotonic() + TIMEOUT_S
    procs = [s["proc"] for s in started]
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    results = [
        {
            "rc": s["proc"].returncode,
            "out": s["out_path"].read_text(),
            "err": s["err_path"].read_text(),
        }
        for s in started
    ]
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"process {i} exited {r['rc']}:\n{r['out']}\n{r['err'][-4000:]}"
    return results


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _one_process(output_dir: Path, steps: int, **extra: Any) -> Any:
    """The one-process reference: batch BATCH with grad_accum WORLD sees, step for step, the
    global batches of WORLD ranks at batch BATCH."""
    config = FinetuneConfig.from_values(
        output_dir=str(output_dir),
        max_steps=steps,
        batch_size=BATCH,
        grad_accum=WORLD,
        device="cpu",
        threads=1,
        progress="lines",
        **{"log.plots": False, **extra},
    )
    return finetune(config, echo=lambda _: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("distributed")
    ep2 = root / "ep2"
    procs = _launch(
        [f"--train.output_dir={ep2}", "--train.ep_size=2", "--checkpoint.every_steps=2"],
        root / "ep2",
    )
    try:
        reference = _one_process(root / "one", STEPS)
    finally:
        ranks = _finish(procs)
    # The resumed run and the stock-transformers check run side by side.
    final = step_dir(ep2 / CHECKPOINTS_DIR, STEPS)
    assert reference.checkpoint is not None
    checker = _start(
        [sys.executable, "-c", CHECK_CHECKPOINT, str(final), str(reference.checkpoint)],
        root / "check",
        _env(TURBOMOE_DISABLE="1"),
    )
    resumed = root / "resumed"
    step2 = step_dir(ep2 / CHECKPOINTS_DIR, 2)
    try:
        resumed_ranks = _finish(
            _launch(
                [f"--train.output_dir={resumed}", "--train.ep_size=2", f"--resume={step2}"],
                root / "resumed",
            )
        )
    finally:
        check = _finish([checker])[0]
    return {
        "ep2": ep2,
        "ranks": ranks,
        "reference": reference,
        "resumed": resumed,
        "resumed_ranks": resumed_ranks,
        "check": check,
    }


def test_only_rank_0_prints_and_writes(runs: dict[str, Any]) -> None:
    rank0, rank1 = runs["ranks"]
    assert "batch 4 x 2 ranks (ep 2)" in rank0["out"], rank0["out"]
    assert f"steps        {STEPS}" in rank0["out"] and "checkpoint " in rank0["out"]
    assert "sample       unavailable" not in rank0["out"], rank0["out"]
    assert "step 1  loss" in rank0["err"]
    assert rank1["out"] == "", rank1["out"]
    assert "loss" not in rank1["err"], rank1["err"]

    ep2: Path = runs["ep2"]
    assert [r["step"] for r in _records(ep2)] == list(range(1, STEPS + 1))  # one writer
    assert json.loads((ep2 / "summary.json").read_text())["world_size"] == WORLD
    assert json.loads((ep2 / "run.json").read_text())["world_size"] == WORLD
    checkpoints = ep2 / CHECKPOINTS_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        step_dir(checkpoints, s).name for s in (2, STEPS)
    ]  # and no temporary directory left behind
    final = step_dir(checkpoints, STEPS)
    names = {p.name for p in final.iterdir()}
    assert {f"training_state-rank{r}.pt" for r in range(WORLD)} <= names
    assert "training_state.pt" not in names and "trainer_state.json" in names


def test_loss_curve_matches_one_process(runs: dict[str, Any]) -> None:
    got = _records(runs["ep2"])
    want = _records(runs["reference"].output_dir)
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want, strict=True):
        for key in ("tokens", "supervised_tokens", "epoch"):
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)
        assert abs(g["loss"] - w["loss"]) <= 1e-4, (g["step"], g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), g["step"]
    assert got[-1]["loss"] < got[0]["loss"]  # it trains


def test_resume_takes_the_same_step(runs: dict[str, Any]) -> None:
    """Each rank continues with its own next batch: the resumed step 3 is the uninterrupted one."""
    (resumed,) = _records(runs["resumed"])
    uninterrupted = _records(runs["ep2"])[STEPS - 1]
    assert resumed["step"] == STEPS
    for key in ("tokens", "supervised_tokens"):
        assert resumed[key] == uninterrupted[key], key
    assert abs(resumed["loss"] - uninterrupted["loss"]) <= 1e-6, (resumed, uninterrupted)
    assert "resume   " in runs["resumed_ranks"][0]["out"]


CHECK_CHECKPOINT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    def load(path):
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True
        )
        with safe_open(f"{path}/model.safetensors", framework="pt") as f:
            keys = sorted(f.keys())
        return model.eval(), info, keys

    ep2, info, keys = load(sys.argv[1])
    ref, _, ref_keys = load(sys.argv[2])
    torch.set_grad_enabled(False)
    ids = torch.arange(3, 35).reshape(1, 32)
    logits, want = ep2(input_ids=ids).logits, ref(input_ids=ids).logits
    params = dict(ref.named_parameters())
    worst = max(
        float((p - params[n]).abs().max() / params[n].abs().max().clamp_min(1e-12))
        for n, p in ep2.named_parameters()
    )
    experts = [
        [tuple(t.shape) for t in layer.mlp.experts.parameters()] for layer in ep2.model.layers
    ]
    print(json.dumps({
        "info": {k: sorted(map(str, v)) for k, v in info.items()},
        "keys": keys,
        "same_keys": keys == ref_keys,
        "experts": experts,
        "num_experts": ep2.config.num_experts,
        "layers": ep2.config.num_hidden_layers,
        "worst_param_rel": worst,
        "logits_rel": float((logits - want).abs().max() / want.abs().max()),
        "turbomoe_imported": "turbomoe" in sys.modules,
    }))
    """
)


def test_checkpoint_loads_in_stock_transformers(runs: dict[str, Any]) -> None:
    """Every expert of every layer, gathered from both ranks, with the one-process weights
    (AdamW over the same gradients up to rounding) and logits."""
    got = json.loads(runs["check"]["out"].splitlines()[-1])
    assert not got["turbomoe_imported"]
    assert all(not v for v in got["info"].values()), got["info"]  # no missing/unexpected keys
    assert got["same_keys"]
    n, layers = got["num_experts"], got["layers"]
    assert n == 8
    for layer in range(layers):
        for e in range(n):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in got["keys"]
    for shapes in got["experts"]:
        assert shapes and all(shape[0] == n for shape in shapes), shapes
    assert got["worst_param_rel"] <= 1e-4, got["worst_param_rel"]
    assert got["logits_rel"] <= 1e-4, got["logits_rel"]


def test_validation_with_fewer_batches_than_ranks(tmp_path: Path) -> None:
    """Two validation rows make one batch for two ranks: rank 1 runs a loss-free filler through
    the collective forward (it used to get no batch, and the ranks hung), and the validation
    loss is the one-process loss."""
    out = tmp_path / "ep2val"
    extra = ["--data.val_fraction=0.005", "--max-steps=1"]  # 425 bundled rows → 2 held out
    procs = _launch([f"--train.output_dir={out}", "--train.ep_size=2", *extra], tmp_path / "ep2val")
    try:
        reference = _one_process(tmp_path / "one", 1, **{"data.val_fraction": 0.005})
    finally:
        _finish(procs)
    val = [r["val_loss"] for r in _records(out) if "val_loss" in r]
    assert reference.summary.val_loss is not None
    assert val == [pytest.approx(reference.summary.val_loss, rel=1e-5)]


@pytest.fixture(scope="module")
def placed_runs(runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same training with train.ep_placement=load, and a resume of it from step 2."""
    root = tmp_path_factory.mktemp("placed")
    placed = root / "placed"
    args = ["--train.ep_size=2", "--train.ep_placement=load"]
    _finish(_launch([f"--train.output_dir={placed}", *args, "--checkpoint.every_steps=2"], placed))
    resumed = root / "resumed"
    step2 = step_dir(placed / CHECKPOINTS_DIR, 2)
    _finish(_launch([f"--train.output_dir={resumed}", *args, f"--resume={step2}"], resumed))
    return {"placed": placed, "resumed": resumed, "step2": step2}


def test_placed_experts_train_like_one_process_and_resume(
    runs: dict[str, Any], placed_runs: dict[str, Any]
) -> None:
    """Experts placed by the first batch's routing: the same loss curve as one process, the
    placement kept in each rank's training state, the resumed step 3 the uninterrupted one, and
    the final checkpoint's weights (expert order) those of the contiguous-block run."""
    import torch
    from safetensors.torch import load_file

    got = _records(placed_runs["placed"])
    want = _records(runs["reference"].output_dir)
    for g, w in zip(got, want, strict=True):
        assert abs(g["loss"] - w["loss"]) <= 1e-4, (g["step"], g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), g["step"]
    slots = [
        torch.load(placed_runs["step2"] / f"training_state-rank{r}.pt", weights_only=True)[
            "expert_slots"
        ]
        for r in range(WORLD)
    ]
    assert slots[0] is not None and len(slots[0]) > 0
    moved = sum(int((s != torch.arange(s.numel())).sum()) for s in slots[0])
    assert moved > 0, "the placement is the contiguous blocks: the resume path went untested"
    for rank_slots in slots:
        for a, b in zip(rank_slots, slots[0], strict=True):
            assert torch.equal(a, b)  # every rank saved the same placement
            assert sorted(a.tolist()) == list(range(a.numel()))
    (resumed,) = _records(placed_runs["resumed"])
    uninterrupted = got[STEPS - 1]
    assert resumed["step"] == STEPS
    assert abs(resumed["loss"] - uninterrupted["loss"]) <= 1e-6, (resumed, uninterrupted)

    final = step_dir(placed_runs["placed"] / CHECKPOINTS_DIR, STEPS)
    blocks = step_dir(runs["ep2"] / CHECKPOINTS_DIR, STEPS)
    placed_weights = load_file(str(final / "model.safetensors"))
    block_weights = load_file(str(blocks / "model.safetensors"))
    assert placed_weights.keys() == block_weights.keys()
    for key, value in block_weights.items():
        diff = float((placed_weights[key].float() - value.float()).norm())
        assert diff <= 1e-4 * max(float(value.float().norm()), 1e-12), key


def test_replanned_experts_train_like_one_process(runs: dict[str, Any], tmp_path: Path) -> None:
    """train.ep_replan_every=1: the experts are placed again before every step (their moments
    moving with them), and the loss curve and gradient norms stay those of one process."""
    out = tmp_path / "replan"
    args = ["--train.ep_size=2", "--train.ep_placement=load", "--train.ep_replan_every=1"]
    ranks = _finish(_launch([f"--train.output_dir={out}", *args], out))
    got = _records(out)
    want = _records(runs["reference"].output_dir)
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want, strict=True):
        assert abs(g["loss"] - w["loss"]) <= 1e-4, (g["step"], g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), g["step"]
    placed = [line for line in ranks[0]["out"].splitlines() if "placed again" in line]
    assert [line.split("before step ")[1].split(":")[0] for line in placed] == [
        str(step) for step in range(2, STEPS + 1)
    ], placed
    # Routing changed between steps, so experts really moved (else this tests nothing).
    assert sum(int(line.rsplit(": ", 1)[1].split()[0]) for line in placed) > 0, placed
    assert all("placed again" not in line for line in ranks[1]["out"].splitlines())


def test_replanning_needs_placement_by_load() -> None:
    from turbomoe.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"ep_replan_every .* needs train\.ep_placement=load"):
        FinetuneConfig.from_values(
            output_dir="unused", max_steps=1, **{"train.ep_replan_every": 2}
        ).validate()
