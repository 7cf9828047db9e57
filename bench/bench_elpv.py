"""ELPV few-shot benchmark of the Inspector (issue 2 figures).

References are good cells (p = 0) of the query's type; the test set is the remaining good cells against the
defective ones (p >= 2/3); the uncertain p = 1/3 cells are reported apart. Thresholds come from the references only.
The plain baseline runs in the same process on the same references: one stage, no augmentation, no neighbourhood
averaging, max-patch score. Speed and peak RSS are measured first, on the real `Inspector.inspect` path.

    python bench/bench_elpv.py --shots 1,4 --seeds 0,1,2 --out runs/bench_elpv
    python bench/bench_elpv.py --speed-only --out runs/bench_elpv_speed
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from anomalygpt.backbones import build_backbone
from anomalygpt.inspection import Inspector, build_inspector
from anomalygpt.io import load_image, write_json_atomic, write_text_atomic
from anomalygpt.memory import MemoryConfig, PatchMemory
from eval.datasets import ELPV_TYPES, Sample, draw_shots, load_split
from eval.metrics import image_metrics, verdict_metrics

BASELINE_MEMORY = MemoryConfig(augment=False, neighbourhood=1, top_fraction=0.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_speed(inspector: Inspector, n_queries: int, k: int) -> dict[str, float]:
    """ms per 4-shot inspection through the public path (decode + features + map + verdict + regions)."""
    split = load_split("elpv", None, "mono")
    refs, test = draw_shots(split, k, seed=0)
    inspector.fit(refs[:1])  # warm-up
    start = time.perf_counter()
    references = inspector.fit(refs)
    index_ms = (time.perf_counter() - start) * 1000
    queries = [s.path for s in test[:: max(1, len(test) // n_queries)][:n_queries]]
    return {
        **inspection_times(inspector, references, queries),
        "index_references_ms": index_ms,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def inspection_times(inspector: Inspector, references, queries: list[Path]) -> dict[str, float]:
    """ms per inspection through the public path (decode included), after one warm-up inspection."""
    inspector.inspect(queries[0], references)
    times = []
    for path in queries:
        start = time.perf_counter()
        inspector.inspect(path, references)
        times.append((time.perf_counter() - start) * 1000)
    return {
        "ms_per_image_mean": float(np.mean(times)),
        "ms_per_image_median": float(np.median(times)),
        "ms_per_image_p95": float(np.percentile(times, 95)),
        "n_queries": len(times),
    }


@torch.inference_mode()
def encode_all(inspector: Inspector, paths: list[Path]) -> dict[Path, list[torch.Tensor]]:
    """Raw backbone patches of every image, once (float16 to bound memory)."""
    cache = {}
    for i in tqdm(range(0, len(paths), 16), desc="encode", leave=False):
        batch = paths[i : i + 16]
        feats = inspector.backbone.encode([load_image(p) for p in batch]).patches
        for j, path in enumerate(batch):
            cache[path] = [f[j : j + 1].half() for f in feats]
    return cache


@torch.inference_mode()
def score_samples(
    memory: PatchMemory, samples: list[Sample], cache: dict[Path, list[torch.Tensor]], stages: int
) -> np.ndarray:
    scores = []
    for i in range(0, len(samples), 32):
        batch = samples[i : i + 32]
        patches = [torch.cat([cache[s.path][st] for s in batch]).float() for st in range(stages)]
        maps = memory.maps_from_patches(patches, memory.image_size)
        scores.extend(memory.image_score(m) for m in maps)
    return np.array(scores)


def run_setting(inspector: Inspector, baseline: Inspector, split, cache, k: int, seed: int) -> dict:
    refs, test = draw_shots(split, k, seed)
    references = inspector.fit(refs)
    labels = np.array([s.label for s in test])
    scores = score_samples(references.memory, test, cache, len(inspector.backbone.stage_dims))
    flagged = scores > references.calibration.image_threshold
    base_memory = PatchMemory.build(baseline.backbone, [load_image(p) for p in refs], BASELINE_MEMORY, augment=False)
    base_scores = score_samples(base_memory, test, cache, 1)
    held = score_samples(references.memory, list(split.held_out), cache, len(inspector.backbone.stage_dims))
    return {
        "k": k,
        "seed": seed,
        "n_good": int((labels == 0).sum()),
        "n_defective": int(labels.sum()),
        "ours": image_metrics(labels, scores),
        "baseline": image_metrics(labels, base_scores),
        "verdict": verdict_metrics(labels, flagged),
        "uncertain_p13_flagged": float((held > references.calibration.image_threshold).mean()),
        "calibration": references.calibration.to_dict(),
        "index_ms": references.index_ms,
    }


METRICS = {
    "auroc": ("ours", "auroc"),
    "baseline_auroc": ("baseline", "auroc"),
    "false_alarm_rate": ("verdict", "false_alarm_rate"),
    "recall": ("verdict", "recall"),
    "accuracy": ("verdict", "accuracy"),
}


def per_seed(runs: list[dict], ctype: str, k: int, metric: str) -> np.ndarray:
    """One value per seed; for "both", the mean over the cell types of that seed."""
    group, name = METRICS[metric]
    sel = [r for r in runs if r["k"] == k and ctype in (r["type"], "both")]
    seeds = sorted({r["seed"] for r in sel})
    return np.array([np.mean([r[group][name] for r in sel if r["seed"] == seed]) for seed in seeds], dtype=float)


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds, per (cell type, k) and over both types."""
    out: dict = {}
    for ctype in [*sorted({r["type"] for r in runs}), "both"]:
        for k in sorted({r["k"] for r in runs}):
            stats: dict = {}
            for metric in METRICS:
                values = per_seed(runs, ctype, k, metric)
                stats[metric] = {"mean": float(values.mean()), "std": float(values.std()), "n": len(values)}
            stats["ratio_to_baseline"] = stats["auroc"]["mean"] / stats["baseline_auroc"]["mean"]
            out[f"{ctype}/k={k}"] = stats
    return out


