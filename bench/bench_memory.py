"""PatchMemory as k grows: indexing time, ms per inspection, memory size and I-AUROC, capped vs uncapped.

The cap keeps a seeded random subset of each stage's patches (MemoryConfig.max_patches). This bench is the
measurement behind that choice: the uncapped memory is the exact upper bound the subset is compared with.
Data: a fixed subset of ELPV mono cells (good vs p >= 2/3), references drawn from the other good cells.

    python bench/bench_memory.py --shots 1,2,4,8,16 --n 60 --out runs/bench_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from anomalygpt.config import load_preset
from anomalygpt.inspection import build_inspector
from anomalygpt.io import load_image, write_json_atomic
from eval.datasets import Sample, draw_shots, load_split
from eval.metrics import image_metrics

UNCAPPED = 10**9


def run(preset, cap: int, refs: list[Path], test: list) -> dict:
    preset = dataclasses.replace(preset, memory=dataclasses.replace(preset.memory, max_patches=cap))
    inspector = build_inspector(preset)
    start = time.perf_counter()
    references = inspector.fit(refs)
    index_ms = (time.perf_counter() - start) * 1000
    images = [load_image(s.path) for s in test]
    inspector.inspect(images[0], references)
    start = time.perf_counter()
    scores = [inspector.inspect(image, references).score for image in images]
    ms = (time.perf_counter() - start) * 1000 / len(images)
    labels = np.array([s.label for s in test])
    return {
        "k": len(refs),
        "cap": "uncapped" if cap == UNCAPPED else cap,
        "index_ms": index_ms,
        "ms_per_image": ms,
        "bank_sizes": [int(b.features.shape[0]) for b in references.memory.banks],
        "auroc": image_metrics(labels, np.array(scores))["auroc"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--shots", default="1,2,4,8,16")
    parser.add_argument("--n", type=int, default=60, help="good and defective test cells, each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_memory.json"))
    args = parser.parse_args()
    preset = load_preset(args.preset)
    split = load_split("elpv", None, "mono")
    rng = np.random.default_rng(args.seed)
    # The last n good cells are the good test set; references are drawn from the others.
    pool = sorted(split.reference_pool)
    goods = [Sample(path, 0, "mono", "good") for path in pool[-args.n :]]
    defective = [split.test[i] for i in rng.choice(len(split.test), args.n, replace=False)]
    ref_split = dataclasses.replace(split, reference_pool=tuple(pool[: -args.n]))
    rows = []
    print("| k | memory | patches per stage | index ms | ms / image | I-AUROC |\n|---|---|---|---|---|---|")
    for k in [int(x) for x in args.shots.split(",")]:
        refs, _ = draw_shots(ref_split, k, args.seed)
        for cap in (preset.memory.max_patches, UNCAPPED):
            row = run(preset, cap, refs, goods + defective)
            rows.append(row)
            print(
                f"| {k} | {row['cap']} | {row['bank_sizes']} | {row['index_ms']:.0f} | "
                f"{row['ms_per_image']:.0f} | {row['auroc']:.3f} |",
                flush=True,
            )
    write_json_atomic(args.out, {"rows": rows, "n": args.n, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
