"""Benchmark anomaly synthesis: samples per second and Poisson vs cut-paste boundary smoothness.

Normal images are random crops / flips of scikit-image's bundled images, resized to --size.
Usage: python bench/bench_simulation.py --out runs/bench_simulation.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from simulation.anomalies import (
    PatchPlacement,
    SimParams,
    foreground_mask,
    load_params,
    paste_patch,
    sample_placement,
    simulate_random,
)
from simulation.normals import normal_crops, object_images

GREY_NAMES = ("brick", "grass", "gravel", "camera", "coins", "moon", "cell", "clock")
COLOUR_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SOURCES_PER_SAMPLE = 4
GRADIENT_FIELDS = ("original", "cutpaste", "nsa_normal", "nsa_mixed")


@dataclass(frozen=True)
class BenchConfig:
    """Command-line settings."""

    size: int  # side of the square normal images
    samples: int  # simulate_random calls per throughput run
    pairs: int  # placements for the smoothness comparison
    pool: int  # normal images built from crops / flips
    seed: int
    out: Path


@dataclass(frozen=True)
class Throughput:
    """simulate_random speed over one image pool."""

    setting: str
    samples: int
    seconds: float
    samples_per_s: float
    ms_by_family: dict[str, float]
    count_by_family: dict[str, int]
    fallbacks: int  # samples whose first family could not mark this image and was redrawn


@dataclass(frozen=True)
class Smoothness:
    """Mean gradient magnitude in a band of ``band_px`` pixels either side of the pasted patches' border."""

    band_px: int
    pairs: int
    original: float
    cutpaste: float
    nsa_normal: float
    nsa_mixed: float
    ratio_normal: float  # nsa_normal / cutpaste
    ratio_mixed: float
    excess_ratio_normal: float  # (nsa_normal - original) / (cutpaste - original)
    excess_ratio_mixed: float
    frac_normal_smoother: float  # share of placements where NORMAL_CLONE beats cut-paste


def parse_config(argv: Sequence[str] | None = None) -> BenchConfig:
    """BenchConfig from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--pool", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args(argv)
    if min(args.size, args.samples, args.pairs, args.pool) < 1 or args.size < 64:
        parser.error("--samples, --pairs and --pool must be >= 1 and --size >= 64")
    return BenchConfig(args.size, args.samples, args.pairs, args.pool, args.seed, args.out)


def measure_throughput(setting: str, pool: list[np.ndarray], params: SimParams, cfg: BenchConfig) -> Throughput:
    """Time cfg.samples calls of simulate_random, each with a few other pool images as sources."""
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    fallbacks = 0
    start = time.perf_counter()
    for i in range(cfg.samples):
        rng = np.random.default_rng([cfg.seed, i])
        picks = rng.choice(len(pool), size=SOURCES_PER_SAMPLE + 1, replace=False)
        t0 = time.perf_counter()
        result = simulate_random(pool[picks[0]], [pool[j] for j in picks[1:]], params, rng)
        times[result.family] += time.perf_counter() - t0
        counts[result.family] += 1
        fallbacks += bool(result.params["failed_families"])
    seconds = time.perf_counter() - start
    ms = {f: round(1000 * times[f] / counts[f], 2) for f in sorted(counts)}
    speed = round(cfg.samples / seconds, 2)
    return Throughput(setting, cfg.samples, round(seconds, 3), speed, ms, dict(counts), fallbacks)


def band_gradient(image: np.ndarray, placement: PatchPlacement, band_px: int) -> float:
    """Mean Sobel gradient magnitude of ``image`` within ``band_px`` pixels of the placement mask's border."""
    y, x, h, w = placement.box
    region = np.zeros(image.shape[:2], np.uint8)
    region[y : y + h, x : x + w] = placement.mask
    kernel = np.ones((2 * band_px + 1, 2 * band_px + 1), np.uint8)
    band = (cv2.dilate(region, kernel) > 0) & ~(cv2.erode(region, kernel) > 0)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    magnitude = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    return float(magnitude[band].mean())


