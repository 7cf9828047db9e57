"""`anomalygpt simulate`: the argument layer over simulation.writer.run_simulate."""

from __future__ import annotations

import argparse

from simulation.writer import run_simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalygpt simulate",
        description="Write simulated anomalies (images, masks) and grounded conversations for training.",
    )
    parser.add_argument("--normals", required=True, help="folder of good images of the product")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an earlier run to resume)")
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--category", default=None, help="simulation parameters (simulation/params.json)")
    parser.add_argument("--size", type=int, default=256, help="square side the images are resized to")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_simulate(args.normals, args.out, args.n, args.seed, args.category, args.size)
