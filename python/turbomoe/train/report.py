"""The banner a run prints before training: what is trained, on what, where, for how long."""

from __future__ import annotations

from pathlib import Path

import torch

import turbomoe
from turbomoe.train.config import FinetuneConfig
from turbomoe.train.encode import EncodedDataset
from turbomoe.train.schedule import Progress


def banner_lines(
    config: FinetuneConfig,
    model_text: str,
    data_path: Path,
    dataset: EncodedDataset,
    val: EncodedDataset | None,
    device: torch.device,
    dtype: torch.dtype,
    max_length: int,
    progress: Progress,
    trainable: int,
    world: int,
) -> list[str]:
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
    if config.data.packing:
        data_text += f"; packed into rows of {max_length} tokens"
    bounds = []
    if progress.max_steps:
        bounds.append(f"{progress.max_steps:,} steps")
    if progress.time_budget:
        bounds.append(f"{progress.time_budget:g} s of training")
    t, o = config.train, config.optim
    batch = f"batch {t.batch_size}" + (f" x {t.grad_accum} accumulated" if t.grad_accum > 1 else "")
    if world > 1:
        batch += f" x {world} ranks (ep {t.ep_size})"
    what = "LoRA" if config.lora.enabled else "full"
    lines = [
        f"turbomoe {turbomoe.__version__} finetune",
        f"  model    {model_text}",
        f"  data     {data_text}",
    ]
    if val is not None:
        lines.append(f"  val      {len(val.examples):,} examples")
    lines += [
        f"  device   {device}, {str(dtype).removeprefix('torch.')}; {patch_status().summary}",
        f"  train    {what}, {trainable / 1e6:,.2f} M trainable parameters; until "
        f"{' or '.join(bounds)}; {batch}, AdamW lr {config.resolved_lr():g} (warmup + cosine, "
        f"{o.state_dtype} states), clip {o.max_grad_norm:g}, seed {t.seed}",
        f"  output   {t.output_dir}",
    ]
    return lines
