"""``turbomoe bench`` / ``python -m turbomoe.bench``: stock transformers vs turbomoe, same model,
same data, same protocol (DESIGN §6), one process, or one launch under torchrun (stock with
per-layer FSDP2 against turbomoe with expert parallelism over every rank; bench/distributed.py).

Exit status: 0 all checks passed; 1 a check failed (first-step losses disagree, a run ran out of
memory); 2 the benchmark cannot run here (no CUDA, bad options).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

import turbomoe
from turbomoe.bench import distributed, report
from turbomoe.bench.flops import active_matmul_params, flops_per_token
from turbomoe.bench.models import qwen3_30b_a3b_config, tiny_config
from turbomoe.bench.patching import patch_api_available
from turbomoe.bench.profiling import render_markdown
from turbomoe.bench.runner import RunResult, RunSpec, Settings, make_batches, run_one
from turbomoe.bench.timing import measure_matmul_peak_tflops

EXIT_OK, EXIT_CHECK_FAILED, EXIT_CANNOT_RUN = 0, 1, 2

# Defaults: (full protocol, --tiny smoke run). None in the parser means "not given".
_DEFAULTS = {
    "layers": (12, 1),
    "seq": (4096, 128),
    "batch": (1, 1),
    "warmup": (3, 1),
    "steps": (10, 3),
}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class BenchError(Exception):
    """The benchmark cannot run in this environment (exit 2)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="turbomoe bench",
        description="Stock transformers vs turbomoe on the same random-initialised MoE model "
        "(Qwen3-30B-A3B shape by default): TPS/GPU, TFLOP/s, MFU, peak memory, first-step loss.",
    )
    shape = p.add_argument_group("shape and protocol")
    shape.add_argument("--layers", type=_positive, help="decoder layers (default 12; tiny 1)")
    shape.add_argument("--seq", type=_positive, help="sequence length (default 4096; tiny 128)")
    shape.add_argument("--batch", type=_positive, help="sequences per step (default 1)")
    shape.add_argument("--steps", type=_positive, help="timed steps (default 10; tiny 3)")
    shape.add_argument("--warmup", type=_non_negative, help="warm-up steps (default 3; tiny 1)")
    shape.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    shape.add_argument("--seed", type=int, default=0)
    shape.add_argument("--lr", type=float, default=1e-5)
    shape.add_argument(
        "--tiny", action="store_true", help="a tiny qwen3_moe shape (for CPU / smoke runs)"
    )
    shape.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu implies --tiny"
    )
    runs = p.add_argument_group("runs")
    runs.add_argument("--only", choices=["hf", "turbomoe", "both"], default="both")
    runs.add_argument(
        "--experts-backend",
        default="grouped_mm",
        help="transformers experts implementation of the stock run (default grouped_mm, "
        "the fastest stock one)",
    )
    runs.add_argument("--attn-implementation", default="sdpa", help="attention of both runs")
    runs.add_argument(
        "--ep-dense",
        choices=["fsdp", "replicated"],
        default="replicated",
        help="under torchrun: turbomoe's dense parameters replicated with gradients all-reduced "
        "after the backward (default; measured faster) or sharded by FSDP2 (less memory)",
    )
    runs.add_argument(
        "--ep-placement",
        choices=["blocks", "load"],
        default="blocks",
        help="under torchrun: turbomoe's experts in contiguous blocks per rank (default), or "
        "placed by the first batch's routing so that ranks receive even rows "
        "(turbomoe.parallel.balance_experts)",
    )
    runs.add_argument(
        "--ep-transport",
        choices=["auto", "nvlink", "nccl"],
        default=None,
        help="under torchrun: the expert-parallel token exchange over NVLink (CUDA IPC peer "
        "buffers) or NCCL all-to-all; default: TURBOMOE_EP_TRANSPORT, else auto (NVLink when "
        "every rank's GPU is reachable)",
    )
    runs.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="on one GPU, run turbomoe's steps eagerly instead of replaying each step from a "
        "CUDA graph (turbomoe.train.GraphedStep; captured during the warm-up)",
    )
    runs.add_argument(
        "--ep-cuda-graph",
        action="store_true",
        help="under torchrun, replay turbomoe's whole step from a CUDA graph when nothing in it "
        "reads the host (expert parallelism up to TURBOMOE_EP_PADDED_MAX_EP, default 2; "
        "replicated dense weights); otherwise, or without it, the attention graphs",
    )
    runs.add_argument(
        "--no-attention-graphs",
        dest="attention_graphs",
        action="store_false",
        help="under torchrun, run turbomoe's attention eagerly instead of replaying each "
        "layer's attention forward and backward from CUDA graphs (turbomoe.hf.attention_graphs; "
        "captured after the warm-up)",
    )
    runs.add_argument(
        "--peak-tflops", type=float, help="bf16 GEMM peak for MFU instead of measuring it"
    )
    runs.add_argument(
        "--loss-rtol", type=float, default=5e-2, help="first-step loss tolerance (relative)"
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the results as one JSON object")
    out.add_argument("--png", type=Path, help="write a bar chart of TPS and memory")
    out.add_argument("--profile", action="store_true", help="torch.profiler per-kernel breakdown")
    out.add_argument("--profile-out", type=Path, default=Path("docs/perf-notes-profile.md"))
    out.add_argument("--profile-steps", type=_positive, default=2)
    out.add_argument("--profile-top", type=_positive, default=25, help="kernels listed per run")
    out.add_argument(
        "--trace-dir",
        type=Path,
        help="with --profile: write each run's timeline per rank as a gzipped Chrome trace here",
    )
    out.add_argument("--record", action="store_true", help="append a summary line to --record-path")
    out.add_argument("--record-path", type=Path, default=Path("docs/benchmarks.jsonl"))
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "cpu":
        args.tiny = True  # the full shape would take hours on a CPU
    for name, (full, tiny) in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def _experts_backends() -> set[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return {"eager", *ALL_EXPERTS_FUNCTIONS.keys()}


def _check_environment(args: argparse.Namespace) -> torch.device:
    ranks = distributed.requested_world_size()
    if ranks > 1 and not torch.distributed.is_available():
        raise BenchError(f"WORLD_SIZE is {ranks} but this torch has no torch.distributed")
    backends = _experts_backends()
    if args.experts_backend not in backends:
        raise BenchError(
            f"--experts-backend {args.experts_backend!r} is not one of transformers' experts "
            f"implementations: {', '.join(sorted(backends))}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            "no CUDA device is available; `--device cpu` runs a tiny CPU smoke benchmark"
        )
    if args.device == "cuda" and ranks <= 1 and args.cuda_graph and args.warmup < 2:
        raise BenchError(
            f"--warmup {args.warmup}: the CUDA-graphed turbomoe run needs >= 2 warm-up steps "
            "(eager warm-up, then the capture); raise --warmup or pass --no-cuda-graph"
        )
    if args.device == "cuda" and ranks > 1 and args.ep_cuda_graph and args.warmup < 2:
        raise BenchError(
            f"--warmup {args.warmup}: --ep-cuda-graph needs >= 2 warm-up steps (eager warm-up, "
            "then the capture)"
        )
    if args.device == "cuda" and ranks > 1 and args.attention_graphs and args.warmup < 1:
        raise BenchError(
            "--warmup 0: the attention graphs are captured after an eager warm-up step; raise "
            "--warmup or pass --no-attention-graphs"
        )
    if args.device == "cuda":
        if ranks > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _peak(args: argparse.Namespace, device: torch.device, log: Any) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given"
    if device.type == "cuda":
        log("measuring the bf16 GEMM peak (8192^3 matmul, median of 20 after 1 s of warm-up) ...")
        return measure_matmul_peak_tflops(device, torch.bfloat16, 8192), "measured 8192^3 bf16"
    # A CPU "peak" is only there so that the CPU smoke run exercises the same code path.
    dtype = _DTYPES[args.dtype]
    return measure_matmul_peak_tflops(device, dtype, 256, iters=5, warmup_s=0.0), "measured CPU"


def _specs(args: argparse.Namespace) -> list[RunSpec]:
    stock = RunSpec("hf", "stock transformers", False, args.experts_backend)
    # None: the turbomoe run takes whatever `import turbomoe` registers as the default, i.e.
    # exactly what a user gets without passing any option.
    fast = RunSpec("turbomoe", "turbomoe", True, None)
    return {"hf": [stock], "turbomoe": [fast], "both": [stock, fast]}[args.only]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _payload(
    args: argparse.Namespace,
    config: Any,
    device: torch.device,
    results: dict[str, RunResult],
    flops: float,
    peak: tuple[float, str],
) -> dict[str, Any]:
    ratios, failures = report.compare(results, args.loss_rtol)
    warnings: list[str] = []
    if not patch_api_available():
        warnings.append("turbomoe.patch()/unpatch() are missing: both runs use the same code")
    for run in results.values():
        if not run.patch_in_effect:
            warnings.append(f"the {run.label} run did not get the patch state it asked for")
    if ratios and not ratios["same_weights"]:
        warnings.append("the two runs started from different weights (parameter names differ?)")
    counts = active_matmul_params(config)
    return {
        "schema": 1,
        "date": report.utc_now(),
        "commit": report.git_commit(Path(turbomoe.__file__).resolve().parent),
        "turbomoe_version": getattr(turbomoe, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "gpu": _device_name(device),
        "device": device.type,
        "world_size": distributed.requested_world_size(),
        "config": {
            "family": config.model_type,
            "tiny": args.tiny,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "vocab": config.vocab_size,
            "seq": args.seq,
            "batch": args.batch,
            "dtype": args.dtype,
            "warmup": args.warmup,
            "steps": args.steps,
            "seed": args.seed,
            "lr": args.lr,
            "experts_backend_stock": args.experts_backend,
            "attn_implementation": args.attn_implementation,
            "cuda_graph": args.cuda_graph,
            "attention_graphs": args.attention_graphs,
            "ep_cuda_graph": args.ep_cuda_graph,
            "ep_placement": args.ep_placement,
        },
        "active_matmul_params": counts.total,
        "flops_per_token": flops,
        "peak_tflops": peak[0],
        "peak_tflops_source": peak[1],
        "runs": {name: r.to_json() for name, r in results.items()},
        "ratios": ratios,
        "warnings": warnings,
        "failures": failures,
        "ok": not failures,
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write_outputs(
    args: argparse.Namespace,
    payload: dict[str, Any],
    results: dict[str, RunResult],
    argv: list[str],
    log: Any,
) -> None:
    if args.json:
        report.write_json(args.json, payload)
        log(f"wrote {args.json}")
    if args.png:
        report.write_png(args.png, payload)
        log(f"wrote {args.png}")
    if args.profile:
        profiles = {r.label: r.profile for r in results.values() if r.profile is not None}
        cfg = payload["config"]
        header = (
            f"# Per-kernel profile: {cfg['family']}, {cfg['layers']} layers, seq {cfg['seq']} x "
            f"batch {cfg['batch']}, {payload['gpu']}\n\n"
            f"Generated by `turbomoe bench --profile` on {payload['date']} at commit "
            f"`{payload['commit'][:12]}`."
        )
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        args.profile_out.write_text(render_markdown(profiles, header))
        log(f"wrote {args.profile_out}")
    if args.record:
        line = report.record_line(payload, "turbomoe bench " + shlex.join(argv))
        report.append_record(args.record_path, line)
        log(f"appended a line to {args.record_path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _resolve(build_parser().parse_args(argv))
    if args.ep_transport is not None:
        os.environ["TURBOMOE_EP_TRANSPORT"] = args.ep_transport

    try:
        device = _check_environment(args)
    except BenchError as exc:
        print(f"turbomoe bench: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    ranks = distributed.init(device.type)
    lead = ranks is None or ranks.rank == 0

    def log(message: str) -> None:
        if lead:  # under torchrun rank 0 speaks for all (errors still reach every rank's stderr)
            print(message, file=sys.stderr, flush=True)

    try:
        return _run(args, argv, device, ranks, lead, log)
    finally:
        if ranks is not None:
            distributed.finish()


def _run(
    args: argparse.Namespace,
    argv: list[str],
    device: torch.device,
    ranks: distributed.Ranks | None,
    lead: bool,
    log: Any,
) -> int:

    torch.manual_seed(args.seed)
    config = (
        tiny_config("qwen3_moe", args.layers) if args.tiny else qwen3_30b_a3b_config(args.layers)
    )
    settings = Settings(
        device=device,
        dtype=_DTYPES[args.dtype],
        seq=args.seq,
        batch=args.batch,
        warmup=args.warmup,
        steps=args.steps,
        seed=args.seed,
        lr=args.lr,
        attn_implementation=args.attn_implementation,
        profile_steps=args.profile_steps if args.profile else 0,
        profile_top=args.profile_top,
        trace_dir=args.trace_dir,
        ep_dense_fsdp=args.ep_dense == "fsdp",
        cuda_graph=args.cuda_graph,
        attention_graphs=args.attention_graphs,
        ep_cuda_graph=args.ep_cuda_graph,
        ep_placement=args.ep_placement,
        ranks=ranks,
    )
    flops = flops_per_token(config, args.seq)
    peak = _peak(args, device, log)
    batches = make_batches(config.vocab_size, settings)
    results: dict[str, RunResult] = {}
    for spec in _specs(args):
        results[spec.name] = run_one(spec, config, settings, batches, flops, peak[0], log)

    payload = _payload(args, config, device, results, flops, peak)
    ok = payload["ok"] if ranks is None else distributed.all_ok(payload["ok"])
    if lead:
        print(report.format_table(payload), flush=True)
        _write_outputs(args, payload, results, argv, log)
    return EXIT_OK if ok else EXIT_CHECK_FAILED
