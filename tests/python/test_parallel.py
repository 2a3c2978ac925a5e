"""Expert parallelism on CPU: gloo ranks (forked by parallel_worker.run_ranks) against one process.

Each rank feeds its own batch; the reference is one process over the concatenated batch. The
loss is normalised by the global label count (ranks hold different counts), so the summed rank
losses equal the reference's mean loss, and gradients (averaged over ranks by turbomoe.parallel)
equal the reference's; expert gradients are compared after gathering the shards.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hf_models import capture_routing
from parallel_worker import (
    EXPERTS,
    build,
    capacity_worker,
    chunks_mismatch_worker,
    concat,
    dispatch_worker,
    graph_step_worker,
    load_worker,
    make_batch,
    overlap_recovery_worker,
    overlap_worker,
    parity_worker,
    rel_err,
    replaced_training_worker,
    run_ranks,
    save_worker,
    timeout_worker,
    with_env_worker,
)

import turbomoe
import turbomoe.parallel as tp
from turbomoe import ops
from turbomoe.parallel.routing_counts import RoutingRecorder


@pytest.fixture(autouse=True)
def _patched() -> None:
    turbomoe.patch()


def _reference(base: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    model = copy.deepcopy(base)
    with capture_routing(model) as routing:
        out = model(**concat(batches))
    out.loss.backward()
    counts = [torch.bincount(ids.reshape(-1), minlength=EXPERTS) for ids in routing]
    grads = {name: p.grad for name, p in model.named_parameters()}
    norm = torch.nn.utils.get_total_norm([g for g in grads.values() if g is not None])
    return {"loss": out.loss.detach(), "grads": grads, "counts": counts, "norm": norm}


def _check_parity(results: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    for rank, result in enumerate(results):
        assert rel_err(result["loss"], ref["loss"]) <= 1e-5, (rank, result["loss"], ref["loss"])
        assert rel_err(result["norm"], ref["norm"]) <= 1e-5, (rank, result["norm"], ref["norm"])
        assert result["grads"].keys() == ref["grads"].keys()
        for name, want in ref["grads"].items():
            got = result["grads"][name]
            assert (got is None) == (want is None), (rank, name)
            if want is not None:
                assert got.shape == want.shape, (rank, name)
                assert rel_err(got, want) <= 1e-4, (rank, name, rel_err(got, want))


@pytest.mark.parametrize(
    ("family", "world", "ep_size", "fsdp", "grad_sync", "checkpointing"),
    [
        ("qwen3_moe", 2, 2, None, "auto", False),
        # dp 2: dense under FSDP2, experts reduced over dp
        ("qwen3_moe", 4, 2, None, "manual", False),
        # rank 3 owns experts 6 and 7, which get no tokens
        ("deepseek_v3", 4, 4, None, "auto", False),
        # eight ranks, one expert each (the world size of issue 6's 8-GPU run); ranks 6 and 7
        # own experts without tokens
        ("deepseek_v3", 8, 8, None, "auto", False),
        # ep 1: pure data parallel with replicated dense weights
        ("deepseek_v3", 2, 1, False, "auto", False),
        ("mixtral", 2, 2, True, "auto", True),  # FSDP at dp 1, gradient checkpointing
    ],
)
def test_parallel_matches_one_process(
    family: str,
    world: int,
    ep_size: int,
    fsdp: bool | None,
    grad_sync: str,
    checkpointing: bool,
    tmp_path: Path,
) -> None:
    base = build(family, seed=3)
    batches = [make_batch(seed=r, pad=r % 3) for r in range(world)]
    ref = _reference(base, batches)
    for counts in ref["counts"]:
        assert int(counts.max()) >= 2 * max(int(counts.min()), 1), counts  # uneven routing
    if family == "deepseek_v3":
        assert all(int(c[6:].sum()) == 0 for c in ref["counts"])  # experts without tokens
    results = run_ranks(
        parity_worker, world, tmp_path, base, batches, ep_size, fsdp, grad_sync, checkpointing
    )
    _check_parity(results, ref)


def test_exchange_size_agreed_once_per_forward(tmp_path: Path) -> None:
    """No host sync inside a layer: the ep group agrees on the exchange's block size once per
    model forward (the largest token count of any rank), also across the backward's
    recomputation under gradient checkpointing; ranks with fewer tokens pad their blocks."""
    base = build("qwen3_moe", seed=4)
    seqs = [5, 9]
    results = run_ranks(capacity_worker, 2, tmp_path, base, seqs)
    for rank, result in enumerate(results):
        assert result["agreements"] == 1, (rank, result)
        assert result["capacity"] == max(seqs)
    for rank, seq in enumerate(seqs):  # each rank's loss is its own batch's single-process loss
        model = copy.deepcopy(base)
        want = model(**make_batch(seed=rank, batch=1, seq=seq)).loss.detach()
        assert rel_err(results[rank]["loss"], want) <= 1e-5


def test_dense_all_reduce_overlapped_with_the_backward(tmp_path: Path) -> None:
    """Buckets launched from the backward give sync_grads's result: accumulated micro-batches,
    a gradient None on one rank (zeros there), one None everywhere (stays None)."""
    base = build("qwen3_moe", seed=6)
    results = run_ranks(overlap_worker, 2, tmp_path, base)
    for rank, result in enumerate(results):
        assert result["buckets"] > 4 and result["early"] >= result["buckets"] // 2, result
        auto, manual = result["auto"], result["manual"]
        assert auto.keys() == manual.keys()
        for name, want in manual.items():
            got = auto[name]
            assert (got is None) == (want is None), (rank, name)
            if want is not None:
                assert rel_err(got, want) <= 1e-5, (rank, name, rel_err(got, want))
        assert manual["model.unused"] is None
        torch.testing.assert_close(manual["model.only_rank0"], torch.full((3,), 3.0 / 2))
    # Replicated: every rank ends with the same dense gradients.
    for name, grad in results[0]["auto"].items():
        if grad is not None and "experts" not in name:
            assert torch.equal(grad, results[1]["auto"][name]), name


def test_a_failed_backward_leaves_no_stale_buckets(tmp_path: Path) -> None:
    """After a backward that raised (some buckets already launched), the next step's gradients
    equal a fresh model's: the overlap's counts start from zero again."""
    base = build("qwen3_moe", seed=7)
    for rank, result in enumerate(run_ranks(overlap_recovery_worker, 2, tmp_path, base)):
        for name, want in result["clean"].items():
            got = result["recovered"][name]
            assert (got is None) == (want is None), (rank, name)
            if want is not None:
                assert torch.equal(got, want), (rank, name, rel_err(got, want))


@pytest.mark.parametrize("env", [{}, {"TURBOMOE_EP_CHUNKS": "2", "TURBOMOE_EP_RECOMPUTE": "1"}])
def test_parallel_ep8_on_eight_gloo_ranks(env: dict[str, str], tmp_path: Path) -> None:
    """EP = 8 over 8 processes: one expert per rank; also in token chunks with the owner's lean
    autograd record (the 8-GPU headline run's code path)."""
    base = build("qwen3_moe", seed=5)
    batches = [make_batch(seed=r, batch=1, seq=6) for r in range(8)]
    ref = _reference(base, batches)
    results = run_ranks(
        with_env_worker,
        8,
        tmp_path,
        env,
        parity_worker,
        base,
        batches,
        8,
        None,
        "auto",
        timeout_s=58.0,
    )
    _check_parity(results, ref)


@pytest.mark.parametrize("chunks", [1, 3])
def test_dispatch_edge_cases_match_moe_experts(chunks: int, tmp_path: Path) -> None:
    """One expert gets every token's first slot, expert 2 gets nothing, and in turn each rank
    holds no tokens at all (it still sends, receives and computes); with 3 token chunks too
    (some of them empty on one rank or on every rank)."""
    g = torch.Generator().manual_seed(7)
    hidden_size, inter, experts = 24, 10, 4
    gate_up = torch.randn(experts, 2 * inter, hidden_size, generator=g) * 0.3
    down = torch.randn(experts, hidden_size, inter, generator=g) * 0.3

    def tokens(count: int, second: list[int]) -> tuple[torch.Tensor, ...]:
        hidden = torch.randn(count, hidden_size, generator=g)
        ids = torch.zeros(count, 2, dtype=torch.int64)
        ids[:, 1] = torch.tensor(second, dtype=torch.int64)[torch.arange(count) % len(second)]
        weights = torch.rand(count, 2, generator=g)
        proj = torch.randn(count, hidden_size, generator=g)
        return hidden, ids, weights, proj

    rounds = [
        [tokens(7, [1, 3]), tokens(0, [1])],
        [tokens(0, [1]), tokens(5, [3, 1, 1])],
        [tokens(3, [1]), tokens(4, [1])],  # rank 1 (experts 2, 3) receives nothing
    ]
    env = {"TURBOMOE_EP_CHUNKS": str(chunks)}
    results = run_ranks(with_env_worker, 2, tmp_path, env, dispatch_worker, gate_up, down, rounds)

    for result in results:
        assert "expert ids outside [0, 4)" in result[-1]["error"]
    for index, per_rank in enumerate(rounds):
        hidden = torch.cat([r[0] for r in per_rank]).requires_grad_()
        ids = torch.cat([r[1] for r in per_rank])
        weights = torch.cat([r[2] for r in per_rank]).requires_grad_()
        proj = torch.cat([r[3] for r in per_rank])
        w1 = gate_up.clone().requires_grad_()
        w2 = down.clone().requires_grad_()
        out = ops.moe_experts(hidden, ids, weights, w1, w2)
        (out * proj).sum().backward()
        sizes = [r[0].shape[0] for r in per_rank]
        for rank, result in enumerate(r[index] for r in results):
            lo = sum(sizes[:rank])
            hi = lo + sizes[rank]
            if hi > lo:
                assert rel_err(result["out"], out[lo:hi].detach()) <= 1e-6
                assert rel_err(result["hidden"], hidden.grad[lo:hi]) <= 1e-6
                assert rel_err(result["weights"], weights.grad[lo:hi]) <= 1e-6
            else:
                assert result["out"].shape == (0, hidden_size)
            assert rel_err(result["gate_up"], w1.grad) <= 1e-6, (index, rank)
            assert rel_err(result["down"], w2.grad) <= 1e-6, (index, rank)


def test_missing_peer_is_an_error_not_a_hang(tmp_path: Path) -> None:
    base = build("qwen3_moe", seed=1)
    batch = {k: v for k, v in make_batch(seed=0).items() if k != "labels"}
    results = run_ranks(
        timeout_worker, 2, tmp_path, base, batch, pg_timeout_s=8.0, timeout_s=50.0, wait_for=[0]
    )
    error = results[0]["error"]
    assert error is not None and "imed out" in error, error
    assert results[0]["seconds"] < 30.0


def test_parallelize_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    model = build("qwen3_moe")
    with pytest.raises(ValueError, match=r"torch\.distributed"):
        tp.parallelize(model, ep_size=2)
    assert tp.parallelize(model, ep_size=1) is model  # one process, ep 1: a no-op
    assert not tp.is_parallelized(model)


@pytest.mark.parametrize(
    ("family", "world", "how", "fsdp"),
    [
        ("qwen3_moe", 2, "random", None),
        ("deepseek_v3", 4, "balanced", None),
        ("deepseek_v3", 8, "balanced", None),  # one expert a rank: placement permutes ranks
        ("mixtral", 2, "balanced", True),  # dense parameters under FSDP2
    ],
)
def test_experts_placed_by_load_match_one_process(
    family: str, world: int, how: str, fsdp: bool | None, tmp_path: Path
) -> None:
    """Experts moved off their contiguous blocks (turbomoe.parallel.placement): the same loss and
    gradients as one process, weights and gradients gathered back in expert order, and a
    placement after the backward refused."""
    base = build(family, seed=3)
    batches = [make_batch(seed=r, pad=r % 3) for r in range(world)]
    ref = _reference(base, batches)
    # The rows each expert gets when one process runs every batch.
    counted = copy.deepcopy(base)
    recorder = RoutingRecorder(counted)
    recorder.active = True
    with torch.no_grad():
        counted(**{k: v for k, v in concat(batches).items() if k != "labels"})
    rows = recorder.counts()
    assert rows is not None
    results = run_ranks(
        parity_worker, world, tmp_path, base, batches, world, fsdp, "auto", False, how
    )
    _check_parity(results, ref)
    want = base.state_dict()
    for rank, result in enumerate(results):
        assert result["weights"].keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(result["weights"][key], value), (rank, key)
        assert "before the first backward" in result["late"], rank
        for slots, counts in zip(result["slots"], rows, strict=True):
            assert sorted(slots.tolist()) == list(range(EXPERTS))
            if how == "balanced":
                # Planned from every rank's rows: the one-process routing of all the batches.
                assert torch.equal(slots, tp.plan_placement(counts, world)), rank
        if how == "random":
            moved = sum(int((s != torch.arange(EXPERTS)).sum()) for s in result["slots"])
            assert moved > 0, "every placement was the identity: nothing was tested"


def test_experts_placed_again_between_steps_move_their_optimizer_states(tmp_path: Path) -> None:
    """Placement planned again mid-training: with the optimizer passed, AdamW's moments move with
    their experts and two steps equal one process's; left behind, they visibly do not."""
    base = build("qwen3_moe", seed=5)
    batches = [make_batch(seed=r) for r in range(2)]
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    for _ in range(2):
        model(**concat(batches)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    want = model.state_dict()
    moved = run_ranks(replaced_training_worker, 2, tmp_path / "moved", base, batches, True)
    for rank, result in enumerate(moved):
        for key, value in want.items():
            assert rel_err(result["weights"][key], value) <= 1e-5, (rank, key)
    stale = run_ranks(replaced_training_worker, 2, tmp_path / "stale", base, batches, False)
    worst = max(
        rel_err(stale[0]["weights"][key], value)
        for key, value in want.items()
        if key.endswith(("gate_up_proj", "down_proj"))
    )
    assert worst > 1e-3, worst  # the control: moments left behind change the second step


def test_save_pretrained_gives_a_stock_checkpoint(tmp_path: Path, stock_transformers: None) -> None:
    """ep 2 (+ FSDP) model after one step → save → stock from_pretrained: the same logits; and
    turbomoe's own ep loader reads it back. Bad ep sizes raise ValueError first."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    turbomoe.patch()  # the ranks run turbomoe; the reference below runs stock
    base = build("qwen3_moe", seed=11)
    odd = build("qwen3_moe", seed=11, num_experts=5)
    batches = [make_batch(seed=r, pad=2 * r) for r in range(2)]
    path = tmp_path / "checkpoint"
    results = run_ranks(save_worker, 2, tmp_path / "run", base, odd, batches, path)

    errors = results[0]["errors"]
    assert "ep_size=3 does not divide the world size 2" in errors["world"]
    assert "ep_size=2 does not divide the 5 experts" in errors["experts"]
    assert "positive integer" in errors["zero"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    for e in range(EXPERTS):
        assert f"model.layers.1.mlp.experts.{e}.gate_proj.weight" in keys
        assert f"model.layers.1.mlp.experts.{e}.down_proj.weight" in keys
    assert not any(key.endswith("experts.gate_up_proj") for key in keys)

    turbomoe.unpatch()
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for rank, result in enumerate(results):
        inputs = {k: v for k, v in batches[rank].items() if k != "labels"}
        with torch.no_grad():
            want = loaded(**inputs).logits
        assert rel_err(result["logits"], want) <= 1e-5, rank
        assert rel_err(result["reloaded"], result["logits"]) <= 1e-6, rank


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_from_pretrained_loads_only_local_experts(family: str, tmp_path: Path) -> None:
    """turbomoe.parallel.AutoModelForCausalLM reads stock checkpoints, per-expert keys
    (Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2) and fused keys alike."""
    base = build(family, seed=13).eval()
    per_expert, fused = tmp_path / "per_expert", tmp_path / "fused"
    base.save_pretrained(per_expert)
    base.save_pretrained(fused, save_original_format=False)
    batches = [make_batch(seed=r) for r in range(2)]
    results = run_ranks(load_worker, 2, tmp_path / "run", [per_expert, fused], batches)
    for rank, logits in enumerate(results):
        inputs = {k: v for k, v in batches[rank].items() if k != "labels"}
        with torch.no_grad():
            want = base(**inputs).logits
        for got in logits:
            assert rel_err(got, want) <= 1e-5, rank


def test_from_pretrained_with_ep_needs_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        tp.AutoModelForCausalLM.from_pretrained(tmp_path, ep_size=2)


@pytest.mark.parametrize(
    ("family", "world", "chunks", "recompute", "gather"),
    [
        ("qwen3_moe", 2, 2, "0", "0"),
        ("qwen3_moe", 2, 3, "1", "0"),  # 26 tokens a rank: chunks of 9, 9 and 8
        ("deepseek_v3", 4, 4, "0", "0"),  # experts without tokens, each rank's last chunk short
        ("deepseek_v3", 4, 1, "1", "0"),  # the owner's lean autograd record alone
        ("deepseek_v3", 8, 2, "1", "0"),  # eight ranks, one expert each, chunked and lean
        # the lean record with every gather inside the GEMMs' operand loads
        ("qwen3_moe", 2, 2, "1", "1"),
        ("deepseek_v3", 4, 1, "1", "1"),
    ],
)
def test_token_chunks_and_recompute_match_one_process(
    family: str, world: int, chunks: int, recompute: str, gather: str, tmp_path: Path
) -> None:
    """TURBOMOE_EP_CHUNKS: each layer's exchange in chunks (on CUDA their exchanges queue on a
    side stream; here they are gloo's), TURBOMOE_EP_RECOMPUTE: the owner's experts keep only
    their input and gate/up output, TURBOMOE_GATHER_IN_GEMM: their GEMMs read the received rows
    and the token gradient themselves; all give the one-process loss and gradients."""
    base = build(family, seed=3)
    batches = [make_batch(seed=r, pad=r % 3) for r in range(world)]
    ref = _reference(base, batches)
    env = {
        "TURBOMOE_EP_CHUNKS": str(chunks),
        "TURBOMOE_EP_RECOMPUTE": recompute,
        "TURBOMOE_GATHER_IN_GEMM": gather,
    }
    results = run_ranks(
        with_env_worker, world, tmp_path, env, parity_worker, base, batches, world, None, "auto"
    )
    _check_parity(results, ref)


def test_token_chunks_differing_across_ranks_fail_everywhere(tmp_path: Path) -> None:
    base = build("qwen3_moe", seed=2)
    for message in run_ranks(chunks_mismatch_worker, 4, tmp_path / "four", base):
        assert "TURBOMOE_EP_CHUNKS differs across the expert-parallel ranks" in message, message
    invalid, told = run_ranks(chunks_mismatch_worker, 2, tmp_path / "two", base)
    assert "TURBOMOE_EP_CHUNKS='x' is not an integer" in told, told  # rank 1's own error
    assert "TURBOMOE_EP_CHUNKS is invalid on another expert-parallel rank" in invalid, invalid


def test_chunk_bounds_and_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbomoe.parallel.chunked import chunk_bounds
    from turbomoe.parallel.dispatch import configured_chunks, configured_recompute

    assert chunk_bounds(13, 3) == [(0, 5), (5, 10), (10, 13)]
    assert chunk_bounds(4, 3) == [(0, 2), (2, 4), (4, 4)]  # an empty last chunk
    assert chunk_bounds(0, 2) == [(0, 0), (0, 0)]
    assert configured_chunks() == 1
    assert not configured_recompute()
    monkeypatch.setenv("TURBOMOE_EP_RECOMPUTE", "1")
    assert configured_recompute()
    monkeypatch.setenv("TURBOMOE_EP_RECOMPUTE", "yes")
    with pytest.raises(ValueError, match="TURBOMOE_EP_RECOMPUTE"):
        configured_recompute()
    monkeypatch.setenv("TURBOMOE_EP_CHUNKS", "4")
    assert configured_chunks() == 4
    for bad in ("0", "9", "two"):
        monkeypatch.setenv("TURBOMOE_EP_CHUNKS", bad)
        with pytest.raises(ValueError, match="TURBOMOE_EP_CHUNKS"):
            configured_chunks()


def test_gemm_sm_margin_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbomoe import _native
    from turbomoe.parallel.chunked import gemm_sm_margin

    monkeypatch.delenv("TURBOMOE_GEMM_SM_MARGIN", raising=False)
    monkeypatch.setenv("TURBOMOE_EP_NVLINK_CTAS", "12")
    assert gemm_sm_margin() == 14  # the push's blocks, the barrier's and a copy's
    monkeypatch.setenv("TURBOMOE_GEMM_SM_MARGIN", "0")
    assert gemm_sm_margin() == 0
    for bad in ("-1", "2000", "x"):
        monkeypatch.setenv("TURBOMOE_GEMM_SM_MARGIN", bad)
        with pytest.raises(ValueError, match="TURBOMOE_GEMM_SM_MARGIN"):
            gemm_sm_margin()
    lib = _native.lib()
    assert lib.tm_gemm_sm_margin() == 0
    _native.call("tm_set_gemm_sm_margin", 20)
    try:
        assert lib.tm_gemm_sm_margin() == 20
        with pytest.raises(ValueError, match="expected"):
            _native.call("tm_set_gemm_sm_margin", -3)
    finally:
        _native.call("tm_set_gemm_sm_margin", 0)


def test_attention_graphs_need_replicated_dense_parameters() -> None:
    """The check runs before anything collective, so one process shows it."""
    from turbomoe.parallel.shard import finish

    model = build("qwen3_moe", seed=1)
    with pytest.raises(ValueError, match="attention_graphs needs replicated dense parameters"):
        finish(
            model,
            None,  # type: ignore[arg-type]
            [],
            fsdp=True,
            mp_policy=None,
            reshard_after_forward=True,
            grad_sync="auto",
            attention_graphs=True,
        )


def test_graphed_step_accepts_an_expert_parallel_model(tmp_path: Path) -> None:
    """EP 2 has padded expert buffers, so GraphedStep takes the model (on CUDA it captures
    the whole step); on gloo its calls are the plain steps."""
    base = build("qwen3_moe", seed=6)
    for result in run_ranks(graph_step_worker, 2, tmp_path, base):
        assert result["parallel"] is True
        assert result["same"] == [True, True]
