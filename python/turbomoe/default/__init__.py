"""The embedded default of `turbomoe finetune`: a tiny Qwen3-MoE config, a byte-level chat
tokenizer built offline, and a bundled instruction dataset (instructions.jsonl)."""

from pathlib import Path

from turbomoe.default.model import build_model, default_config
from turbomoe.default.tokenizer import build_tokenizer

DATASET = Path(__file__).with_name("instructions.jsonl")

__all__ = ["DATASET", "build_model", "build_tokenizer", "default_config"]
