"""`anomalygpt train decoder|assistant`: the argument layer over the trainers.

Options are checked before anything is built or written; bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from anomalygpt.cli import CliParser, UsageError, check_out_dir, one_line
from anomalygpt.devices import add_device_option

PROG = "anomalygpt train"


def decoder_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, curves, decoder weights")
    parser.add_argument("--preset", default="default", help="preset name or JSON path (backbone and text encoder)")
    parser.add_argument("--train-samples", type=int, default=2400, help="simulated training images (default 2400)")
    parser.add_argument("--val-samples", type=int, default=400, help="simulated validation images (default 400)")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training split; the best is kept")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--hidden", type=int, default=0, help="projection width; 0 = linear projections")
    parser.add_argument(
        "--stack-coarser",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="finer stages' projections also read the coarser stages (default: on)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add_device_option(parser)


def assistant_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="an `anomalygpt simulate` output folder")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, loss curve, assistant/")
    parser.add_argument("--preset", default="default", help="preset name or JSON path (backbone, LLM, LoRA)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per step and process")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    parser.add_argument("--visual-lr", type=float, default=1e-3, help="prompt learner and projection learning rate")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--max-samples", type=int, default=0, help="use the first N conversations; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add_device_option(parser)


def build_parser() -> CliParser:
    parser = CliParser(prog=PROG, description="Train the parts of the assistant on simulated data.")
    verbs = parser.add_subparsers(dest="what", required=True)
    decoder_parser(verbs.add_parser("decoder", help="stage 1: the text-aligned anomaly decoder"))
    assistant_parser(verbs.add_parser("assistant", help="stage 2: prompt learner, image projection and LoRA"))
    return parser


def check_positive(**values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UsageError(f"--{name.replace('_', '-')}: must be positive, got {value}")


def run_decoder(args: argparse.Namespace) -> int:
    check_positive(
        train_samples=args.train_samples,
        val_samples=args.val_samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    if args.hidden < 0 or args.seed < 0:
        raise UsageError("--hidden and --seed: must be 0 or more")
    check_out_dir(args.out)
    from train.decoder import DecoderTrainConfig, train_decoder

    cfg = DecoderTrainConfig(
        out=args.out,
        preset=args.preset,
        train_samples=args.train_samples,
        val_samples=args.val_samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        stack_coarser=args.stack_coarser,
        seed=args.seed,
        resume=args.resume,
        device=args.device,
    )
    config = train_decoder(cfg)
    summary = {"validation": config["validation"], "zero_shot": config["zero_shot"], "seconds": config["train_seconds"]}
    print(json.dumps(summary, indent=2))
    return 0


def run_assistant(args: argparse.Namespace) -> int:
    check_positive(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        visual_lr=args.visual_lr,
        checkpoint_every=args.checkpoint_every,
    )
    if args.max_samples < 0 or args.seed < 0:
        raise UsageError("--max-samples and --seed: must be 0 or more")
    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such folder (write one with anomalygpt simulate)")
    check_out_dir(args.out)
    from train.assistant import AssistantTrainConfig, train_assistant

    cfg = AssistantTrainConfig(
        data=args.data,
        out=args.out,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        visual_lr=args.visual_lr,
        checkpoint_every=args.checkpoint_every,
        max_samples=args.max_samples,
        seed=args.seed,
        resume=args.resume,
        device=args.device,
    )
    print(json.dumps(train_assistant(cfg), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    try:
        return run_assistant(args) if args.what == "assistant" else run_decoder(args)
    except (ValueError, OSError) as error:
        print(f"{PROG} {args.what}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
