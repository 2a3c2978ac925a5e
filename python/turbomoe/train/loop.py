"""The fine-tuning run: data -> model (full or LoRA) -> AdamW steps -> metrics, evaluation,
periodic checkpoints that resume exactly -> final checkpoint, plots and summary."""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import turbomoe  # patches HF's MoE models onto turbomoe's ops wherever turbomoe supports them
from turbomoe.train import rng
from turbomoe.train.batching import BatchStream
from turbomoe.train.checkpoint import (
    CHECKPOINTS_DIR,
    TRAINING_STATE,
    find_resume_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_checkpoint_parallel,
    step_dir,
)
from turbomoe.train.config import ConfigError, FinetuneConfig
from turbomoe.train.data import DataError, Row, load_rows
from turbomoe.train.distributed import (
    Ranks,
    all_mean,
    all_sum,
    any_true,
    balance_experts,
    barrier,
    expert_slots,
    init_from_env,
    local_device,
    parallelize,
    place_experts,
)
from turbomoe.train.encode import encode_rows
from turbomoe.train.interrupt import StopRequest
from turbomoe.train.load import (
    load_model,
    load_tokenizer,
    pad_id,
    resolve_device,
    resolve_dtype,
    resolve_threads,
)
from turbomoe.train.lora import apply_lora
from turbomoe.train.metrics import MetricsLog, Summary
from turbomoe.train.optim import build_optimizer
from turbomoe.train.plots import write_plots
from turbomoe.train.progress import ProgressDisplay
from turbomoe.train.report import banner_lines
from turbomoe.train.sample import DEFAULT_PROMPT, sample_answer
from turbomoe.train.schedule import Progress, WarmupCosine
from turbomoe.train.step import evaluate, graphed_train_step, train_step


@dataclass
class RunResult:
    summary: Summary
    model: Any
    tokenizer: Any
    output_dir: Path
    interrupted: bool
    checkpoint: Path | None = None


def bundled_data_path() -> Path:
    return Path(__file__).resolve().parent.parent / "default" / "instructions.jsonl"


