"""One benchmark run: build the model, train ``warmup + steps`` steps, measure (DESIGN §6).

Protocol: random token ids with labels = inputs, the model's own loss (``labels=``), AdamW. Each
step synchronises, times forward + loss and backward, then runs the optimizer outside the timed
window (its states still count in memory). Peak memory is reset after warm-up, so it is the peak
of the steady-state timed steps: weights + gradients + optimizer states + activations. On one GPU
the turbomoe run replays each step from a CUDA graph (``GraphedStep``) captured in the last
warm-up step; its peak window opens before that capture, which allocates the working set.
Under torchrun (expert parallel), whose step cannot be captured whole, each layer's attention is
replayed from CUDA graphs instead (``turbomoe.hf.attention_graphs``), captured after the last
warm-up step, before the peak window opens.
"""

from __future__ import annotations

import gc
import statistics
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from turbomoe.bench import distributed
from turbomoe.bench.models import build_model, experts_backend_of, weights_fingerprint
from turbomoe.bench.patching import patch_state
from turbomoe.bench.profiling import Profile, profile_steps
from turbomoe.bench.routing import describe, routing_summary
from turbomoe.bench.timing import StepTimer, synchronize
from turbomoe.hf.attention_graphs import (
    AttentionGraphs,
    capture_attention_graphs,
    prepare_attention_graphs,
)
from turbomoe.parallel.capture import capture_refusal
from turbomoe.parallel.optim_groups import split_param_groups
from turbomoe.parallel.placement import balance_experts
from turbomoe.parallel.routing_counts import RoutingRecorder
from turbomoe.train.graph_step import GraphedStep

ALLOCATION_MARKS = ("step start", "forward end", "backward end")


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    seq: int
    batch: int
    warmup: int
    steps: int
    seed: int = 0
    lr: float = 1e-5
    attn_implementation: str = "sdpa"
    profile_steps: int = 0  # 0: no profile
    profile_top: int = 25
    trace_dir: Path | None = None  # with a profile: one gzipped Chrome trace per run and rank
    ep_dense_fsdp: bool = False  # under torchrun: turbomoe's dense parameters under FSDP2
    cuda_graph: bool = True  # one GPU: turbomoe's step replayed from a CUDA graph (GraphedStep)
    # Under torchrun: turbomoe's attention replayed from per-layer CUDA graphs.
    attention_graphs: bool = True
    # Under torchrun: turbomoe's whole step replayed from a CUDA graph when nothing in it reads
    # the host (turbomoe.parallel.capture); else the attention graphs above.
    ep_cuda_graph: bool = False
    # Under torchrun: turbomoe's experts in contiguous blocks ("blocks") or placed by the first
    # batch's routing ("load", turbomoe.parallel.balance_experts).
    ep_placement: str = "blocks"
    ranks: distributed.Ranks | None = None  # under torchrun: this process's place

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch


@dataclass(frozen=True)
class RunSpec:
    name: str  # key in the JSON: "hf" or "turbomoe"
    label: str  # for humans
    patched: bool  # turbomoe patches on during this run
    experts_implementation: str | None  # None: whatever is registered as the default


@dataclass
class RunResult:
    name: str
    label: str
    patched: bool
    patch_in_effect: bool
    experts_implementation: str = "unknown"
    attn_implementation: str = "sdpa"
    optimizer: str = ""
    tps_per_gpu: float = 0.0
    tflops_per_gpu: float = 0.0
    mfu: float | None = None
    peak_gib: float | None = None
    tps_per_rank: list[float] = field(default_factory=list)  # several ranks only
    parallelism: str = "none"
    first_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    step_ms_mean: float = 0.0
    step_ms_std: float = 0.0
    step_ms_min: float = 0.0
    step_ms_max: float = 0.0
    fwd_ms_mean: float | None = 0.0  # None when one graph replay runs both
    bwd_ms_mean: float | None = 0.0
    cuda_graph: bool = False
    attention_graphs: bool = False
    # GiB allocated at step start / forward end / backward end, largest over the timed steps
    # (CUDA; where the peak comes from: states, + saved activations, + gradients).
    allocated_gib: dict[str, float] = field(default_factory=dict)
    weights_fingerprint: float = 0.0
    # The first warm-up step's routing (turbomoe.bench.routing.summarise), for both runs.
    routing: dict[str, Any] | None = None
    error: str | None = None
    profile: Profile | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "profile"}
        out["profile_ms_per_step"] = self.profile.total_ms_per_step if self.profile else None
        return out


def make_batches(vocab_size: int, settings: Settings) -> list[torch.Tensor]:
    """One batch of random token ids per step, drawn on CPU from a seeded generator so both runs
    (and any device) see the same data; under torchrun each rank draws its own batches."""
    rank = settings.ranks.rank if settings.ranks is not None else 0
    gen = torch.Generator().manual_seed(settings.seed + 1 + 1_000_003 * rank)
    shape = (settings.warmup + settings.steps, settings.batch, settings.seq)
    ids = torch.randint(0, vocab_size, shape, generator=gen, dtype=torch.long)
    return list(ids.to(settings.device).unbind(0))


