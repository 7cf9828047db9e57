"""Zero-shot from a batch (issue 20): ELPV batches of unlabelled cells scored against each other, no references.

Per cell type and seed, a batch of --batch cells is drawn from one half of ELPV with the half's own defect share
(good and defective cells of the type), and inspected with `Inspector.inspect_batch` (the product path: decode,
standardise, encode, mutual scoring, the batch's own threshold). Reported: image AUROC, false alarms and recall at
the batch threshold, seconds per batch. `--half dev` (odd-numbered cells) is for choices, `--half test` for figures.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_zero_shot_batch.py --half test --out runs/bench_zero_shot_batch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from anomalygpt.inspection import build_inspector
from anomalygpt.io import write_json_atomic
from eval.datasets import ELPV_TYPES, elpv_half, load_split


def cells(cell: str, half: str) -> tuple[list[Path], np.ndarray]:
    """Every cell of the type in the half and its label (1 defective)."""
    split = elpv_half(load_split("elpv", None, cell), half)
    tested = {sample.path for sample in split.test}
    paths = [p for p in sorted(split.reference_pool) if p not in tested] + [s.path for s in split.test]
    labels = [0] * (len(paths) - len(split.test)) + [int(s.label) for s in split.test]
    return paths, np.array(labels)


def run(inspector, paths: list[Path], labels: np.ndarray, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bad, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_bad = round(batch * len(bad) / len(labels))
    pick = np.r_[rng.choice(good, batch - n_bad, replace=False), rng.choice(bad, n_bad, replace=False)]
    rng.shuffle(pick)
    start = time.perf_counter()
    results = list(inspector.inspect_batch([paths[i] for i in pick], sources=[str(paths[i]) for i in pick]))
    seconds = time.perf_counter() - start
    truth = labels[pick]
    scores = np.array([r.score for r in results])
    flagged = np.array([r.is_anomalous for r in results])
    return {
        "auroc": float(roc_auc_score(truth, scores)),
        "false_alarm_rate": float(flagged[truth == 0].mean()),
        "recall": float(flagged[truth == 1].mean()),
        "defective": int(n_bad),
        "seconds": seconds,
        "scores": scores.tolist(),  # for reading other threshold rules off the same batch
        "labels": truth.tolist(),
    }


def speed(inspector, n: int) -> dict:
    """Time and peak memory of one batch of n cells (both halves and types: a speed figure, no quality)."""
    paths = sorted(p for cell in ELPV_TYPES for half in ("dev", "test") for p in cells(cell, half)[0])[:n]
    start = time.perf_counter()
    count = sum(1 for _ in inspector.inspect_batch(paths, sources=[str(p) for p in paths]))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"batch of {count}: {seconds:.0f} s ({1000 * seconds / count:.0f} ms per image), peak RSS {peak_mb:.0f} MB")
    return {"images": count, "seconds": seconds, "ms_per_image": 1000 * seconds / count, "peak_rss_mb": peak_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--half", default="test", choices=("dev", "test"))
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_zero_shot_batch"))
    parser.add_argument("--speed", type=int, default=0, help="instead: time one batch of this many cells")
    args = parser.parse_args()
    inspector = build_inspector(args.preset)
    if args.speed:
        write_json_atomic(args.out / f"speed_{args.speed}.json", speed(inspector, args.speed))
        return 0
    rows: dict[str, dict[str, dict]] = {}
    for cell in ELPV_TYPES:
        paths, labels = cells(cell, args.half)
        rows[cell] = {}
        for seed in map(int, args.seeds.split(",")):
            row = run(inspector, paths, labels, args.batch, seed)
            rows[cell][str(seed)] = row
            print(
                f"{cell} seed {seed}: AUROC {row['auroc']:.3f}, false alarms {row['false_alarm_rate']:.1%}, "
                f"recall {row['recall']:.1%} ({row['defective']} defective of {args.batch}), {row['seconds']:.0f} s",
                flush=True,
            )
    print(f"\nzero-shot batch, ELPV {args.half} half, batches of {args.batch}\n")
    print("| cells | AUROC | false alarms | recall | s per batch |\n|---|---|---|---|---|")
    means = {}
    for cell, by_seed in rows.items():
        values = {k: [r[k] for r in by_seed.values()] for k in ("auroc", "false_alarm_rate", "recall", "seconds")}
        means[cell] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in values.items()}
        m = means[cell]
        print(
            f"| {cell} | {m['auroc'][0]:.3f} ± {m['auroc'][1]:.3f} | {m['false_alarm_rate'][0]:.1%} | "
            f"{m['recall'][0]:.1%} | {m['seconds'][0]:.0f} |"
        )
    both = float(np.mean([means[c]["auroc"][0] for c in means]))
    print(f"| both | {both:.3f} | | | |")
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    report = {"machine": machine, "half": args.half, "batch": args.batch, "rows": rows, "means": means, "both": both}
    write_json_atomic(args.out / f"results_{args.half}.json", json.loads(json.dumps(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
