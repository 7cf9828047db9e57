"""Stage-1 training state (issue 18): does a killed-and-resumed decoder run, or one that finds its features
cached, end exactly where an uninterrupted run does? Prints the largest weight difference of each (0 = identical).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_resume.py --out runs/bench_resume
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

import train.decoder as trainer
from anomalygpt.weights import load_module


class Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint was written."""


def killed_after(epochs: int) -> Any:
    real, saves = trainer.save_checkpoint, []

    def save_then_die(*args: Any) -> None:
        real(*args)
        saves.append(1)
        if len(saves) == epochs:
            raise Killed

    return save_then_die


def max_difference(a: Path, b: Path) -> float:
    weights_a, weights_b = load_module(a / trainer.WEIGHTS)[0], load_module(b / trainer.WEIGHTS)[0]
    return max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_resume"))
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=2, help="epochs done when the run is killed")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = trainer.DecoderTrainConfig(
        out=args.out / "straight", train_samples=args.train_samples, val_samples=args.val_samples, epochs=args.epochs
    )
    trainer.train_decoder(cfg)
    real = trainer.save_checkpoint
    trainer.save_checkpoint = killed_after(args.kill_after)
    resumed = dataclasses.replace(cfg, out=args.out / "resumed")
    with contextlib.suppress(Killed):
        trainer.train_decoder(resumed)
    trainer.save_checkpoint = real
    trainer.train_decoder(dataclasses.replace(resumed, resume=True))
    cached = dataclasses.replace(cfg, out=args.out / "cached")
    cached.out.mkdir(parents=True)
    shutil.copy(cfg.out / trainer.FEATURES, cached.out / trainer.FEATURES)
    trainer.train_decoder(cached)
    resumed_diff, cached_diff = max_difference(cfg.out, resumed.out), max_difference(cfg.out, cached.out)
    print(f"killed after epoch {args.kill_after - 1} of {args.epochs}, resumed: max |dw| = {resumed_diff:g}")
    print(f"features found cached: max |dw| = {cached_diff:g}")
    print(f"torch threads {torch.get_num_threads()}; {args.train_samples} train / {args.val_samples} val images")


if __name__ == "__main__":
    main()