def make_optimizer(model: torch.nn.Module, settings: Settings) -> tuple[torch.optim.Optimizer, str]:
    # FSDP2's DTensors and the plain expert shards in separate groups: fused AdamW rejects a mix.
    params = split_param_groups(p for p in model.parameters() if p.requires_grad)
    if settings.device.type == "cuda":
        # Fused: one launch, no multi-tensor temporaries; it is outside the timed window anyway.
        return torch.optim.AdamW(params, lr=settings.lr, fused=True), "AdamW(fused)"
    return torch.optim.AdamW(params, lr=settings.lr, foreach=False), "AdamW(foreach=False)"


def release_memory(device: torch.device) -> None:
    """Free everything the previous run left so the next run starts from an empty allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _forward_backward(
    model: torch.nn.Module,
    batch: torch.Tensor,
    timer: StepTimer | None,
    graphed: GraphedStep | None = None,
) -> torch.Tensor:
    """Forward + loss + backward. A function so that the output (with its logits) and the graph
    are released on return, before the optimizer step and the next forward."""
    if timer is not None:
        timer.start()
    if graphed is not None:  # one replay runs both phases: the window is the whole step
        loss = graphed(input_ids=batch, labels=batch, use_cache=False)
        if timer is not None:
            timer.forward_done()
            timer.backward_done()
        return loss
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    if timer is not None:
        timer.forward_done()
    loss.backward()
    if timer is not None:
        timer.backward_done()
    return loss.detach()


def _train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[torch.Tensor],
    settings: Settings,
    result: RunResult,
) -> tuple[list[float], list[float], AttentionGraphs | None]:
    device = settings.device
    # The capture is the last warm-up step; the CLI makes sure there is room for it.
    graphed = None
    if result.cuda_graph:
        graphed = GraphedStep(model, warmup_steps=max(1, settings.warmup - 1))
    attention: AttentionGraphs | None = None
    if result.attention_graphs:
        prepare_attention_graphs(model)
    fwd_ms: list[float] = []
    bwd_ms: list[float] = []
    # A graphed run's peak is taken from its capture on: the replays allocate nothing, and the
    # graph's pool keeps the capture's working set (activations included) for every replay.
    window_start = settings.warmup - 1 if graphed is not None else settings.warmup
    # Counts the first step's routing (an eager warm-up step, or the first timed step without
    # warm-up, whose few counting kernels then land in its time).
    recorder = RoutingRecorder(model)
    recorder.active = True
    for i, batch in enumerate(batches):
        if i == window_start:
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)  # the previous optimizer step stays out of the window
        timer = StepTimer(device)
        loss = _forward_backward(model, batch, timer, graphed)
        fwd, bwd = timer.elapsed_ms()
        result.losses.append(float(loss))
        if i >= settings.warmup and timer.cuda and graphed is None:
            for name, nbytes in zip(ALLOCATION_MARKS, timer.allocated, strict=True):
                gib = nbytes / 2**30
                result.allocated_gib[name] = max(result.allocated_gib.get(name, 0.0), gib)
        if i == 0:
            recorder.close()  # no hook left in the modules' call path of the timed steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if result.attention_graphs and i == settings.warmup - 1:
            attention = capture_attention_graphs(model)
        if i >= settings.warmup:
            fwd_ms.append(fwd)
            bwd_ms.append(bwd)
    synchronize(device)
    if device.type == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    world = settings.ranks.world if settings.ranks is not None else 1
    result.routing = routing_summary(recorder, tuple(sorted({world, 4, 8} - {1})))
    if graphed is not None:
        if graphed.stats.replays < settings.steps:
            raise RuntimeError(
                f"the CUDA graph replayed {graphed.stats.replays} of {settings.steps} timed steps"
            )
        graphed.reset()  # the graph's memory pool goes before any eager profile step
    if attention is not None:
        layers = len(attention.modules)
        if attention.replays < settings.steps * layers:
            raise RuntimeError(
                f"the attention graphs replayed {attention.replays} times in {settings.steps} "
                f"timed steps of {layers} layers"
            )
    return fwd_ms, bwd_ms, attention


def _profile(
    model: torch.nn.Module, batch: torch.Tensor, settings: Settings, run_name: str
) -> Profile:
    def step() -> None:
        _forward_backward(model, batch, None)
        model.zero_grad(set_to_none=True)

    trace = None
    if settings.trace_dir is not None:
        rank = settings.ranks.rank if settings.ranks is not None else 0
        trace = settings.trace_dir / f"trace_{run_name}_rank{rank}.json.gz"
    step()  # the profiler's own first-step overheads stay out of the table
    return profile_steps(step, settings.device, settings.profile_steps, settings.profile_top, trace)


def _summarise(
    result: RunResult, fwd_ms: list[float], bwd_ms: list[float], settings: Settings
) -> None:
    step_ms = [f + b for f, b in zip(fwd_ms, bwd_ms, strict=True)]
    if not step_ms:
        return
    # Mean of the per-step TPS, as in the published protocol.
    result.tps_per_gpu = statistics.fmean(settings.tokens_per_step / (ms / 1e3) for ms in step_ms)
    result.step_ms_mean = statistics.fmean(step_ms)
    result.step_ms_std = statistics.pstdev(step_ms)
    result.step_ms_min = min(step_ms)
    result.step_ms_max = max(step_ms)
    if result.cuda_graph:
        result.fwd_ms_mean = result.bwd_ms_mean = None
    else:
        result.fwd_ms_mean = statistics.fmean(fwd_ms)
        result.bwd_ms_mean = statistics.fmean(bwd_ms)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _shard(
    model: torch.nn.Module, spec: RunSpec, settings: Settings, first_batch: torch.Tensor
) -> tuple[torch.nn.Module, str]:
    """The multi-GPU layout of DESIGN §6: FSDP2 per layer for stock, EP = world for turbomoe
    (its experts placed by the first batch's routing under ``ep_placement="load"``)."""
    assert settings.ranks is not None
    world = settings.ranks.world
    if spec.patched:
        dense = "FSDP2" if settings.ep_dense_fsdp else "replicated"
        model = distributed.shard_turbomoe(model, world, settings.ep_dense_fsdp)
        layout = f"EP {world} over {distributed.ep_transport(model)}, dense {dense}"
        if settings.ep_placement == "load" and world > 1:
            balance_experts(model, {"input_ids": first_batch})
            layout += ", experts placed by load"
        return model, layout
    return distributed.shard_stock(model, settings.dtype), f"FSDP2 per layer over {world}"


def run_one(
    spec: RunSpec,
    config: Any,
    settings: Settings,
    batches: list[torch.Tensor],
    flops_per_token: float,
    peak_tflops: float | None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Build, train and measure one model under ``spec``; frees it before returning."""
    release_memory(settings.device)
    with patch_state(spec.patched) as in_effect:
        result = RunResult(spec.name, spec.label, spec.patched, in_effect)
        result.attn_implementation = settings.attn_implementation
        result.cuda_graph = (
            spec.patched
            and settings.cuda_graph
            and settings.ranks is None
            and settings.device.type == "cuda"
        )
        result.attention_graphs = (
            spec.patched
            and settings.attention_graphs
            and settings.ranks is not None
            and not settings.ep_dense_fsdp
            and settings.device.type == "cuda"
        )
        attention: AttentionGraphs | None = None
        log(f"[{spec.name}] building model (patched={spec.patched}) ...")
        try:
            model = build_model(
                config,
                device=settings.device,
                dtype=settings.dtype,
                seed=settings.seed,
                experts_implementation=spec.experts_implementation,
                attn_implementation=settings.attn_implementation,
            )
            result.experts_implementation = experts_backend_of(model)
            result.weights_fingerprint = weights_fingerprint(model)
            if settings.ranks is not None:
                model, result.parallelism = _shard(model, spec, settings, batches[0])
                if result.attention_graphs and settings.ep_cuda_graph:
                    why = capture_refusal(model)
                    if why is None:
                        result.cuda_graph, result.attention_graphs = True, False
                    else:
                        log(f"[{spec.name}] the step is not captured whole: {why}")
            optimizer, result.optimizer = make_optimizer(model, settings)
            log(
                f"[{spec.name}] experts={result.experts_implementation} "
                f"attn={settings.attn_implementation}; {settings.warmup} warm-up + "
                f"{settings.steps} timed steps ..."
            )
            fwd_ms, bwd_ms, attention = _train(model, optimizer, batches, settings, result)
            _summarise(result, fwd_ms, bwd_ms, settings)
            if result.routing is not None:
                log(f"[{spec.name}] {describe(result.routing)}")
            if settings.profile_steps > 0:
                log(f"[{spec.name}] profiling {settings.profile_steps} step(s) ...")
                result.profile = _profile(model, batches[-1], settings, spec.name)
        except torch.OutOfMemoryError as exc:
            # An OOM is a result (stock HF does OOM on large shapes), not a crash of the bench.
            result.error = f"out of memory: {_first_line(exc)}"
        except Exception as exc:
            # A crash in one run must not lose the other run's numbers: report it as a failed
            # run (exit status 1) with the traceback on stderr.
            if settings.ranks is not None and settings.ranks.rank != 0:
                print(f"[rank {settings.ranks.rank}] {traceback.format_exc()}", file=sys.stderr)
            else:
                log(traceback.format_exc())
            result.error = f"{type(exc).__name__}: {_first_line(exc)}"
        finally:
            # Drop the model and optimizer before the next run is built (names may be unbound
            # when construction itself failed).
            if attention is not None:
                attention.release()
            model = optimizer = None
        if settings.ranks is not None:
            # Collective: every rank gets here, also after a failed run (its TPS is then 0).
            result.tps_per_gpu, result.peak_gib, result.tps_per_rank = distributed.combine_ranks(
                result.tps_per_gpu, result.peak_gib
            )
        if result.losses:
            result.first_loss = result.losses[0]
        result.tflops_per_gpu = result.tps_per_gpu * flops_per_token / 1e12
        if peak_tflops:
            result.mfu = result.tflops_per_gpu / peak_tflops
    release_memory(settings.device)
    return result
