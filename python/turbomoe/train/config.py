"""What a fine-tuning run does: every key of `turbomoe finetune`, grouped in sections, with its
default and its help text, plus YAML loading, dotted `--section.key=value` overrides and
validation with messages that name the key (and suggest the closest one for a typo)."""

from __future__ import annotations

import difflib
import math
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

DEFAULT_OUTPUT_DIR = "runs/default"
DEFAULT_TIME_BUDGET = 60.0  # seconds; applies only when no step or epoch limit is given
# A tiny model trained from scratch wants a large rate; a pretrained one is fine-tuned gently.
DEFAULT_LR_EMBEDDED = 1e-3
DEFAULT_LR_PRETRAINED = 2e-5
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """An invalid key or value (the CLI reports it as a usage error, exit 2)."""


def _key(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    low: float | None = None,
    strict: bool = False,
) -> Any:
    """A config field with its help, allowed choices and lower bound (strict: bound excluded)."""
    meta = {"help": help, "choices": choices, "low": low, "strict": strict}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    path: str | None = _key(
        None, "local Hugging Face model directory; null = the embedded tiny MoE, random init"
    )
    dtype: str = _key(
        "auto",
        "parameter dtype; auto = bfloat16 on GPUs that support it, else float32",
        choices=DTYPES,
    )
    device: str = _key("auto", "auto, cpu, cuda or cuda:N; auto = cuda when available")
    attn_implementation: str | None = _key(
        None, "sdpa, eager, flash_attention_2...; null = the model's default"
    )


@dataclass
class DataSection:
    path: str | None = _key(None, "training data, jsonl; null = the bundled instruction set")
    val_file: str | None = _key(None, "validation data, jsonl (same formats)")
    val_fraction: float = _key(
        0.0,
        "hold out this fraction of the training rows for validation (when no val_file)",
        low=0.0,
    )
    max_length: int = _key(
        2048,
        "cut examples to N tokens (and to the model's context); with "
        "packing, the packed row length",
        low=1,
    )
    packing: bool = _key(
        False,
        "pack several examples into each row; documents never attend "
        "to each other (position ids restart per document)",
    )
    pad_to_multiple_of: int = _key(
        64,
        "round each batch's row length up to a multiple of N (at most max_length): fewer "
        "distinct shapes, so GPU kernels are not re-planned every step; 1 = the longest row",
        low=1,
    )


@dataclass
class TrainSection:
    output_dir: str = _key(DEFAULT_OUTPUT_DIR, "where metrics, plots and checkpoints go")
    max_steps: int | None = _key(None, "stop after N optimizer steps", low=1)
    epochs: int | None = _key(None, "stop after N passes over the data", low=1)
    time_budget: float | None = _key(
        None,
        f"stop after this many seconds of training; 0 = no "
        f"limit; null = {DEFAULT_TIME_BUDGET:g} when neither "
        "max_steps nor epochs is given",
        low=0.0,
    )
    batch_size: int = _key(16, "examples (packed rows with packing) per micro-batch", low=1)
    grad_accum: int = _key(1, "micro-batches per optimizer step", low=1)
    seed: int = _key(0, "seed of the model init, the data split and the data order")
    threads: int | None = _key(None, "CPU threads for torch; null = one per idle core", low=1)
    eval_every: int = _key(
        0,
        "evaluate on the validation split every N steps (and at the end); 0 = only at the end",
        low=0,
    )
    router_aux_loss_coef: float = _key(
        0.0, "add coef x the router load-balancing loss (output_router_logits); 0 = off", low=0.0
    )
    peak_tflops: float | None = _key(
        None,
        "per-GPU peak TFLOP/s for MFU (e.g. 989 for an H100/"
        "H200 in bf16); null = report TFLOP/s only",
        low=0.0,
        strict=True,
    )
    ep_size: int = _key(
        1, "expert-parallel ranks under torchrun (must divide the world size)", low=1
    )
    ep_placement: str = _key(
        "blocks",
        "with ep_size > 1: each rank owns a contiguous block of experts, or 'load': the experts "
        "are placed by the first batch's routing so that ranks receive even rows "
        "(turbomoe.parallel.balance_experts); checkpoints keep the placement for resuming",
        choices=("blocks", "load"),
    )
    ep_replan_every: int = _key(
        0,
        "with ep_placement=load: place the experts again every N steps, by the routing of the "
        "next step's first batch, AdamW's moments moving with them (0: only at the start). "
        "Routing drifts as the router trains; each re-placement costs one forward and moves "
        "the experts that change rank",
        low=0,
    )
    cuda_graph: bool = _key(
        False,
        "one process: replay each training step from a CUDA graph (turbomoe.train."
        "GraphedStep; needs grad_accum 1). With data.packing every batch is padded to "
        "[batch_size, max_length] so all replay; otherwise other shapes run eagerly",
    )


