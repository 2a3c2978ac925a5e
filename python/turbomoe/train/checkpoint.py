"""Atomic checkpoint directories: a checkpoint is either complete or absent, never half written.

The checkpoint is written into a temporary directory next to the target (same filesystem, so the
final rename is atomic), flushed to disk, then renamed over the target. A crash, an exception or a
second Ctrl-C while writing leaves the previous checkpoint untouched and no partial directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls write(tmp_dir) and then moves tmp_dir to target, replacing any previous target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes the directory private (0700); the checkpoint gets the usual permissions.
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(src: Path, target: Path) -> None:
    # rename() cannot replace a non-empty directory, so the old one is first moved aside; if the
    # second rename fails it is moved back, so the target is never lost.
    if not target.exists():
        os.replace(src, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(src, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories; durability is best-effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    target: str | Path,
    state: dict[str, Any],
    training_state: dict[str, Any] | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """An HF-format checkpoint (safetensors, sharded above max_shard_size, + config + tokenizer)
    that stock transformers loads -- or, for a peft model, its adapters, which peft loads --
    plus trainer_state.json (where training stopped) and training_state.pt (optimizer and RNG
    states, for an exact resume)."""

    from transformers.utils import logging as hf_logging

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if training_state is not None:
            import torch

            torch.save(training_state, tmp / TRAINING_STATE)

    # transformers draws its own "Writing model shards" bar; ours already says what is happening.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return save_atomically(target, write)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save_checkpoint_parallel(
    model: Any,
    tokenizer: Any,
    target: Path,
    state: dict[str, Any],
    training_state: dict[str, Any],
    rank: int,
    max_shard_size: str | int = "5GB",
) -> Path:
    """The same checkpoint for an expert-parallel model (a collective): every rank takes part in
    gathering the weights, rank 0 writes them into a temporary directory, every rank adds its own
    optimizer state (expert moments differ per rank), and rank 0 renames the directory into
    place."""
    import torch
    import torch.distributed as dist

    from turbomoe.parallel import save_pretrained

    tmp = target.parent / f".{target.name}.tmp-parallel"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    save_pretrained(model, tmp, max_shard_size=max_shard_size)  # complete on return, all ranks
    torch.save(training_state, tmp / f"training_state-rank{rank}.pt")
    if rank == 0:
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()
    if rank == 0:
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
        _fsync_dir(target.parent)
    dist.barrier()
    return target


TRAINING_STATE = "training_state.pt"
STEP_PREFIX = "step-"


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary directories start with a dot)."""
    if not checkpoints.is_dir():
        return []
    found = [
        p
        for p in checkpoints.iterdir()
        if p.name.startswith(STEP_PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))


def prune_checkpoints(checkpoints: Path, keep_last: int) -> None:
    """Deletes all but the newest keep_last step checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(checkpoints)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint a resume value names: 'latest' = the newest of output_dir (None when there
    is none yet, so a preemptible job can always pass it); a run directory = its newest; a
    checkpoint directory = itself. Raises FileNotFoundError for a path with no checkpoint."""
    if resume == "latest":
        found = list_checkpoints(output_dir / CHECKPOINTS_DIR)
        return found[-1] if found else None
    path = Path(resume)
    if (path / "trainer_state.json").is_file():
        return path
    found = list_checkpoints(path / CHECKPOINTS_DIR)
    if found:
        return found[-1]
    raise FileNotFoundError(f"checkpoint.resume {resume}: no checkpoint there")


CHECKPOINTS_DIR = "checkpoints"