def finetune(
    config: FinetuneConfig,
    stop: StopRequest | None = None,
    echo: Callable[[str], None] = print,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Runs one fine-tuning job as described by config and saves its checkpoints.

    stop: lets a caller end the run early, as Ctrl-C does; the checkpoint is still saved once a
    step has been taken. echo: where the banner and summary go (rank 0 only). on_step: called
    with each step's metrics record (for notebooks, dashboards and tests).
    """
    config.validate()
    previous_threads = torch.get_num_threads()
    try:
        return _Run(config, stop or StopRequest(), echo, on_step).run()
    finally:
        torch.set_num_threads(previous_threads)


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, validation): a seeded random fraction of the rows held out, at least one row."""
    if fraction <= 0:
        return rows, []
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise DataError(f"data.val_fraction {fraction} leaves no training rows of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


class _Run:
    def __init__(
        self,
        config: FinetuneConfig,
        stop: StopRequest,
        echo: Callable[[str], None],
        on_step: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.config = config
        self.stop = stop
        self.on_step = on_step
        self.device = local_device(resolve_device(config.model.device))
        self.ranks: Ranks = init_from_env(self.device)
        self.echo = echo if self.ranks.main else (lambda _: None)
        self.output_dir = Path(config.train.output_dir)

    # ---- setup -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        c = self.config
        dtype = resolve_dtype(c.model.dtype, self.device)
        threads, threads_why = resolve_threads(c.train.threads)
        torch.set_num_threads(threads)
        if c.lora.enabled and self.ranks.world > 1:
            raise ConfigError("lora.enabled under torchrun is not supported yet; use one process")
        if c.train.cuda_graph and self.ranks.world > 1:
            raise ConfigError(
                "train.cuda_graph runs in one process: under torchrun the expert exchange and the "
                "gradient reduction synchronise with the host inside the step"
            )

        # Data is read and checked before the model is loaded, so a bad line fails in seconds.
        data_path = Path(c.data.path) if c.data.path else bundled_data_path()
        rows, val_rows = split_rows(load_rows(data_path), c.data.val_fraction, c.train.seed)
        if c.data.val_file:
            val_rows = load_rows(c.data.val_file)
        resume = self._resume_checkpoint()

        tokenizer = load_tokenizer(c.model.path)
        model, model_text = self._load_model(tokenizer, dtype, resume)
        max_length = min(c.data.max_length, _context_length(model))
        dataset = encode_rows(rows, tokenizer, max_length, data_path)
        val = (
            encode_rows(val_rows, tokenizer, max_length, c.data.val_file or data_path)
            if (val_rows)
            else None
        )
        model = parallelize(model, c.train.ep_size, self.ranks)
        self.parallel = self.ranks.world > 1
        self.graphed = (
            graphed_train_step(model, c.train.router_aux_loss_coef) if c.train.cuda_graph else None
        )

        stream = BatchStream(
            dataset.examples,
            c.train.batch_size,
            pad_id(tokenizer),
            c.train.seed,
            packing=c.data.packing,
            max_length=max_length,
            shard=(self.ranks.rank, self.ranks.world),
            pad_to_multiple_of=c.data.pad_to_multiple_of,
            # A replayed step needs one batch shape: packed batches are padded to it.
            fixed_shape=c.train.cuda_graph and c.data.packing,
        )
        per_step = c.train.grad_accum * self.ranks.world
        steps_per_epoch = math.ceil(stream.batches_per_epoch() / per_step)
        epoch_limit = None if c.train.epochs is None else c.train.epochs * steps_per_epoch
        limits = [n for n in (c.train.max_steps, epoch_limit) if n]
        progress = Progress(min(limits) if limits else None, c.resolved_time_budget())
        warmup = _warmup(c.optim.warmup_steps, progress.max_steps)
        schedule = WarmupCosine(c.resolved_lr(), warmup, c.optim.min_lr_ratio)

        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, schedule.peak_lr, c.optim, self.device)
        state = self._restore(resume, model, optimizer, stream, schedule)
        if resume is None and c.train.ep_placement == "load" and c.train.ep_size > 1:
            self._place_experts_by_next_batch(model, stream, optimizer)

        if self.ranks.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(c.to_yaml())
            (self.output_dir / "run.json").write_text(
                json.dumps(_run_record(c, self.device, dtype, self.ranks), indent=2)
            )
        trainable = sum(p.numel() for p in params)
        for line in banner_lines(
            c,
            model_text,
            data_path,
            dataset,
            val,
            self.device,
            dtype,
            max_length,
            progress,
            trainable,
            self.ranks.world,
        ):
            self.echo(line)
        self.echo(f"  threads  {threads} ({threads_why})")
        if resume is not None:
            self.echo(f"  resume   {resume} (step {state['step']})")
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer
        self.stream, self.schedule, self.progress, self.val = stream, schedule, progress, val
        self.max_length = max_length
        return self._train(state)

    def _place_experts_by_next_batch(
        self, model: Any, stream: BatchStream, optimizer: torch.optim.Optimizer
    ) -> int:
        """Place every layer's experts by the routing of the next batch, counted over all ranks
        (a collective), without consuming the batch; the optimizer's moments move with them.
        Returns how many (layer, expert) slots changed."""
        before = expert_slots(model)
        position = stream.state_dict()
        batch = next(stream)
        stream.load_state_dict(position)
        after = balance_experts(model, batch.to(self.device).model_inputs(), optimizer)
        if before is None:  # contiguous blocks: expert e in slot e
            before = [torch.arange(slots.numel()) for slots in after]
        return sum(int((new != old).sum()) for new, old in zip(after, before, strict=True))

    def _replan_due(self, step: int) -> bool:
        t = self.config.train
        return (
            t.ep_replan_every > 0
            and t.ep_size > 1
            and t.ep_placement == "load"
            and step > 0
            and step % t.ep_replan_every == 0
        )

    def _resume_checkpoint(self) -> Path | None:
        resume = self.config.checkpoint.resume
        if not resume:
            return None
        try:
            found = find_resume_checkpoint(resume, self.output_dir)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from exc
        if found is None:
            self.echo(f"checkpoint.resume=latest: no checkpoint in {self.output_dir}; starting")
        return found

    def _load_model(
        self, tokenizer: Any, dtype: torch.dtype, resume: Path | None
    ) -> tuple[Any, str]:
        c = self.config
        full_resume = resume is not None and not c.lora.enabled
        path = str(resume) if full_resume else c.model.path
        model, text = load_model(
            path, tokenizer, c.train.seed, self.device, dtype, c.model.attn_implementation
        )
        if full_resume:  # the weights come from the checkpoint, the description from the source
            text = text.replace(str(resume), c.model.path or "embedded tiny model")
        _prepare_aux_loss(model, c.train.router_aux_loss_coef)
        if c.lora.enabled:
            model = apply_lora(model, c.lora, resume)
            text += f"; LoRA r={c.lora.r} alpha={c.lora.alpha:g}"
        return model, text

    def _restore(
        self,
        resume: Path | None,
        model: Any,
        optimizer: torch.optim.Optimizer,
        stream: BatchStream,
        schedule: WarmupCosine,
    ) -> dict[str, Any]:
        fresh = {"step": 0, "tokens": 0, "supervised": 0, "elapsed_s": 0.0, "losses": []}
        if resume is None:
            return fresh
        trainer = json.loads((resume / "trainer_state.json").read_text())
        name = (
            TRAINING_STATE if self.ranks.world == 1 else f"training_state-rank{self.ranks.rank}.pt"
        )
        saved = torch.load(resume / name, weights_only=True, map_location="cpu")
        if saved.get("expert_slots") is not None:
            # The experts go back where they were trained, with the moments saved for them.
            place_experts(model, saved["expert_slots"])
        optimizer.load_state_dict(saved["optimizer"])
        # Each rank's own position (ranks stop at different batch indices); older: the shared one.
        stream.load_state_dict(saved.get("data", trainer["data"]))
        schedule.load_state_dict(trainer["schedule"])
        rng.restore(saved["rng"])
        return {**fresh, **{k: trainer[k] for k in fresh if k in trainer}}

    # ---- training ----------------------------------------------------------------------------

    def _train(self, state: dict[str, Any]) -> RunResult:
        c = self.config
        step: int = state["step"]
        tokens: int = state["tokens"]
        supervised: int = state["supervised"]
        losses: list[float] = list(state["losses"])
        metrics = (
            MetricsLog(self.output_dir / "metrics.jsonl", step if step else None)
            if (self.ranks.main)
            else None
        )
        display = ProgressDisplay(
            {"auto": None, "bar": True, "lines": False}[c.log.progress]
            if self.ranks.main
            else False
        )
        if not self.ranks.main:
            display = _NoDisplay()  # type: ignore[assignment]
        stopped_by = "max_steps"
        val_loss: float | None = None
        last_saved: Path | None = None
        tflops_sum = 0.0
        timed_steps = 0
        offset = float(state["elapsed_s"])
        start = time.perf_counter() - offset
        try:
            with self.stop:
                while True:
                    elapsed = time.perf_counter() - start
                    if self.progress.done(step, elapsed):
                        stopped_by = self._why_done(step)
                        break
                    if any_true(self.stop.requested, self.ranks, self.device):
                        stopped_by = "interrupt"
                        break
                    lr = self.schedule.lr(step, self.progress.fraction(step, elapsed))
                    if self._replan_due(step):
                        # Before the step, so that a run resumed from this step's checkpoint
                        # places the same experts by the same batch.
                        moved = self._place_experts_by_next_batch(
                            self.model, self.stream, self.optimizer
                        )
                        self.echo(f"  experts placed again before step {step + 1}: {moved} moved")
                    micro = [next(self.stream) for _ in range(c.train.grad_accum)]
                    local_sup = sum(b.supervised for b in micro)
                    global_sup = int(all_sum(local_sup, self.ranks, self.device))
                    step_start = time.perf_counter()
                    loss, aux_loss, grad_norm = train_step(
                        self.model,
                        self.optimizer,
                        micro,
                        lr,
                        max_grad_norm=c.optim.max_grad_norm,
                        aux_coef=c.train.router_aux_loss_coef,
                        device=self.device,
                        parallel=self.parallel,
                        global_supervised=self._loss_divisor(global_sup),
                        graphed=self.graphed,
                    )
                    loss = all_mean(loss, self.ranks, self.device)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    step_time = time.perf_counter() - step_start
                    step += 1
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"loss became {loss} at step {step}; "
                            f"try a lower optim.lr (now {self.schedule.peak_lr:g})"
                        )
                    step_tokens = int(
                        all_sum(sum(b.tokens for b in micro), self.ranks, self.device)
                    )
                    width = max(b.input_ids.shape[1] for b in micro)
                    tokens += step_tokens
                    supervised += global_sup
                    losses.append(loss)
                    elapsed = time.perf_counter() - start
                    record = self._record(
                        step,
                        micro[-1].epoch,
                        loss,
                        lr,
                        grad_norm,
                        step_tokens,
                        global_sup,
                        step_time,
                        tokens,
                        elapsed,
                        width,
                    )
                    if aux_loss is not None:
                        record["aux_loss"] = aux_loss
                    if record.get("tflops") is not None:
                        tflops_sum += record["tflops"]
                        timed_steps += 1
                    if c.train.eval_every and step % c.train.eval_every == 0 and self.val:
                        val_loss = self._evaluate()
                        record["val_loss"] = val_loss
                    if metrics is not None and (
                        step % c.log.every_steps == 0 or "val_loss" in record
                    ):
                        metrics.write(record)
                    display.update(
                        self.progress.fraction(step, elapsed),
                        step,
                        loss,
                        record["tokens_per_s_per_gpu"],
                        lr=lr,
                        tflops=record.get("tflops"),
                        mfu=record.get("mfu"),
                        mem_gib=record.get("peak_mem_gib"),
                    )
                    if self.on_step is not None:
                        self.on_step(record)
                    if c.checkpoint.every_steps and step % c.checkpoint.every_steps == 0:
                        done = self.progress.done(step, time.perf_counter() - start)
                        if not done:  # the final save below covers the last step
                            last_saved = self._save(
                                step, tokens, supervised, losses, elapsed, "periodic"
                            )
        finally:
            display.close()
            if metrics is not None:
                metrics.close()
        train_seconds = time.perf_counter() - start

        if self.val and (val_loss is None or not c.train.eval_every or step % c.train.eval_every):
            val_loss = self._evaluate()
            if metrics is not None:
                with (self.output_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
        if step > state["step"]:  # else nothing was trained since the checkpoint resumed from
            self.echo(
                f"saving checkpoint to {step_dir(self.output_dir / CHECKPOINTS_DIR, step)} ..."
            )
            last_saved = self._save(step, tokens, supervised, losses, train_seconds, stopped_by)
        plots = []
        if self.ranks.main and c.log.plots:
            plots = [
                str(p) for p in write_plots(self.output_dir / "metrics.jsonl", self.output_dir)
            ]
        mean_tflops = tflops_sum / timed_steps if timed_steps else None
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
            checkpoint=str(last_saved) if last_saved else None,
            val_loss=val_loss,
            tflops_per_gpu=mean_tflops,
            mfu=mean_tflops / c.train.peak_tflops if mean_tflops and c.train.peak_tflops else None,
            peak_mem_gib=_peak_mem_gib(self.device),
            world_size=self.ranks.world,
            plots=plots or None,
        )
        if self.ranks.main:
            (self.output_dir / "summary.json").write_text(
                json.dumps(summary.to_dict(), indent=2) + "\n"
            )
        self.echo(summary.render())
        # Not under torchrun: an expert-parallel forward is a collective, and the other ranks
        # have left (rank 0 alone would fail, or wait for them until the timeout).
        if c.model.path is None and step > 0 and self.ranks.main and not self.parallel:
            self.echo(_sample_text(self.model, self.tokenizer))
        return RunResult(
            summary,
            self.model,
            self.tokenizer,
            self.output_dir,
            stopped_by == "interrupt",
            last_saved,
        )

    def _loss_divisor(self, global_supervised: int) -> Any:
        """What each rank divides its summed token loss by. turbomoe.parallel averages gradients
        over ranks (the DDP convention), so under torchrun that is the step's global count over
        the world size: the averaged gradient (and its clipped norm) is then the gradient of the
        global per-token mean, and the ranks' losses average (all_mean) to that mean."""
        if not self.parallel:
            return global_supervised
        return global_supervised / self.ranks.world

    def _why_done(self, step: int) -> str:
        if self.progress.max_steps != step:
            return "time_budget"
        return "max_steps" if self.config.train.max_steps == step else "epochs"

    def _record(
        self,
        step: int,
        epoch: int,
        loss: float,
        lr: float,
        grad_norm: float,
        step_tokens: int,
        step_supervised: int,
        step_time: float,
        tokens: int,
        elapsed: float,
        width: int,
    ) -> dict[str, Any]:
        per_gpu = step_tokens / step_time / self.ranks.world
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "supervised_tokens": step_supervised,
            "step_time_s": step_time,
            "tokens_per_s": step_tokens / step_time,
            "tokens_per_s_per_gpu": per_gpu,
            "total_tokens": tokens,
            "elapsed_s": elapsed,
        }
        flops = _flops_per_token(self.model, width)
        if flops is not None:
            record["tflops"] = per_gpu * flops / 1e12
            if self.config.train.peak_tflops:
                record["mfu"] = record["tflops"] / self.config.train.peak_tflops
        record["peak_mem_gib"] = _peak_mem_gib(self.device)
        return record

    def _evaluate(self) -> float:
        assert self.val is not None
        c = self.config
        # In file order, no shuffling: every evaluation sees the same batches.
        batches = BatchStream(
            self.val.examples,
            c.train.batch_size,
            pad_id(self.tokenizer),
            0,
            packing=c.data.packing,
            max_length=self.max_length,
            max_epochs=1,
            shard=(self.ranks.rank, self.ranks.world),
            pad_to_multiple_of=c.data.pad_to_multiple_of,
            shuffle=False,
        )
        total, count = evaluate(self.model, batches, self.device)
        total = all_sum(total, self.ranks, self.device)
        count = int(all_sum(count, self.ranks, self.device))
        return total / max(count, 1)

    def _save(
        self,
        step: int,
        tokens: int,
        supervised: int,
        losses: list[float],
        elapsed: float,
        stopped_by: str,
    ) -> Path:
        c = self.config
        checkpoints = self.output_dir / CHECKPOINTS_DIR
        target = step_dir(checkpoints, step)
        trainer = {
            "step": step,
            "tokens": tokens,
            "supervised": supervised,
            "loss": losses[-1] if losses else None,
            "losses": losses,
            "elapsed_s": elapsed,
            "stopped_by": stopped_by,
            "data": self.stream.state_dict(),
            "schedule": self.schedule.state_dict(),
            "lora": c.lora.enabled,
        }
        training = {
            "optimizer": self.optimizer.state_dict(),
            "rng": rng.capture(),
            "data": self.stream.state_dict(),  # this rank's position
        }
        if self.parallel:
            training["expert_slots"] = expert_slots(self.model)  # None: contiguous blocks
            save_checkpoint_parallel(
                self.model,
                self.tokenizer,
                target,
                trainer,
                training,
                self.ranks.rank,
                c.checkpoint.max_shard_size,
            )
        else:
            save_checkpoint(
                self.model, self.tokenizer, target, trainer, training, c.checkpoint.max_shard_size
            )
        if self.ranks.main:
            prune_checkpoints(checkpoints, c.checkpoint.keep_last)
        barrier(self.ranks)
        return target