@dataclass
class OptimSection:
    lr: float | None = _key(
        None,
        f"peak AdamW learning rate; null = {DEFAULT_LR_EMBEDDED:g} for "
        f"the embedded model, {DEFAULT_LR_PRETRAINED:g} with model.path",
        low=0.0,
        strict=True,
    )
    warmup_steps: int = _key(10, "linear warmup steps (at most half of max_steps)", low=0)
    min_lr_ratio: float = _key(0.1, "the cosine decays to this fraction of lr", low=0.0)
    weight_decay: float = _key(0.0, "AdamW weight decay", low=0.0)
    beta1: float = _key(0.9, "AdamW beta1", low=0.0)
    beta2: float = _key(0.999, "AdamW beta2", low=0.0)
    eps: float = _key(1e-8, "AdamW epsilon", low=0.0, strict=True)
    max_grad_norm: float = _key(1.0, "clip the gradient norm; 0 = no clipping", low=0.0)
    state_dtype: str = _key(
        "float32",
        "dtype of the AdamW moments (bfloat16 halves their memory)",
        choices=("float32", "bfloat16"),
    )


@dataclass
class LoraSection:
    enabled: bool = _key(False, "train LoRA adapters (peft) instead of all weights")
    r: int = _key(8, "adapter rank", low=1)
    alpha: float = _key(16.0, "adapter scale numerator (scale = alpha / r)", low=0.0, strict=True)
    dropout: float = _key(
        0.0, "dropout on the adapter input (must be 0 with target_parameters)", low=0.0
    )
    # _key gives list defaults a default_factory, so no list is shared between instances.
    target_modules: list[str] = _key(  # noqa: RUF009
        ["q_proj", "k_proj", "v_proj", "o_proj"], "linear modules that get adapters"
    )
    target_parameters: list[str] = _key(  # noqa: RUF009
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "3-D expert weights that get per-expert adapters",
    )


@dataclass
class CheckpointSection:
    every_steps: int = _key(0, "save a checkpoint every N steps; 0 = only at the end", low=0)
    keep_last: int = _key(2, "keep the newest N step checkpoints; 0 = keep all", low=0)
    max_shard_size: str = _key("5GB", "safetensors shard size (save_pretrained's max_shard_size)")
    resume: str | None = _key(
        None,
        "'latest' (of train.output_dir), a run directory or a "
        "checkpoint directory to continue from exactly",
    )


@dataclass
class LogSection:
    every_steps: int = _key(1, "write a metrics.jsonl line every N steps", low=1)
    progress: str = _key(
        "auto",
        "a live bar, or a line every 10%; auto = bar on a terminal",
        choices=("auto", "bar", "lines"),
    )
    plots: bool = _key(True, "write loss.png and throughput.png at the end")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "optim": OptimSection,
    "lora": LoraSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}

