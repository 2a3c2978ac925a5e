"""The run's metrics: one JSON object per step in <output>/metrics.jsonl, and the final summary."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


class MetricsLog:
    """Appends one JSON line per record, flushed at once so `tail -f` and crashes see every step.

    resume_step: continue a resumed run's file, dropping what was logged after the checkpoint
    (those steps are trained again). None starts a new file."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
        self._file: TextIO = self.path.open("w", encoding="utf-8")
        self._file.writelines(kept)
        self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Summary:
    steps: int
    tokens: int
    supervised_tokens: int
    train_seconds: float
    tokens_per_s: float
    first_loss: float
    last_loss: float
    last_loss_mean10: float  # mean of the last 10 steps: one step's loss is noisy
    stopped_by: str  # "max_steps", "epochs", "time_budget", "interrupt"
    checkpoint: str | None
    val_loss: float | None = None
    tflops_per_gpu: float | None = None  # achieved, from the model config's FLOPs per token
    mfu: float | None = None  # against train.peak_tflops, when given
    peak_mem_gib: float | None = None  # GPU: max allocated; CPU: the process's max RSS
    world_size: int = 1
    plots: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"steps        {self.steps:,}",
            f"tokens       {self.tokens:,} ({self.supervised_tokens:,} with loss)",
            f"time         {self.train_seconds:.1f} s of training (stopped by {self.stopped_by})",
            f"throughput   {self.tokens_per_s:,.0f} tokens/s"
            + (
                f" ({self.tokens_per_s / self.world_size:,.0f} per GPU)"
                if self.world_size > 1
                else ""
            ),
        ]
        if self.tflops_per_gpu is not None:
            mfu = f", MFU {self.mfu:.1%}" if self.mfu is not None else ""
            lines.append(f"compute      {self.tflops_per_gpu:.3g} TFLOP/s per device{mfu}")
        if self.peak_mem_gib is not None:
            lines.append(f"memory       {self.peak_mem_gib:,.2f} GiB peak")
        if not math.isnan(self.first_loss):
            lines.append(
                f"loss         {self.first_loss:.3f} -> {self.last_loss:.3f} "
                f"(first step -> last step; mean of the last 10: {self.last_loss_mean10:.3f})"
            )
        if self.val_loss is not None:
            lines.append(f"val loss     {self.val_loss:.3f}")
        if self.checkpoint:
            lines.append(f"checkpoint   {self.checkpoint}")
        if self.plots:
            lines.append(f"plots        {', '.join(self.plots)}")
        return "\n".join(lines)
