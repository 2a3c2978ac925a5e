"""Learning-rate schedule and run progress.

A run may be bounded by steps, by wall time, or both, so the schedule is a function of *progress*
(0 -> 1) rather than of a step count known in advance: linear warmup over the first steps, then
cosine decay to a floor over whatever progress remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Decaying to 10% rather than to 0 keeps the last steps of a short run useful.
MIN_LR_RATIO = 0.1


@dataclass
class Progress:
    """How far a run is, from its step limit and its time budget (whichever is nearer the end)."""

    max_steps: int | None
    time_budget: float | None  # seconds of training time

    def fraction(self, step: int, elapsed: float) -> float:
        parts = [0.0]
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.time_budget:
            parts.append(elapsed / self.time_budget)
        return min(1.0, max(parts))

    def done(self, step: int, elapsed: float) -> bool:
        if self.max_steps is not None and step >= self.max_steps:
            return True
        return self.time_budget is not None and self.time_budget > 0 and elapsed >= self.time_budget


@dataclass
class WarmupCosine:
    peak_lr: float
    warmup_steps: int
    min_ratio: float = MIN_LR_RATIO
    _decay_start: float | None = field(default=None, init=False)

    def lr(self, step: int, progress: float) -> float:
        """The learning rate of optimizer step `step` (0-based) taken at `progress`."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self._decay_start is None:
            # Remember where warmup ended so the cosine spans exactly the rest of the run.
            self._decay_start = progress
        span = max(1.0 - self._decay_start, 1e-9)
        t = min(max((progress - self._decay_start) / span, 0.0), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.peak_lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def state_dict(self) -> dict[str, float | None]:
        return {"decay_start": self._decay_start}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self._decay_start = state["decay_start"]
