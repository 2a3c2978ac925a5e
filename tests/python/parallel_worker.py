"""Multi-process helpers for the expert-parallel tests (test_parallel*.py).

``run_ranks`` forks one process per rank from the test process and joins a gloo process group
through a file. Forking (not spawning) matters on the small CPU machines the suite runs on:
the children share the parent's already imported torch/transformers/turbomoe instead of paying
~10 s of imports each, and they inherit the exact model the parent built, so every rank starts
from the same weights without relying on seeds. Each child runs one scenario function and
leaves its result (``torch.save``) or its traceback in the test's temporary directory.

The scenario functions below run inside the children.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

import turbomoe.parallel as tp
from turbomoe.parallel import split_param_groups
from turbomoe.parallel.checkpoint import gather_experts
from turbomoe.parallel.dispatch import expert_shard
from turbomoe.parallel.grads import DTensor
from turbomoe.parallel.shard import EXPERT_WEIGHTS, find_experts, shard_experts

VOCAB = 128
HIDDEN = 64
EXPERTS = 8

# ------------------------------------------------------------------------------ tiny models


def tiny_config(family: str, **overrides: Any) -> Any:
    """hidden 64, 8 experts top-2, 2 MoE layers, vocab 128."""
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "initializer_range": 0.1,  # a decisive router: top-k never hinges on a rounding error
        "num_experts_per_tok": 2,
        "attn_implementation": "eager",
    }
    if family == "qwen3_moe":
        fields = {
            **common,
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "num_experts": EXPERTS,
            "norm_topk_prob": True,
            "head_dim": 16,
        }
        config: Any = Qwen3MoeConfig(**{**fields, **overrides})
    elif family == "mixtral":
        fields = {**common, "intermediate_size": 32, "num_local_experts": EXPERTS}
        config = MixtralConfig(**{**fields, **overrides})
    elif family == "deepseek_v3":
        fields = {
            **common,
            "num_key_value_heads": 4,
            "intermediate_size": 64,
            "moe_intermediate_size": 32,
            "n_routed_experts": EXPERTS,
            "n_group": 1,
            "topk_group": 1,
            "n_shared_experts": 1,
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 2.5,
            "q_lora_rank": 24,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
        }
        config = DeepseekV3Config(**{**fields, **overrides})
    else:
        raise ValueError(family)
    return config


def build(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A float32 tiny model in train mode. DeepSeek-V3's correction bias shuts experts 6 and 7
    out entirely (no token ever reaches them), so expert-parallel rank 3 of 4 receives nothing."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.linspace(-0.05, 0.05, bias.numel()))
                bias[6:] = -100.0
    model.train()
    return model


def make_batch(seed: int, batch: int = 2, seq: int = 8, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; the last ``pad`` positions of row 0 are padding and one more label of
    the last row is ignored, so ranks hold different numbers of labelled tokens."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad:
        mask[0, seq - pad :] = 0
        labels[0, seq - pad :] = -100
    labels[-1, 1 + seed % (seq - 1)] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss counts (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------- launcher


def _child(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    workdir: Path,
    pg_timeout_s: float,
    args: tuple[Any, ...],
) -> None:
    code = 1
    try:
        torch.set_num_threads(1)  # 8 ranks share 2 cores
        dist.init_process_group(
            "gloo",
            init_method=f"file://{workdir / 'pg_init'}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world, *args)
        torch.save(result, workdir / f"result{rank}.pt")
        code = 0
        dist.destroy_process_group()
    except BaseException:
        (workdir / f"error{rank}.txt").write_text(traceback.format_exc())
    finally:
        os._exit(code)  # never run the parent's (pytest's) exit handlers in a fork


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    workdir: Path,
    *args: Any,
    timeout_s: float = 55.0,
    pg_timeout_s: float = 45.0,
    wait_for: list[int] | None = None,
) -> list[Any]:
    """Run fn(rank, world, *args) on ``world`` forked gloo ranks; returns each rank's result.

    ``wait_for``: ranks whose end is awaited (the rest are killed then; default all). Raises
    AssertionError with the failing ranks' tracebacks, or when a rank outlives timeout_s.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world, workdir, pg_timeout_s, args))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    awaited = range(world) if wait_for is None else wait_for
    for rank in awaited:
        procs[rank].join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank in awaited if procs[rank].is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = {
        rank: (workdir / f"error{rank}.txt").read_text()
        for rank in range(world)
        if (workdir / f"error{rank}.txt").exists()
    }
    if errors or hung:
        detail = "\n".join(f"--- rank {rank}:\n{text}" for rank, text in sorted(errors.items()))
        raise AssertionError(f"ranks {sorted(errors)} failed, ranks {hung} hung:\n{detail}")
    return [
        torch.load(workdir / f"result{rank}.pt", weights_only=False)
        if (workdir / f"result{rank}.pt").exists()
        else None
        for rank in range(world)
    ]