def measure_smoothness(pool: list[np.ndarray], params: SimParams, cfg: BenchConfig) -> list[Smoothness]:
    """Boundary gradients for the same placements pasted with NORMAL_CLONE, MIXED_CLONE and no blending."""
    rows: dict[int, list[list[float]]] = {1: [], 2: []}
    everything = np.ones((cfg.size, cfg.size), dtype=bool)
    for i in range(cfg.pairs):
        rng = np.random.default_rng([cfg.seed, 10**6 + i])
        target, source = (pool[j] for j in rng.choice(len(pool), size=2, replace=False))
        placement = sample_placement(foreground_mask(target, False), source, everything, params, rng)
        if placement is None:
            continue
        images = [target] + [paste_patch(target, placement, mode) for mode in ("none", "normal", "mixed")]
        for band_px, band_rows in rows.items():
            band_rows.append([band_gradient(image, placement, band_px) for image in images])
    return [_smoothness(band_px, np.asarray(band_rows)) for band_px, band_rows in rows.items()]


def _smoothness(band_px: int, rows: np.ndarray) -> Smoothness:
    """Summary of (N, 4) band gradients: original, cut-paste, normal clone, mixed clone."""
    original, cut, normal, mixed = rows.mean(axis=0)
    return Smoothness(
        band_px=band_px,
        pairs=len(rows),
        original=round(original, 3),
        cutpaste=round(cut, 3),
        nsa_normal=round(normal, 3),
        nsa_mixed=round(mixed, 3),
        ratio_normal=round(normal / cut, 4),
        ratio_mixed=round(mixed / cut, 4),
        excess_ratio_normal=round((normal - original) / (cut - original), 4),
        excess_ratio_mixed=round((mixed - original) / (cut - original), 4),
        frac_normal_smoother=round(float(np.mean(rows[:, 2] < rows[:, 1])), 4),
    )


def machine() -> dict[str, str | int | None]:
    """Where the numbers were taken."""
    return {
        "nproc": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "cv2_threads": cv2.getNumThreads(),
    }


def print_table(speeds: list[Throughput], smoothness: list[Smoothness]) -> None:
    """Human-readable summary."""
    print(f"{'setting':<22}{'samples':>8}{'s':>8}{'samples/s':>11}{'redrawn':>9}  ms per family (count)")
    for t in speeds:
        per = ", ".join(f"{f} {ms:.1f} ({t.count_by_family[f]})" for f, ms in t.ms_by_family.items())
        print(f"{t.setting:<22}{t.samples:>8}{t.seconds:>8.2f}{t.samples_per_s:>11.1f}{t.fallbacks:>9}  {per}")
    for smooth in smoothness:
        print(f"\nband of {smooth.band_px} px either side of the border, {smooth.pairs} placements")
        print("  mean Sobel magnitude: " + ", ".join(f"{n} {getattr(smooth, n):.2f}" for n in GRADIENT_FIELDS))
        print(f"  ratio NSA/cut-paste: normal {smooth.ratio_normal:.3f}, mixed {smooth.ratio_mixed:.3f}")
        excess = smooth.excess_ratio_normal, smooth.excess_ratio_mixed
        print(f"  excess over original, NSA/cut-paste: normal {excess[0]:.3f}, mixed {excess[1]:.3f}")
        print(f"  placements where normal clone is smoother: {smooth.frac_normal_smoother:.1%}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run both measurements, print a table and write JSON to --out."""
    cfg = parse_config(argv)
    rng = np.random.default_rng(cfg.seed)
    textures = normal_crops(GREY_NAMES + COLOUR_NAMES, cfg.pool, cfg.size, rng)
    objects = object_images(textures, rng)
    speeds = [
        measure_throughput("generic (textures)", textures, load_params(None), cfg),
        measure_throughput("hazelnut (objects)", objects, load_params("hazelnut"), cfg),
    ]
    smoothness = measure_smoothness(textures, load_params(None), cfg)
    print_table(speeds, smoothness)
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "machine": machine(),
        "throughput": [asdict(t) for t in speeds],
        "smoothness": [asdict(s) for s in smoothness],
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
