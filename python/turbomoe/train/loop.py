"""The fine-tuning run: data -> model -> AdamW steps -> metrics -> an HF-format checkpoint."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import turbomoe  # patches HF's MoE models onto turbomoe's ops wherever turbomoe supports them
from turbomoe.train.batching import Batch, epoch_batches
from turbomoe.train.checkpoint import save_checkpoint
from turbomoe.train.config import FinetuneConfig
from turbomoe.train.data import load_rows
from turbomoe.train.encode import EncodedDataset, encode_rows
from turbomoe.train.interrupt import StopRequest
from turbomoe.train.load import (
    load_model,
    load_tokenizer,
    pad_id,
    resolve_device,
    resolve_dtype,
    resolve_threads,
)
from turbomoe.train.metrics import MetricsLog, Summary
from turbomoe.train.progress import ProgressDisplay
from turbomoe.train.sample import DEFAULT_PROMPT, sample_answer
from turbomoe.train.schedule import Progress, WarmupCosine

CHECKPOINT_DIR = "checkpoint"


@dataclass
class RunResult:
    summary: Summary
    model: Any
    tokenizer: Any
    output_dir: Path
    interrupted: bool


def bundled_data_path() -> Path:
    return Path(__file__).resolve().parent.parent / "default" / "instructions.jsonl"


def finetune(
    config: FinetuneConfig,
    stop: StopRequest | None = None,
    echo: Callable[[str], None] = print,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Runs one fine-tuning job as described by config and saves its checkpoint.

    stop: lets a caller end the run early, as Ctrl-C does; the checkpoint is still saved once a
    step has been taken. echo: where the banner and summary go. on_step: called with each step's
    metrics record (for notebooks, dashboards and tests).
    """
    config.validate()
    previous_threads = torch.get_num_threads()
    try:
        return _run(config, stop or StopRequest(), echo, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    config: FinetuneConfig,
    stop: StopRequest,
    echo: Callable[[str], None],
    on_step: Callable[[dict[str, Any]], None] | None,
) -> RunResult:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    threads, threads_why = resolve_threads(config.threads)
    torch.set_num_threads(threads)
    data_path = Path(config.data) if config.data else bundled_data_path()

    # Data is read and checked before the model is loaded, so a bad line fails in seconds.
    rows = load_rows(data_path)
    tokenizer = load_tokenizer(config.model)
    model, model_text = load_model(config.model, tokenizer, config.seed, device, dtype)
    max_length = min(config.max_length, _context_length(model))
    dataset = encode_rows(rows, tokenizer, max_length, data_path)

    steps_per_epoch = math.ceil(
        math.ceil(len(dataset.examples) / config.batch_size) / config.grad_accum
    )
    limits = [n for n in (config.max_steps, _epoch_steps(config.epochs, steps_per_epoch)) if n]
    progress = Progress(min(limits) if limits else None, config.resolved_time_budget())
    schedule = WarmupCosine(config.resolved_lr(), _warmup(config.warmup_steps, progress.max_steps))

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _banner(echo, config, model_text, data_path, dataset, device, dtype, max_length, progress)
    echo(f"  threads  {threads} ({threads_why})")
    (output_dir / "run.json").write_text(json.dumps(_run_record(config, device, dtype), indent=2))

    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=schedule.peak_lr,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",
    )
    batches = epoch_batches(dataset.examples, config.batch_size, pad_id(tokenizer), config.seed)
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    display = ProgressDisplay(config.progress)
    losses: list[float] = []
    tokens = supervised = step = 0
    stopped_by = "max_steps"
    start = time.perf_counter()
    try:
        with stop:
            while True:
                elapsed = time.perf_counter() - start
                if progress.done(step, elapsed):
                    if progress.max_steps != step:
                        stopped_by = "time_budget"
                    else:
                        stopped_by = "max_steps" if config.max_steps == step else "epochs"
                    break
                if stop.requested:
                    stopped_by = "interrupt"
                    break
                lr = schedule.lr(step, progress.fraction(step, elapsed))
                micro = [next(batches) for _ in range(config.grad_accum)]
                step_start = time.perf_counter()
                loss, aux_loss, grad_norm = _train_step(model, optimizer, micro, lr, config, device)
                step_time = time.perf_counter() - step_start
                step += 1
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at step {step}; "
                        f"try a lower --lr (now {schedule.peak_lr:g})"
                    )
                step_tokens = sum(b.tokens for b in micro)
                tokens += step_tokens
                supervised += sum(b.supervised for b in micro)
                losses.append(loss)
                elapsed = time.perf_counter() - start
                record = {
                    "step": step,
                    "epoch": micro[-1].epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": step_tokens,
                    "supervised_tokens": sum(b.supervised for b in micro),
                    "step_time_s": step_time,
                    "tokens_per_s": step_tokens / step_time,
                    "total_tokens": tokens,
                    "elapsed_s": elapsed,
                }
                if aux_loss is not None:
                    record["aux_loss"] = aux_loss
                if device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if step % config.log_every == 0:
                    metrics.write(record)
                display.update(progress.fraction(step, elapsed), step, loss, tokens / elapsed)
                if on_step is not None:
                    on_step(record)
    finally:
        display.close()
        metrics.close()
    train_seconds = time.perf_counter() - start

    checkpoint: Path | None = None
    if step > 0:
        state = {"step": step, "tokens": tokens, "loss": losses[-1], "stopped_by": stopped_by}
        echo(f"saving checkpoint to {output_dir / CHECKPOINT_DIR} ...")
        checkpoint = save_checkpoint(model, tokenizer, output_dir / CHECKPOINT_DIR, state)
    summary = Summary(
        steps=step,
        tokens=tokens,
        supervised_tokens=supervised,
        train_seconds=train_seconds,
        tokens_per_s=tokens / train_seconds if train_seconds > 0 else 0.0,
        first_loss=losses[0] if losses else math.nan,
        last_loss=losses[-1] if losses else math.nan,
        last_loss_mean10=sum(losses[-10:]) / len(losses[-10:]) if losses else math.nan,
        stopped_by=stopped_by,
        checkpoint=str(checkpoint) if checkpoint else None,
    )
    (output_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    echo(summary.render())
    if config.model is None and step > 0:
        echo(_sample_text(model, tokenizer))
    return RunResult(summary, model, tokenizer, output_dir, stopped_by == "interrupt")


def _train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    micro: list[Batch],
    lr: float,
    config: FinetuneConfig,
    device: torch.device,
) -> tuple[float, float | None, float]:
    """One optimizer step over grad_accum micro-batches; returns (loss, aux loss, grad norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Every micro-batch's loss is divided by the supervised tokens of the whole step, so the
    # accumulated gradient is that of one big batch regardless of how tokens fall into batches.
    items = torch.tensor(sum(b.supervised for b in micro), device=device)
    total = torch.zeros((), device=device)
    aux_total: torch.Tensor | None = None
    for batch in micro:
        batch = batch.to(device)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            use_cache=False,
            num_items_in_batch=items,
        )
        out.loss.backward()
        total += out.loss.detach()
        if getattr(out, "aux_loss", None) is not None:
            aux = out.aux_loss.detach() / len(micro)
            aux_total = aux if aux_total is None else aux_total + aux
    params = [p for p in model.parameters() if p.grad is not None]
    clip = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), None if aux_total is None else float(aux_total), float(grad_norm)


def _sample_text(model: Any, tokenizer: Any) -> str:
    try:
        answer = sample_answer(model, tokenizer, DEFAULT_PROMPT)
    except Exception as exc:  # a demo line must never fail a run whose checkpoint is saved
        return f"sample       unavailable ({type(exc).__name__}: {exc})"
    hint = "" if answer else " (empty: the model needs more steps)"
    return f"sample       {DEFAULT_PROMPT!r} -> {answer!r}{hint}"


def _context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2**31 - 1)


def _epoch_steps(epochs: int | None, steps_per_epoch: int) -> int | None:
    return None if epochs is None else epochs * steps_per_epoch


def _warmup(warmup_steps: int, max_steps: int | None) -> int:
    # A short run must not spend itself warming up: at most half of its steps.
    return min(warmup_steps, max_steps // 2) if max_steps else warmup_steps


def _banner(
    echo: Callable[[str], None],
    config: FinetuneConfig,
    model_text: str,
    data_path: Path,
    dataset: EncodedDataset,
    device: torch.device,
    dtype: torch.dtype,
    max_length: int,
    progress: Progress,
) -> None:
    from turbomoe.info import patch_status

    n_tokens = sum(len(e.input_ids) for e in dataset.examples)
    n_sup = sum(e.supervised for e in dataset.examples)
    data_text = (
        f"{data_path}: {len(dataset.examples):,} examples, "
        f"{n_tokens:,} tokens ({n_sup:,} with loss)"
    )
    if dataset.truncated or dataset.dropped:
        data_text += (
            f"; {dataset.truncated} cut at {max_length} tokens, {dataset.dropped} dropped "
            "(nothing left to learn)"
        )
    bounds = []
    if progress.max_steps:
        bounds.append(f"{progress.max_steps:,} steps")
    if progress.time_budget:
        bounds.append(f"{progress.time_budget:g} s of training")
    batch = f"batch {config.batch_size}" + (
        f" x {config.grad_accum} accumulated" if config.grad_accum > 1 else ""
    )
    echo(f"turbomoe {turbomoe.__version__} finetune")
    echo(f"  model    {model_text}")
    echo(f"  data     {data_text}")
    echo(f"  device   {device}, {str(dtype).removeprefix('torch.')}; {patch_status().summary}")
    echo(
        f"  train    until {' or '.join(bounds)}; {batch}, AdamW lr {config.resolved_lr():g} "
        f"(warmup + cosine), clip {config.max_grad_norm:g}, seed {config.seed}"
    )
    echo(f"  output   {config.output_dir}")


def _run_record(config: FinetuneConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    return {
        "config": config.to_dict(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {
            "turbomoe": turbomoe.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
