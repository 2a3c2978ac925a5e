"""Live progress: a tqdm bar on a terminal, a plain line every 10% elsewhere (CI logs, pipes)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_RESOLUTION = 1000  # bar positions; progress is a fraction, not a step count


class ProgressDisplay:
    def __init__(self, enabled: bool | None) -> None:
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm | None = None
        if interactive:
            self._bar = tqdm(
                total=_RESOLUTION,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
                desc="finetune",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self._next_line = 0.1

    def update(
        self, fraction: float, step: int, loss: float, tokens_per_s: float, **extra: Any
    ) -> None:
        """extra: lr, tflops, mfu, mem_gib -- shown when present."""
        text = f"step {step}  loss {loss:.4f}"
        if extra.get("lr") is not None:
            text += f"  lr {extra['lr']:.2e}"
        text += f"  {tokens_per_s:,.0f} tok/s/gpu"
        if extra.get("tflops") is not None:
            text += f"  {extra['tflops']:.3g} TFLOP/s"
        if extra.get("mfu") is not None:
            text += f"  MFU {extra['mfu']:.1%}"
        if extra.get("mem_gib") is not None:
            text += f"  mem {extra['mem_gib']:.1f} GiB"
        if self._bar is not None:
            self._bar.n = min(_RESOLUTION, int(fraction * _RESOLUTION))
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()
        elif fraction >= self._next_line:
            print(f"[{fraction:4.0%}] {text}", file=sys.stderr, flush=True)
            while self._next_line <= fraction:
                self._next_line += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