def markdown(summary: dict, speed: dict, meta: dict) -> str:
    lines = [
        "| cell type | k | I-AUROC | baseline I-AUROC | ratio | false alarms (good) | recall (defective) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        ctype, k = key.split("/")
        cells = [f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in ("auroc", "baseline_auroc")]
        cells.append(f"{s['ratio_to_baseline']:.3f}")
        cells += [f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in ("false_alarm_rate", "recall")]
        lines.append(f"| {ctype} | {k[2:]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Speed (4-shot, {speed['n_queries']} queries, {speed['torch_threads']} threads): "
        f"{speed['ms_per_image_mean']:.0f} ms/image mean, {speed['ms_per_image_median']:.0f} median, "
        f"{speed['ms_per_image_p95']:.0f} p95; reference indexing {speed['index_references_ms']:.0f} ms; "
        f"peak RSS {speed['peak_rss_mb']:.0f} MB.",
        "",
        f"Machine: {meta['machine']}; {meta['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--shots", default="1,4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--types", default=",".join(ELPV_TYPES))
    parser.add_argument("--speed-queries", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_elpv"))
    parser.add_argument("--speed-only", action="store_true", help="measure speed and peak RSS, skip the AUROC runs")
    args = parser.parse_args()
    start = time.time()
    inspector = build_inspector(args.preset)
    speed = measure_speed(inspector, args.speed_queries, k=4)
    print(f"speed: {speed}", flush=True)
    if args.speed_only:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "speed.json", {"command": " ".join(sys.argv), "speed": speed})
        return 0
    first_stage = dataclasses.replace(inspector.preset.backbone, stages=inspector.preset.backbone.stages[:1])
    baseline = Inspector(build_backbone(first_stage), inspector.preset)
    runs = []
    for ctype in args.types.split(","):
        split = load_split("elpv", None, ctype)
        cache = encode_all(
            inspector, sorted({*split.reference_pool, *(s.path for s in split.test), *(s.path for s in split.held_out)})
        )
        for k in [int(x) for x in args.shots.split(",")]:
            for seed in [int(x) for x in args.seeds.split(",")]:
                run = {"type": ctype, **run_setting(inspector, baseline, split, cache, k, seed)}
                runs.append(run)
                print(
                    f"{ctype} k={k} seed={seed}: auroc {run['ours']['auroc']:.4f} baseline "
                    f"{run['baseline']['auroc']:.4f} far {run['verdict']['false_alarm_rate']:.3f} "
                    f"recall {run['verdict']['recall']:.3f}",
                    flush=True,
                )
        del cache
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"python {platform.python_version()}, torch {torch.__version__}",
        "seconds": time.time() - start,
        "command": " ".join(sys.argv),
        "preset": dataclasses.asdict(inspector.preset),
    }
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", {"meta": meta, "speed": speed, "summary": summary, "runs": runs})
    report = markdown(summary, speed, meta)
    write_text_atomic(args.out / "results.md", report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
