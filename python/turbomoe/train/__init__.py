"""turbomoe's fine-tuning recipe: jsonl data -> a Hugging Face checkpoint (`turbomoe finetune`)."""

from turbomoe.train.config import ConfigError, FinetuneConfig
from turbomoe.train.data import DataError
from turbomoe.train.graph_step import GraphedStep, GraphStepError
from turbomoe.train.interrupt import StopRequest
from turbomoe.train.loop import RunResult, finetune

__all__ = [
    "ConfigError",
    "DataError",
    "FinetuneConfig",
    "GraphStepError",
    "GraphedStep",
    "RunResult",
    "StopRequest",
    "finetune",
]
