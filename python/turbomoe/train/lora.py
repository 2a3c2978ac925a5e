"""LoRA through peft: adapters on the attention projections and, per expert, on the 3-D expert
weights (peft >= 0.17 `target_parameters`), saved with peft's own save_pretrained so that
`PeftModel.from_pretrained(base, dir)` loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from turbomoe.train.config import ConfigError, LoraSection


def apply_lora(model: Any, lora: LoraSection, resume_from: Path | None = None) -> Any:
    """The model wrapped by peft with fresh adapters, or with the adapters saved in resume_from."""
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("lora.enabled needs the peft package (pip install peft)") from exc
    if resume_from is not None:
        return peft.PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or None,
        target_parameters=list(lora.target_parameters) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target that matches no module of this model
        raise ConfigError(f"lora: {exc}") from exc


def is_adapter_checkpoint(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()
