"""The `turbomoe` command: `finetune`, `info` and `bench`.

Exit status: 0 success, 1 the run failed (bad data, training error), 2 bad usage (unknown or
invalid options), 130 interrupted by Ctrl-C or SIGTERM (after saving the checkpoint).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from turbomoe.train.config import FinetuneConfig

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

FINETUNE_USAGE = (
    "usage: turbomoe finetune [--config FILE.yaml] [--resume RUN_DIR] [--SECTION.KEY=VALUE ...]"
)

_FINETUNE_INTRO = """\
Supervised fine-tuning of a causal LM on a jsonl file, through turbomoe's ops.
With no options it trains the embedded tiny Qwen3-MoE on the bundled instruction data for about
a minute.

options:
  -h, --help            show this help and exit
  --config FILE         a YAML file of sections (model:, data:, train:, optim:, lora:,
                        checkpoint:, log:) with the keys below; command-line keys override it
  --resume DIR          continue the run in DIR (or a checkpoint directory) exactly where it
                        stopped; its config.yaml is the base config (= --checkpoint.resume=DIR)
  --SECTION.KEY=VALUE   set one key (also --SECTION.KEY VALUE); lists are comma-separated,
                        null unsets
"""

_FINETUNE_EPILOG = """\
short names (the first release's flags): --model --data --max-length --output-dir --max-steps
  --epochs --time-budget --batch-size --grad-accum --lr --warmup-steps --weight-decay
  --max-grad-norm --seed --device --dtype --threads --log-every --progress

data formats (one JSON object per line):
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
      rendered with the model's chat template; loss on the assistant messages only
  {"prompt": "...", "completion": "..."}    plain text; loss on the completion only
  {"text": "..."}                           plain text; loss on all of it

run length: training stops at the first of train.max_steps, train.epochs and
train.time_budget. With none of them given, it runs for 60 seconds. The learning rate warms up
linearly, then follows a cosine to optim.min_lr_ratio of optim.lr over the run.

writes into train.output_dir: config.yaml (the resolved config), metrics.jsonl (one line per
step), summary.json, run.json, loss.png, throughput.png and checkpoints/step-N/ (Hugging Face
format: AutoModelForCausalLM.from_pretrained loads it; with LoRA, peft's
PeftModel.from_pretrained), each written atomically with the optimizer, data position and RNG
states for an exact resume. Ctrl-C or SIGTERM stops after the current step and saves.
Under torchrun only rank 0 prints and writes.

examples:
  turbomoe finetune                                   # tiny MoE, bundled data, ~1 minute
  turbomoe finetune --model ./Qwen3-30B-A3B --data train.jsonl --train.epochs=1 --optim.lr=1e-5
  turbomoe finetune --config run.yaml --lora.enabled=true --data.packing=true
  turbomoe finetune --resume runs/default             # continue after a stop
"""


def finetune_help() -> str:
    from turbomoe.train.config import SECTIONS, describe_keys

    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    lines = [FINETUNE_USAGE, "", _FINETUNE_INTRO]
    section = ""
    for key, help_text, default in describe_keys():
        name = key.split(".", 1)[0]
        if name != section:
            section = name
            lines.append(f"{name}:" if name in SECTIONS else name)
        text = f"{help_text} (default: {default})"
        body = textwrap.wrap(text, width=max(width - 33, 40))
        lines.append(f"  --{key:<28} {body[0]}")
        lines.extend(" " * 33 + more for more in body[1:])
    lines += ["", _FINETUNE_EPILOG]
    return "\n".join(lines)


def parse_finetune_args(argv: Sequence[str]) -> tuple[str | None, dict[str, str], bool]:
    """(--config path, {key: value} in command-line order, help requested). Raises ConfigError."""
    from turbomoe.train.config import ConfigError

    config_path: str | None = None
    overrides: dict[str, str] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if arg in ("-h", "--help"):
            return config_path, overrides, True
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unrecognized arguments: {arg}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i >= len(items) or (items[i].startswith("--") and not _negative(items[i])):
                raise ConfigError(f"--{key}: expected a value")
            value = items[i]
            i += 1
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
    return config_path, overrides, False


def _negative(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_config(argv: Sequence[str]) -> tuple[FinetuneConfig | None, bool]:
    """The validated FinetuneConfig of a command line, or (None, True) for --help."""
    from turbomoe.train.config import ConfigError, FinetuneConfig, load_yaml

    config_path, overrides, wants_help = parse_finetune_args(argv)
    if wants_help:
        return None, True
    values = load_yaml(config_path) if config_path else {}
    resume = overrides.get("resume", overrides.get("checkpoint.resume"))
    if resume and resume != "latest" and not config_path:
        # A run directory holds the config it ran with: resuming needs nothing else.
        saved = Path(resume) / "config.yaml"
        if not saved.is_file() and (Path(resume) / "trainer_state.json").is_file():
            saved = Path(resume).parent.parent / "config.yaml"
        if saved.is_file():
            values = load_yaml(saved)
    config = FinetuneConfig.from_values(values)
    for key, value in overrides.items():
        config.set(key, value)
    for key, path in (("data.path", config.data.path), ("data.val_file", config.data.val_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key} {path}: no such file")
    config.validate()
    return config, False


def build_parser() -> argparse.ArgumentParser:
    from turbomoe import __version__

    parser = argparse.ArgumentParser(
        prog="turbomoe",
        description="Fast Mixture-of-Experts fine-tuning for Hugging Face Transformers v5.",
        epilog="Run 'turbomoe COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"turbomoe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Listed for --help; main() hands everything after "finetune" to _finetune's own parsing
    # (dotted keys are open-ended, which argparse cannot express).
    commands.add_parser(
        "finetune",
        add_help=False,
        help="fine-tune a model (with no options: a tiny MoE on bundled data, about a minute)",
    )

    info = commands.add_parser(
        "info",
        help="versions, devices, op backends and HF patches: is my setup right?",
        description="Print versions, devices (GPUs, NVLink topology), which backend each op "
        "family uses on each device and why, and which Hugging Face model families turbomoe "
        "has patched.",
    )
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(handler=_info, subparser=info)

    # Listed for --help; main() hands everything after "bench" to the benchmark's own parser.
    commands.add_parser(
        "bench",
        add_help=False,
        help="stock transformers vs turbomoe side by side: TPS/GPU, TFLOP/s, MFU, peak memory "
        "(see `turbomoe bench --help`)",
    )
    return parser


def _usage_error(message: str) -> int:
    print(FINETUNE_USAGE, file=sys.stderr)
    print(f"turbomoe finetune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _finetune(argv: Sequence[str]) -> int:
    from turbomoe.train.config import ConfigError
    from turbomoe.train.data import DataError

    try:
        config, wants_help = build_config(argv)
    except ConfigError as exc:
        return _usage_error(str(exc))
    if wants_help or config is None:
        print(finetune_help())
        return 0
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun, rank 0 speaks for all
    try:
        from turbomoe.train.loop import finetune

        result = finetune(config)
    except ConfigError as exc:
        return _usage_error(str(exc))
    except (DataError, FloatingPointError) as exc:
        if not quiet:
            print(f"turbomoe finetune: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("turbomoe finetune: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.interrupted else 0


def _info(args: argparse.Namespace) -> int:
    from turbomoe.info import main as info_main

    return info_main(as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from turbomoe.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["finetune"]:
        return _finetune(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("turbomoe: error: choose a command: finetune, info or bench", file=sys.stderr)
        return EXIT_USAGE
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
