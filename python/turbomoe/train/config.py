"""What a fine-tuning run does: every knob of `turbomoe finetune`, with its default."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_OUTPUT_DIR = "runs/default"
DEFAULT_TIME_BUDGET = 60.0  # seconds; applies only when no step or epoch limit is given
# A tiny model trained from scratch wants a large rate; a pretrained one is fine-tuned gently.
DEFAULT_LR_EMBEDDED = 1e-3
DEFAULT_LR_PRETRAINED = 2e-5


class ConfigError(ValueError):
    """An invalid combination of options (the CLI reports it as a usage error)."""


@dataclass
class FinetuneConfig:
    model: str | None = None  # local HF directory; None = the embedded tiny MoE
    data: str | None = None  # jsonl file; None = the bundled instruction set
    output_dir: str = DEFAULT_OUTPUT_DIR
    max_steps: int | None = None
    time_budget: float | None = None  # seconds; None = DEFAULT_TIME_BUDGET unless bounded otherwise
    epochs: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # None = DEFAULT_LR_EMBEDDED or DEFAULT_LR_PRETRAINED
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 2048
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # CPU threads for torch; None = torch's default
    log_every: int = 1
    progress: bool | None = None  # None = a progress bar when stderr is a terminal

    def validate(self) -> None:
        positive = {
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--max-length": self.max_length,
            "--log-every": self.log_every,
            "--threads": 1 if self.threads is None else self.threads,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.time_budget is not None and self.time_budget < 0:
            raise ConfigError(f"--time-budget must be >= 0 seconds, got {self.time_budget}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("--weight-decay and --max-grad-norm must be >= 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"--dtype must be auto, float32, bfloat16 or float16, not {self.dtype}"
            )
        if self.resolved_time_budget() is None and self.max_steps is None and self.epochs is None:
            raise ConfigError(
                "nothing bounds the run: give --max-steps, --epochs or a --time-budget above 0"
            )

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_EMBEDDED if self.model is None else DEFAULT_LR_PRETRAINED

    def resolved_time_budget(self) -> float | None:
        """Seconds of training allowed, or None for no time limit (0 means none as well)."""
        if self.time_budget is None:
            bounded = self.max_steps is not None or self.epochs is not None
            return None if bounded else DEFAULT_TIME_BUDGET
        return self.time_budget or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