class _NoDisplay:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _prepare_aux_loss(model: Any, coef: float) -> None:
    """The router's load-balancing loss is added by train_step (once per step, scaled by coef),
    so the model's own coefficient is zeroed: HF would otherwise add it inside every forward."""
    if coef > 0:
        model.config.output_router_logits = True
        if hasattr(model, "router_aux_loss_coef"):
            model.router_aux_loss_coef = 0.0


def _flops_per_token(model: Any, seq: int) -> float | None:
    from turbomoe.bench.flops import flops_per_token

    try:
        return float(flops_per_token(model.config, seq))
    except Exception:  # an architecture the FLOPs formula does not know: report tokens/s only
        return None


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _sample_text(model: Any, tokenizer: Any) -> str:
    try:
        answer = sample_answer(model, tokenizer, DEFAULT_PROMPT)
    except Exception as exc:  # a demo line must never fail a run whose checkpoint is saved
        return f"sample       unavailable ({type(exc).__name__}: {exc})"
    hint = "" if answer else " (empty: the model needs more steps)"
    return f"sample       {DEFAULT_PROMPT!r} -> {answer!r}{hint}"


def _context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2**31 - 1)


def _warmup(warmup_steps: int, max_steps: int | None) -> int:
    # A short run must not spend itself warming up: at most half of its steps.
    return min(warmup_steps, max_steps // 2) if max_steps else warmup_steps


def _run_record(
    config: FinetuneConfig, device: torch.device, dtype: torch.dtype, ranks: Ranks
) -> dict[str, Any]:
    import transformers

    return {
        "config": config.to_dict(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": ranks.world,
        "versions": {
            "turbomoe": turbomoe.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
