"""Zero-shot from a batch against 4-shot on simulated anomalies of held-out pictures (issue 20's second figure).

Per held-out picture (simulation.normals.TEST_PICTURES, never in any training set of this project's decoder) and
seed: a batch of --good good crops and --defective crops with a simulated defect (simulation.anomalies, generic
parameters), all from the picture's bottom half; 4-shot references are 4 crops of its top half. The same batch is
scored twice: by `Inspector.inspect_batch` (no references) and by `Inspector.inspect` against the 4 references.
Reported: image AUROC of both and their paired difference.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_zero_shot_sim.py --out runs/bench_zero_shot_sim.json
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from anomalygpt.inspection import build_inspector
from anomalygpt.io import write_json_atomic
from simulation.anomalies import load_params, simulate_random
from simulation.normals import TEST_PICTURES, band_crops, picture


def run(inspector, name: str, seed: int, n_good: int, n_bad: int, size: int) -> dict:
    rng = np.random.default_rng([seed, TEST_PICTURES.index(name)])
    image = picture(name)
    half = image.shape[0] // 2
    size = min(size, half, image.shape[1])  # small pictures (clock: 300 px high) give smaller crops
    refs = band_crops(image, 4, size, (0, half), rng)
    crops = band_crops(image, n_good + 2 * n_bad, size, (half, image.shape[0]), rng)
    goods, sources = crops[:n_good], crops[n_good:]
    params = load_params(None)
    bad = [simulate_random(img, sources[n_bad:], params, rng).image for img in sources[:n_bad]]
    batch, labels = goods + bad, np.r_[np.zeros(n_good), np.ones(n_bad)]
    order = rng.permutation(len(batch))
    batch, labels = [batch[i] for i in order], labels[order]
    batch_scores = [r.score for r in inspector.inspect_batch(batch)]
    references = inspector.fit(refs)
    shot_scores = [inspector.inspect(img, references).score for img in batch]
    return {
        "picture": name,
        "seed": seed,
        "batch_auroc": float(roc_auc_score(labels, batch_scores)),
        "four_shot_auroc": float(roc_auc_score(labels, shot_scores)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--good", type=int, default=64)
    parser.add_argument("--defective", type=int, default=16)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_zero_shot_sim.json"))
    args = parser.parse_args()
    inspector = build_inspector(args.preset)
    rows = []
    for name in TEST_PICTURES:
        for seed in map(int, args.seeds.split(",")):
            row = run(inspector, name, seed, args.good, args.defective, args.size)
            rows.append(row)
            print(
                f"{name} seed {seed}: batch {row['batch_auroc']:.3f}, 4-shot {row['four_shot_auroc']:.3f}", flush=True
            )
    print("\n| picture | batch (no references) | 4-shot | difference |\n|---|---|---|---|")
    for name in TEST_PICTURES:
        mine = [r for r in rows if r["picture"] == name]
        b, f = np.mean([r["batch_auroc"] for r in mine]), np.mean([r["four_shot_auroc"] for r in mine])
        print(f"| {name} | {b:.3f} | {f:.3f} | {b - f:+.3f} |")
    diffs = [r["batch_auroc"] - r["four_shot_auroc"] for r in rows]
    batch_mean = float(np.mean([r["batch_auroc"] for r in rows]))
    shot_mean = float(np.mean([r["four_shot_auroc"] for r in rows]))
    print(f"| **all** | {batch_mean:.3f} | {shot_mean:.3f} | {np.mean(diffs):+.3f} ± {np.std(diffs):.3f} |")
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    summary = {"batch": batch_mean, "four_shot": shot_mean, "difference": float(np.mean(diffs))}
    write_json_atomic(args.out, {"machine": machine, "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