# The flags of the first `turbomoe finetune`, kept working as short names for dotted keys.
ALIASES: dict[str, str] = {
    "model": "model.path",
    "dtype": "model.dtype",
    "device": "model.device",
    "data": "data.path",
    "max_length": "data.max_length",
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "epochs": "train.epochs",
    "time_budget": "train.time_budget",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "seed": "train.seed",
    "threads": "train.threads",
    "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm",
    "log_every": "log.every_steps",
    "progress": "log.progress",
    "resume": "checkpoint.resume",
}


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    @classmethod
    def from_values(cls, values: dict[str, Any] | None = None, **flat: Any) -> FinetuneConfig:
        """A config from nested values (as in a YAML file) and dotted or alias keys
        (``train.max_steps=3`` or ``max_steps=3``; Python callers pass the latter as kwargs)."""
        config = cls()
        for section, body in (values or {}).items():
            if section not in SECTIONS:
                raise ConfigError(_unknown(section, list(SECTIONS)))
            if not isinstance(body, dict):
                raise ConfigError(f"{section}: expected a mapping of keys, got {body!r}")
            for key, value in body.items():
                config.set(f"{section}.{key}", value)
        for key, value in flat.items():
            config.set(key, value)
        return config

    def set(self, key: str, value: Any) -> None:
        """Sets a dotted key (or an alias) to value, converting strings from the command line."""
        dotted = ALIASES.get(key.replace("-", "_"), key)
        section_name, _, name = dotted.partition(".")
        if section_name not in SECTIONS or not name:
            raise ConfigError(_unknown(key, all_keys()))
        section = getattr(self, section_name)
        spec = {f.name: f for f in fields(section)}
        if name not in spec:
            raise ConfigError(_unknown(key, all_keys()))
        hint = get_type_hints(type(section))[name]
        setattr(section, name, _convert(dotted, value, hint, spec[name].metadata))

    def validate(self) -> None:
        """Cross-key checks; each key's own type, range and choices are checked by set()."""
        for section_name in SECTIONS:
            section = getattr(self, section_name)
            hints = get_type_hints(type(section))
            for f in fields(section):
                dotted = f"{section_name}.{f.name}"
                _convert(dotted, getattr(section, f.name), hints[f.name], f.metadata)
        if self.data.val_fraction >= 1:
            raise ConfigError(f"data.val_fraction must be below 1, got {self.data.val_fraction}")
        if self.data.val_file and self.data.val_fraction:
            raise ConfigError("give data.val_file or data.val_fraction, not both")
        t = self.train
        if self.resolved_time_budget() is None and t.max_steps is None and t.epochs is None:
            raise ConfigError(
                "nothing bounds the run: give train.max_steps, train.epochs or a "
                "train.time_budget above 0"
            )
        if t.cuda_graph and t.grad_accum > 1:
            raise ConfigError(
                "train.cuda_graph needs train.grad_accum 1: a replayed step writes the gradients "
                "and cannot add micro-batches to them (raise train.batch_size instead)"
            )
        if t.ep_replan_every and t.ep_placement != "load":
            raise ConfigError(
                "train.ep_replan_every places experts by load: it needs train.ep_placement=load"
            )
        if self.lora.enabled and self.lora.target_parameters and self.lora.dropout:
            raise ConfigError("lora.dropout must be 0 when lora.target_parameters is set (peft)")
        if not self.lora.target_modules and not self.lora.target_parameters and self.lora.enabled:
            raise ConfigError("lora: give lora.target_modules or lora.target_parameters")

    def resolved_lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return DEFAULT_LR_EMBEDDED if self.model.path is None else DEFAULT_LR_PRETRAINED

    def resolved_time_budget(self) -> float | None:
        """Seconds of training allowed, or None for no time limit (0 means none as well)."""
        t = self.train
        if t.time_budget is None:
            bounded = t.max_steps is not None or t.epochs is not None
            return None if bounded else DEFAULT_TIME_BUDGET
        return t.time_budget or None

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {f.name: _plain(getattr(getattr(self, name), f.name)) for f in fields(cls)}
            for name, cls in SECTIONS.items()
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: invalid YAML: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected sections (model:, data:, ...) at the top")
    return values


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, help, default) of every key, for --help."""
    rows = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            help_text = f.metadata["help"]
            if f.metadata["choices"]:
                help_text += f" ({', '.join(f.metadata['choices'])})"
            rows.append((f"{section}.{f.name}", help_text, _show(default)))
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) if value else "[]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _unknown(key: str, known: list[str]) -> str:
    candidates = known + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close and "." in key:  # a typo in the section name: match on the key name alone
        tail = key.rsplit(".", 1)[1]
        close = [k for k in known if k.rsplit(".", 1)[1] == tail][:1]
    hint = f"; did you mean {ALIASES.get(close[0], close[0])}?" if close else ""
    return f"unknown key {key}{hint} (see turbomoe finetune --help)"


def _convert(key: str, value: Any, hint: Any, meta: Any) -> Any:
    """value (a YAML value or a command-line string) as the key's type, range-checked."""
    optional = isinstance(hint, types.UnionType) and type(None) in get_args(hint)
    target = next(t for t in get_args(hint) if t is not type(None)) if optional else hint
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~"):
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: may not be null")
    if target is bool:
        value = _to_bool(key, value)
    elif target is int:
        value = _to_number(key, value, int)
    elif target is float:
        value = _to_number(key, value, float)
    elif target is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        value = str(value)
    elif get_args(target) == (str,):  # list[str]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{key}: invalid choice {value!r} (choose from {', '.join(choices)})")
    low = meta.get("low")
    if low is not None and isinstance(value, int | float) and not isinstance(value, bool):
        if value < low or (meta.get("strict") and value == low):
            bound = f"greater than {low:g}" if meta.get("strict") else f"at least {low:g}"
            raise ConfigError(f"{key}: must be {bound}, got {value}")
    return value


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _to_number(key: str, value: Any, kind: type) -> Any:
    name = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected {name}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value) if not isinstance(value, float) else _fail(key, name, value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def _fail(key: str, name: str, value: Any) -> Any:
    raise ConfigError(f"{key}: expected {name}, got {value!r}")
