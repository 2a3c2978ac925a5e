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


def save_checkpoint(model: Any, tokenizer: Any, target: str | Path, state: dict[str, Any]) -> Path:
    """An HF-format checkpoint (safetensors + config + tokenizer) that stock transformers loads,
    plus trainer_state.json describing where training stopped."""

    from transformers.utils import logging as hf_logging

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")

    # transformers draws its own "Writing model shards" bar; ours already says what is happening.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return save_atomically(target, write)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