# ------------------------------------------------------------------------------ collection


def full_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient, unsharded (FSDP shards and expert shards gathered)."""
    sharded = {
        f"{name}.{weight}": expert_shard(module)
        for name, module in find_experts(model)
        for weight in EXPERT_WEIGHTS
    }
    out: dict[str, torch.Tensor | None] = {}
    for name, p in model.named_parameters():
        grad = p.grad
        shard = sharded.get(name)
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        elif shard is not None and shard.ep_size > 1:
            local = grad if grad is not None else torch.zeros_like(p)
            grad = gather_experts(local, shard)  # expert order, whatever the placement
        out[name] = None if grad is None else grad.detach().clone()
    return out


# ------------------------------------------------------------------------------- scenarios


def parity_worker(
    rank: int,
    world: int,
    base: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    ep_size: int,
    fsdp: bool | None,
    grad_sync: str,
    checkpointing: bool = False,
    placement: str | None = None,
) -> dict[str, Any]:
    """One forward/backward of this rank's batch; the loss is normalised by the global label
    count and scaled by the world size, because gradients are averaged over ranks. Also the
    gradient norm clip_grad_norm_ finds (with a bound that clips nothing).

    ``placement``: the experts first placed on ranks by load ("balanced": from this rank's
    batch, counted over all ranks) or by a seeded random permutation per layer ("random"); then
    also the slots, the gathered weights after placing (expert order) and the error of placing
    again after the backward."""
    model = copy.deepcopy(base)
    if checkpointing:  # the layer forwards, token exchanges included, rerun inside backward
        model.gradient_checkpointing_enable()
    tp.parallelize(model, ep_size=ep_size, fsdp=fsdp, grad_sync=grad_sync)  # type: ignore[arg-type]
    placed: dict[str, Any] = {}
    if placement == "balanced":
        placed["slots"] = tp.balance_experts(model, batches[rank])
    elif placement == "random":
        gen = torch.Generator().manual_seed(1234)  # the same slots on every rank
        layers = len([m for _, m in find_experts(model) if expert_shard(m) is not None])
        placed["slots"] = [torch.randperm(EXPERTS, generator=gen) for _ in range(layers)]
        tp.place_experts(model, placed["slots"])
    if placement is not None:
        placed["weights"] = tp.full_state_dict(model, rank0_only=False)
    total = sum(label_count(b) for b in batches)
    out = model(**batches[rank], num_items_in_batch=total)
    (out.loss * world).backward()
    if grad_sync == "manual":
        tp.sync_grads(model)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    norm = tp.clip_grad_norm_(model, 1e9)
    if placement is not None:
        try:
            tp.place_experts(model, placed["slots"])
            placed["late"] = ""
        except ValueError as exc:
            placed["late"] = str(exc)
    return {"loss": loss, "grads": full_grads(model), "norm": norm, **placed}


def replaced_training_worker(
    rank: int,
    world: int,
    base: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    move_optimizer: bool,
) -> dict[str, Any]:
    """Two AdamW steps on expert parallelism over every rank, the experts placed at random
    between them (with the optimizer's states moved along, or left where they were); returns
    the full weights after the second step, in expert order."""
    model = copy.deepcopy(base)
    tp.parallelize(model, ep_size=world)
    optimizer = torch.optim.AdamW(
        split_param_groups(p for p in model.parameters()), lr=1e-2, foreach=False
    )
    layers = len([m for _, m in find_experts(model) if expert_shard(m) is not None])
    gen = torch.Generator().manual_seed(99)  # the same slots on every rank
    slots = [torch.randperm(EXPERTS, generator=gen) for _ in range(layers)]
    total = sum(label_count(b) for b in batches)
    for step in range(2):
        out = model(**batches[rank], num_items_in_batch=total)
        (out.loss * world).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            tp.place_experts(model, slots, optimizer if move_optimizer else None)
    return {"weights": tp.full_state_dict(model, rank0_only=False)}


def dispatch_worker(
    rank: int,
    world: int,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    rounds: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]],
) -> list[dict[str, torch.Tensor]]:
    """ep_experts_forward on hand-made routing; each round gives every rank (hidden, ids,
    weights, output projection). Returns the outputs and gradients of each round."""
    holder = nn.Module()
    holder.experts = nn.Module()
    holder.experts.gate_up_proj = nn.Parameter(gate_up.clone())
    holder.experts.down_proj = nn.Parameter(down.clone())
    shard_experts(holder, tp.build_mesh(world))
    results = []
    for per_rank in rounds:
        hidden, ids, weights, proj = per_rank[rank]
        hidden = hidden.clone().requires_grad_()
        weights = weights.clone().requires_grad_()
        holder.zero_grad(set_to_none=True)
        out = tp.ep_experts_forward(holder.experts, hidden, ids, weights)
        (out * proj).sum().backward()
        grads = full_grads(holder)
        results.append(
            {
                "out": out.detach(),
                "hidden": hidden.grad,
                "weights": weights.grad,
                "gate_up": grads["experts.gate_up_proj"],
                "down": grads["experts.down_proj"],
            }
        )
    # An expert id out of range on rank 0 only: every rank raises (none waits for the others).
    hidden, ids, weights, _ = rounds[0][rank]
    bad = ids.clone()
    if rank == 0:
        bad[0, 0] = gate_up.shape[0] + 3
    try:
        tp.ep_experts_forward(holder.experts, hidden, bad, weights)
    except ValueError as exc:
        results.append({"error": str(exc)})
    return results


def save_worker(
    rank: int,
    world: int,
    base: nn.Module,
    odd: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    path: Path,
) -> dict[str, Any]:
    """Bad ep sizes raise; then train one step (ep = 2, FSDP), save, reload with turbomoe's
    loader, and report both models' logits on this rank's batch."""
    errors: dict[str, str] = {}
    for key, model_, ep in (("world", base, 3), ("experts", odd, 2), ("zero", base, 0)):
        try:
            tp.parallelize(copy.deepcopy(model_), ep_size=ep)
        except ValueError as exc:
            errors[key] = str(exc)
    model = copy.deepcopy(base)
    tp.parallelize(model, ep_size=2, fsdp=True)
    # A multi-tensor AdamW over FSDP's DTensors and the plain expert shards: one kernel per
    # group, so the two kinds must be in separate groups (mixed, torch raises).
    optimizer = torch.optim.AdamW(split_param_groups(model.parameters()), lr=0.05, foreach=True)
    batch = batches[rank]
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(path)
    loaded = tp.AutoModelForCausalLM.from_pretrained(path, ep_size=2)
    with torch.no_grad():
        reloaded = loaded(**inputs).logits
    return {"errors": errors, "logits": logits, "reloaded": reloaded}


def load_worker(
    rank: int, world: int, paths: list[Path], batches: list[dict[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """Load each checkpoint with ep = world and return the logits on this rank's batch."""
    inputs = {k: v for k, v in batches[rank].items() if k != "labels"}
    out = []
    for path in paths:
        model = tp.AutoModelForCausalLM.from_pretrained(path, ep_size=world)
        local = {
            tuple(expert_shard(m).expert_range) for _, m in find_experts(model) if expert_shard(m)
        }
        assert local == {(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)}, local
        with torch.no_grad():
            out.append(model(**inputs).logits)
    return out


def timeout_worker(
    rank: int, world: int, base: nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, Any] | None:
    """Rank 1 never joins the forward; rank 0 must get an error, not hang."""
    model = copy.deepcopy(base)
    tp.parallelize(model, ep_size=world)
    dist.barrier()
    if rank != 0:
        time.sleep(120)
        return None
    start = time.monotonic()
    try:
        model(**batch)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def capacity_worker(rank: int, world: int, base: nn.Module, seqs: list[int]) -> dict[str, Any]:
    """Ranks with different token counts: how many times the ep group agreed on the exchange
    size during one forward + backward (gradient checkpointing on, so the backward recomputes
    the layers), and the size they agreed on; then this rank's loss and gradients."""
    from turbomoe.parallel import dispatch

    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable()
    tp.parallelize(model, ep_size=world)
    calls: list[int] = []
    original = dispatch._agree

    def counting(*args: Any, **kwargs: Any) -> tuple[int, bool]:
        calls.append(1)
        return original(*args, **kwargs)

    dispatch._agree = counting
    try:
        batch = make_batch(seed=rank, batch=1, seq=seqs[rank])
        out = model(**batch)
        out.loss.backward()
    finally:
        dispatch._agree = original
    shard = next(s for m in model.modules() if (s := dispatch.expert_shard(m)) is not None)
    return {"agreements": len(calls), "capacity": shard.capacity.value, "loss": out.loss.detach()}


def overlap_worker(rank: int, world: int, base: nn.Module) -> dict[str, Any]:
    """The dense all-reduce overlapped with the backward (grad_sync="auto", small buckets) against
    sync_grads after the last backward ("manual"), over two accumulated micro-batches. Two extra
    dense parameters: one feeds rank 0's loss only (None on the other ranks), one feeds nothing
    (None everywhere)."""
    os.environ["TURBOMOE_DENSE_OVERLAP"] = "1"  # off by default; this process only
    from turbomoe.parallel import grads

    grads._BUCKET_ELEMENTS = 4096  # many buckets, so that most launch inside the backward
    out: dict[str, Any] = {}
    for mode in ("auto", "manual"):
        model = copy.deepcopy(base)
        model.model.only_rank0 = nn.Parameter(torch.ones(3))
        model.model.unused = nn.Parameter(torch.ones(2))
        tp.parallelize(model, ep_size=world, grad_sync=mode)  # type: ignore[arg-type]
        for micro in range(2):
            loss = model(**make_batch(seed=10 * rank + micro)).loss * world
            if rank == 0:
                loss = loss + (micro + 1) * model.model.only_rank0.sum()
            loss.backward()
        if mode == "manual":
            tp.sync_grads(model)
        out[mode] = full_grads(model)
        state = grads.parallel_state(model)
        if state.overlap is not None:
            out["early"] = state.overlap.launched_during_backward
            out["buckets"] = len(state.overlap.buckets)
    return out


def overlap_recovery_worker(rank: int, world: int, base: nn.Module) -> dict[str, Any]:
    """A backward that raises halfway (after some buckets were launched), then a full step: the
    step's gradients must be those of a model that never saw the failed backward."""
    os.environ["TURBOMOE_DENSE_OVERLAP"] = "1"  # off by default; this process only
    from turbomoe.parallel import grads

    grads._BUCKET_ELEMENTS = 4096
    batch = make_batch(seed=20 + rank)
    out: dict[str, Any] = {}
    for name, fail_first in (("recovered", True), ("clean", False)):
        model = copy.deepcopy(base)
        tp.parallelize(model, ep_size=world)
        if fail_first:
            hidden = model.model.layers[0].register_full_backward_hook(_raise_in_backward)
            try:
                (model(**batch).loss * world).backward()
            except RuntimeError as exc:
                assert "planned failure" in str(exc), exc
            else:
                raise AssertionError("the backward did not fail")
            hidden.remove()
            state = grads.parallel_state(model)
            assert state.overlap is not None and state.overlap.in_backward
            model.zero_grad(set_to_none=True)
        (model(**batch).loss * world).backward()
        out[name] = full_grads(model)
    return out


def _raise_in_backward(*_: Any) -> None:
    raise RuntimeError("planned failure in the backward of layer 0")


def with_env_worker(
    rank: int, world: int, env: dict[str, str], worker: Callable[..., Any], *args: Any
) -> Any:
    """``worker`` with ``env`` set in this rank's process (forked: nothing leaks back)."""
    os.environ.update(env)
    return worker(rank, world, *args)


def chunks_mismatch_worker(rank: int, world: int, base: nn.Module) -> str:
    """Every rank sets a different TURBOMOE_EP_CHUNKS (with 2 ranks: rank 1 an invalid one): the
    forward must fail on every rank with a clear error, not hang in mismatched exchanges or in
    the agreement."""
    os.environ["TURBOMOE_EP_CHUNKS"] = str(1 + rank) if world > 2 or rank == 0 else "x"
    model = copy.deepcopy(base)
    tp.parallelize(model, ep_size=world)
    try:
        model(**make_batch(seed=rank))
    except ValueError as exc:
        return str(exc)
    return "no error"


def graph_step_worker(rank: int, world: int, base: nn.Module) -> dict[str, Any]:
    """GraphedStep over an expert-parallel model (on CPU it runs each step eagerly, after
    agreeing nothing extra): the same loss and gradients as the plain step, twice in a row."""
    from turbomoe.train.graph_step import GraphedStep

    batch = make_batch(seed=rank)
    plain = copy.deepcopy(base)
    tp.parallelize(plain, ep_size=world)
    graphed = copy.deepcopy(base)
    tp.parallelize(graphed, ep_size=world)
    step = GraphedStep(graphed, warmup_steps=1)
    out: dict[str, Any] = {"parallel": step.parallel, "same": []}
    for _ in range(2):
        want = plain(**batch).loss
        want.backward()
        got = step(**batch)
        same = torch.equal(got, want.detach())
        want_grads, got_grads = full_grads(plain), full_grads(graphed)
        same = same and all(torch.equal(got_grads[n], g) for n, g in want_grads.items())
        out["same"].append(same)
        plain.zero_grad(set_to_none=True)
        graphed.zero_grad(set_to_none=True)
    return out


def finish_main(out_path: Path, report: dict[str, Any] | None) -> int:
    """End of a torchrun check script: rank 0 (the one with a report) writes it as JSON, then
    every rank leaves the process group together."""
    if report is not None:
        out_path.write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0
