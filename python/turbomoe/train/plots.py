"""PNG plots of a finished run from its metrics.jsonl: loss (train and validation) and
throughput. matplotlib's Agg backend draws without a display (servers, CI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    """loss.png and throughput.png in out_dir; [] when matplotlib is missing or nothing logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    if not train:
        return []
    evals = [r for r in records if "val_loss" in r]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["tokens_per_s_per_gpu"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title("throughput")
    ax.grid(alpha=0.3)
    if train[0].get("tflops") is not None:
        twin = ax.twinx()
        twin.plot([r["step"] for r in train], [r["tflops"] for r in train], alpha=0.0)
        twin.set_ylabel("TFLOP/s per GPU")
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "throughput.png")
    return written
