"""Model, tokenizer, device and dtype for a run: the embedded default or a local HF directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from turbomoe.train.config import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA GPU when one is usable, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"model.device must be auto, cpu or cuda[:N], not {name}")
    return device


def resolve_threads(requested: int | None) -> tuple[int, str]:
    """CPU threads for torch and why. Unless requested, torch's default (one per core), less the
    cores the 1-minute load average shows busy: OpenMP threads spin while waiting for each other,
    so on oversubscribed cores every extra thread makes training several times slower."""
    if requested is not None:
        return requested, "train.threads"
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return default, "torch default"
    cores = os.cpu_count() or default
    threads = max(1, min(default, cores - int(load)))
    if threads == default:
        return default, "torch default"
    return threads, f"load average {load:.1f} on {cores} cores; train.threads overrides"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' trains in bfloat16 on GPUs that support it and in float32 on the CPU, where
    bfloat16 matmuls are slow and the tiny default model gains nothing from them."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_path: str | None) -> Any:
    """The byte-level tokenizer of the embedded default, or the tokenizer of a local HF model."""
    if model_path is None:
        from turbomoe.default.tokenizer import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_dir(model_path), local_files_only=True)


def load_model(
    model_path: str | None,
    tokenizer: Any,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
) -> tuple[Any, str]:
    """The model to train and a one-line description of it. With no path it is the embedded
    tiny MoE, randomly initialised from seed; otherwise a local HF directory (never the network)."""
    if model_path is None:
        from turbomoe.default.model import build_model, default_config

        config = default_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        if attn_implementation:
            config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        model = build_model(config).to(device=device, dtype=dtype)
        what = (
            f"embedded tiny {config.model_type}, {config.num_experts} experts "
            f"top-{config.num_experts_per_tok}, random init"
        )
    else:
        from transformers import AutoModelForCausalLM

        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(
            _model_dir(model_path),
            dtype=dtype,
            device_map=str(device),
            local_files_only=True,
            **extra,
        )
        what = f"{model_path} ({model.config.model_type})"
    params = sum(p.numel() for p in model.parameters())
    return model, f"{what}; {params / 1e6:,.2f} M parameters"


def _model_dir(path: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(
            f"model.path {path}: not a directory (give a local Hugging Face model dir)"
        )
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"model.path {path}: no config.json, so not a Hugging Face model directory"
        )
    return directory


def pad_id(tokenizer: Any) -> int:
    """The id used for padding; padded positions are masked, so eos serves when pad is unset."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
