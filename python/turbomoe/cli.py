"""The `turbomoe` command: `finetune` and `info`.

Exit status: 0 success, 1 the run failed (bad data, training error), 2 bad usage (unknown or
invalid options), 130 interrupted by Ctrl-C (after saving the checkpoint).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_FINETUNE_EPILOG = """\
data formats (one JSON object per line):
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
      rendered with the model's chat template; loss on the assistant messages only
  {"prompt": "...", "completion": "..."}    plain text; loss on the completion only
  {"text": "..."}                           plain text; loss on all of it

run length: training stops at the first of --max-steps, --epochs and --time-budget. With none of
them given, it runs for 60 seconds. The learning rate warms up linearly, then follows a cosine to
10% of --lr over the run.

writes into --output-dir: metrics.jsonl (one line per step), summary.json, run.json and
checkpoint/ (Hugging Face format: load it with AutoModelForCausalLM.from_pretrained). The
checkpoint is written atomically; Ctrl-C stops after the current step and saves it.

examples:
  turbomoe finetune                                   # tiny MoE, bundled data, ~1 minute
  turbomoe finetune --model ./Qwen3-30B-A3B --data train.jsonl --epochs 1 --lr 1e-5
"""


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _float_at_least(low: float, *, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"greater than {low:g}" if strict else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from turbomoe import __version__
    from turbomoe.train.config import (
        DEFAULT_LR_EMBEDDED,
        DEFAULT_LR_PRETRAINED,
        DEFAULT_OUTPUT_DIR,
        DEFAULT_TIME_BUDGET,
        FinetuneConfig,
    )

    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(
        prog="turbomoe",
        description="Fast Mixture-of-Experts fine-tuning for Hugging Face Transformers v5.",
        epilog="Run 'turbomoe COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"turbomoe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    ft = commands.add_parser(
        "finetune",
        help="fine-tune a model (with no options: a tiny MoE on bundled data, about a minute)",
        description="Supervised fine-tuning of a causal LM on a jsonl file, through turbomoe's "
        "ops.\nWith no options it trains the embedded tiny Qwen3-MoE on the bundled instruction "
        "data\nfor about a minute.",
        epilog=_FINETUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = ft.add_argument_group("model and data")
    what.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face model directory (default: the embedded tiny MoE, random init)",
    )
    what.add_argument(
        "--data",
        metavar="FILE",
        help="training data, jsonl (default: the bundled instruction set, 425 chats)",
    )
    what.add_argument(
        "--max-length",
        type=_int_at_least(1),
        default=defaults.max_length,
        metavar="N",
        help="cut examples to N tokens, and to the model's context (default: %(default)s)",
    )
    what.add_argument(
        "--output-dir",
        metavar="DIR",
        default=DEFAULT_OUTPUT_DIR,
        help="where metrics and the checkpoint go (default: %(default)s)",
    )

    length = ft.add_argument_group("run length")
    length.add_argument(
        "--max-steps",
        type=_int_at_least(1),
        metavar="N",
        help="stop after N optimizer steps (default: no step limit)",
    )
    length.add_argument(
        "--epochs",
        type=_int_at_least(1),
        metavar="N",
        help="stop after N passes over the data (default: no epoch limit)",
    )
    length.add_argument(
        "--time-budget",
        type=_float_at_least(0.0),
        metavar="SECONDS",
        help=f"stop after this much training time; 0 = no limit (default: {DEFAULT_TIME_BUDGET:g} "
        "when neither --max-steps nor --epochs is given, else no limit)",
    )

    opt = ft.add_argument_group("optimisation")
    opt.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=defaults.batch_size,
        metavar="N",
        help="examples per micro-batch (default: %(default)s)",
    )
    opt.add_argument(
        "--grad-accum",
        type=_int_at_least(1),
        default=defaults.grad_accum,
        metavar="N",
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    opt.add_argument(
        "--lr",
        type=_float_at_least(0.0, strict=True),
        metavar="LR",
        help=f"peak AdamW learning rate (default: {DEFAULT_LR_EMBEDDED:g} for the embedded model, "
        f"{DEFAULT_LR_PRETRAINED:g} with --model)",
    )
    opt.add_argument(
        "--warmup-steps",
        type=_int_at_least(0),
        default=defaults.warmup_steps,
        metavar="N",
        help="linear warmup steps, at most half of --max-steps (default: %(default)s)",
    )
    opt.add_argument(
        "--weight-decay",
        type=_float_at_least(0.0),
        default=defaults.weight_decay,
        metavar="W",
        help="AdamW weight decay (default: %(default)s)",
    )
    opt.add_argument(
        "--max-grad-norm",
        type=_float_at_least(0.0),
        default=defaults.max_grad_norm,
        metavar="X",
        help="clip the gradient norm to X; 0 = no clipping (default: %(default)s)",
    )
    opt.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the model init and data order (default: %(default)s)",
    )

    hw = ft.add_argument_group("hardware and output")
    hw.add_argument(
        "--device",
        default=defaults.device,
        help="auto, cpu, cuda or cuda:N; auto = cuda when available (default: %(default)s)",
    )
    hw.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=defaults.dtype,
        help="parameter dtype; auto = bfloat16 on GPUs that support it, else float32 "
        "(default: %(default)s)",
    )
    hw.add_argument(
        "--threads",
        type=_int_at_least(1),
        metavar="N",
        help="CPU threads for torch (default: one per core, minus the cores the load average "
        "shows busy, since spinning threads on busy cores slow training several-fold)",
    )
    hw.add_argument(
        "--log-every",
        type=_int_at_least(1),
        default=defaults.log_every,
        metavar="N",
        help="write a metrics.jsonl line every N steps (default: %(default)s)",
    )
    hw.add_argument(
        "--progress",
        choices=("auto", "bar", "lines"),
        default="auto",
        help="a live bar, or a line every 10%%; auto = bar on a terminal (default: %(default)s)",
    )
    ft.set_defaults(handler=_finetune, subparser=ft)

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


def _finetune(args: argparse.Namespace) -> int:
    from turbomoe.train.config import ConfigError, FinetuneConfig
    from turbomoe.train.data import DataError

    sub: argparse.ArgumentParser = args.subparser  # its error() prints usage and exits 2
    if args.data is not None and not Path(args.data).is_file():
        sub.error(f"--data {args.data}: no such file")
    config = FinetuneConfig(
        model=args.model,
        data=args.data,
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        time_budget=args.time_budget,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        log_every=args.log_every,
        progress={"auto": None, "bar": True, "lines": False}[args.progress],
    )
    try:
        config.validate()
        from turbomoe.train.loop import finetune

        result = finetune(config)
    except ConfigError as exc:
        sub.error(str(exc))
    except (DataError, FloatingPointError) as exc:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("turbomoe: error: choose a command: finetune, info or bench", file=sys.stderr)
        return EXIT_USAGE
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
