"""The run's metrics: one JSON object per step in <output>/metrics.jsonl, and the final summary."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO


class MetricsLog:
    """Appends one JSON line per record, flushed at once so `tail -f` and crashes see every step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("w", encoding="utf-8")

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
    stopped_by: str  # "max_steps", "time_budget", "interrupt"
    checkpoint: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"steps        {self.steps:,}",
            f"tokens       {self.tokens:,} ({self.supervised_tokens:,} with loss)",
            f"time         {self.train_seconds:.1f} s of training (stopped by {self.stopped_by})",
            f"throughput   {self.tokens_per_s:,.0f} tokens/s",
        ]
        if not math.isnan(self.first_loss):
            lines.append(
                f"loss         {self.first_loss:.3f} -> {self.last_loss:.3f} "
                f"(first step -> last step; mean of the last 10: {self.last_loss_mean10:.3f})"
            )
        if self.checkpoint:
            lines.append(f"checkpoint   {self.checkpoint}")
        return "\n".join(lines)
