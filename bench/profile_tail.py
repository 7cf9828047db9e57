"""Where the per-image tail's time goes (reference fit, verdict, regions: the CPU work a GPU leaves), one thread.

The maps of --n exported test cells against their 4 references are made first (untimed); then the tail
(`inspection.Finisher`) runs over them once for a warm-up, once timed (ms per image) and once under cProfile, whose
top functions by cumulative time are printed. A profile to find the next cut, not a bench to compare commits (run
bench/bench_host.py or bench/bench_batch.py for those).

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_tail.py --cells runs/gpu_carry/elpv --n 200
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

from anomalygpt import inspection
from anomalygpt.config import load_preset
from anomalygpt.inspection import build_inspector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=Path, required=True, help="a folder bench_batch --export-cells wrote")
    parser.add_argument("--n", type=int, default=200, help="test cells (the first ones)")
    parser.add_argument("--top", type=int, default=30, help="functions printed")
    args = parser.parse_args()
    files = sorted((args.cells / "test").glob("*.png"))[: args.n]
    inspector = build_inspector(load_preset("default"))
    references = inspector.fit(sorted((args.cells / "refs").glob("*.png")))
    images = [inspection.decoded(path, str(path), references.memory.cfg) for path in files]
    maps, scores, looks = inspector.batch_maps([image.memory_input for image in images], references.memory, False)
    items = [(image, None, maps[i], scores[i], looks[i], {}) for i, image in enumerate(images)]
    finisher = inspection.Finisher.of(inspector, references, None, 0.0)
    torch.set_num_threads(1)
    for item in items:
        finisher(*item)
    start = time.perf_counter()
    found = [finisher(*item) for item in items]
    elapsed = time.perf_counter() - start
    print(
        f"{len(items)} cells: {1000 * elapsed / len(items):.2f} ms per image in one thread; "
        f"{sum(i.is_anomalous for i in found)} anomalous, {sum(len(i.regions) for i in found)} regions"
    )
    profile = cProfile.Profile()
    profile.enable()
    for item in items:
        finisher(*item)
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
