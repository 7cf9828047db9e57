"""The trained decoder (issue 5 figures): fusion weight chosen on simulated validation, then ELPV.

1. Fusion weight: on scikit-image pictures the decoder never saw in training (simulation.normals
   VALIDATION_PICTURES), few-shot tasks as in bench_calibration (references from the top half of a picture,
   good and simulated-defective queries from the bottom half). The fused map is memory + w * decoder map
   (exact: every step from stage maps to the smoothed map is linear), so each query is mapped once per part.
   The weight with the best mean image AUROC is chosen (ties: the smaller weight). ELPV plays no part in it.
2. ELPV zero-shot: the decoder alone, at its stored threshold, per cell type (cross-domain).
3. ELPV 1- and 4-shot: memory alone vs fused at the chosen weight, same draws, same seeds, same encoded patches.

    python bench/bench_decoder.py --weights weights/decoder-efficientnet-lite0-minilm --out runs/bench_decoder.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from anomalygpt.config import load_preset
from anomalygpt.inspection import Inspector, build_inspector
from anomalygpt.io import write_json_atomic
from anomalygpt.memory import top_mean
from eval.datasets import ELPV_TYPES, draw_shots, load_split
from eval.metrics import image_metrics, verdict_metrics
from eval.runner import PatchCache, encode_category, image_paths
from simulation.anomalies import load_params, simulate_random
from simulation.normals import VALIDATION_PICTURES, band_crops, picture

WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def validation_task(inspector: Inspector, name: str, k: int, seed: int, n: int, size: int) -> dict:
    """Memory and decoder maps of n good and n simulated-defective queries of one picture."""
    rng = np.random.default_rng([seed, k, VALIDATION_PICTURES.index(name)])
    image = picture(name)
    half = image.shape[0] // 2
    size = min(size, half)  # clock is 300 px tall
    refs = band_crops(image, k, size, (0, half), rng)
    goods = band_crops(image, 2 * n, size, (half, image.shape[0]), rng)
    simulated = [simulate_random(g, goods[n:], load_params(None), rng) for g in goods[:n]]
    queries = goods[n:] + [s.image for s in simulated]
    masks = [np.zeros((size, size), bool)] * n + [s.mask for s in simulated]
    references = inspector.fit(refs)
    memory = np.stack([inspector.inspect(q, references).anomaly_map for q in queries])
    decoder = np.stack([inspector.inspect(q).anomaly_map for q in queries])
    return {"memory": memory, "decoder": decoder, "masks": np.stack(masks), "labels": np.array([0] * n + [1] * n)}


def weight_table(tasks: list[dict], top_fraction: float) -> list[dict]:
    rows = []
    for w in WEIGHTS:
        image, pixel = [], []
        for task in tasks:
            fused = task["memory"] + w * task["decoder"]
            scores = [top_mean(m, top_fraction) for m in fused]
            image.append(roc_auc_score(task["labels"], scores))
            pixel.append(roc_auc_score(task["masks"][:, ::4, ::4].ravel(), fused[:, ::4, ::4].ravel()))
        rows.append({"weight": w, "image_auroc": float(np.mean(image)), "pixel_auroc": float(np.mean(pixel))})
        print(f"| {w} | {rows[-1]['image_auroc']:.3f} | {rows[-1]['pixel_auroc']:.3f} |", flush=True)
    return rows


def decoder_maps(inspector: Inspector, cache: PatchCache) -> np.ndarray:
    """(N, H, W) zero-shot maps of every cached image, exactly as Inspector.inspect_zero_shot makes them."""
    chunks = [[stage[i : i + 32].float() for stage in cache.stages] for i in range(0, len(cache.index), 32)]
    return np.concatenate([inspector.zero_shot_maps(raw, cache.image_size) for raw in chunks])


@torch.inference_mode()
def elpv_cell_type(inspector: Inspector, cell: str, shots: list[int], seeds: list[int], weight: float) -> dict:
    preset = inspector.preset
    split = load_split("elpv", None, cell)
    cache = encode_category(inspector, image_paths(split, False), f"encode {cell}")
    zero = decoder_maps(inspector, cache)
    top = preset.memory.top_fraction
    zero_scores = np.array([top_mean(m, top) for m in zero])
    pool = set(split.reference_pool)
    labels_all = np.array([0 if path in pool else 1 for path in cache.index])
    zero_threshold = inspector.zero_shot_calibration().image_threshold
    fused_decoder = dataclasses.replace(preset.decoder, fusion_weight=weight)
    fused = Inspector(inspector.backbone, dataclasses.replace(preset, decoder=fused_decoder), inspector.prior)
    result = {
        "zero_shot": {
            **image_metrics(labels_all, zero_scores),
            **verdict_metrics(labels_all, zero_scores > zero_threshold),
            "threshold": zero_threshold,
        },
        "settings": [],
    }
    for k in shots:
        for seed in seeds:
            refs, test = draw_shots(split, k, seed)
            references = inspector.fit(refs)
            rows = [cache.index[s.path] for s in test]
            labels = np.array([s.label for s in test])
            memory_scores, fused_scores = [], []
            for first in range(0, len(rows), 16):
                batch = rows[first : first + 16]
                maps = references.memory.maps_from_patches([s[batch].float() for s in cache.stages], cache.image_size)
                memory_scores += [top_mean(m, top) for m in maps]
                fused_scores += [top_mean(m + weight * zero[i], top) for m, i in zip(maps, batch, strict=True)]
            fused_threshold = fused.fit(refs).calibration.image_threshold  # thresholds of the fused map
            memory_threshold = references.calibration.image_threshold
            result["settings"].append(
                {
                    "k": k,
                    "seed": seed,
                    "memory": {
                        **image_metrics(labels, np.array(memory_scores)),
                        **verdict_metrics(labels, np.array(memory_scores) > memory_threshold),
                    },
                    "fused": {
                        **image_metrics(labels, np.array(fused_scores)),
                        **verdict_metrics(labels, np.array(fused_scores) > fused_threshold),
                    },
                }
            )
            s = result["settings"][-1]
            print(
                f"{cell} k={k} seed={seed}: memory {s['memory']['auroc']:.3f} fused {s['fused']['auroc']:.3f}",
                flush=True,
            )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--weights", required=True, help="decoder weights stem (file path without suffix)")
    parser.add_argument("--shots", default="1,4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--val-shots", default="1,4")
    parser.add_argument("--n-val", type=int, default=30, help="good and defective validation queries per task")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--skip-elpv", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_decoder.json"))
    args = parser.parse_args()
    start = time.time()
    preset = load_preset(args.preset)
    # The decoder reads raw images and fusion adds its map to the memory's, both from one raw encoding per image.
    preset = dataclasses.replace(
        preset,
        decoder=dataclasses.replace(preset.decoder, weights=args.weights, fusion_weight=0.0),
        memory=dataclasses.replace(preset.memory, standardize=False),
    )
    inspector = build_inspector(preset)
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [
        validation_task(inspector, name, int(k), seed, args.n_val, args.size)
        for name in tqdm(VALIDATION_PICTURES, desc="validation pictures")
        for k in args.val_shots.split(",")
        for seed in seeds
    ]
    print("| fusion weight | simulated validation I-AUROC | P-AUROC |\n|---|---|---|")
    table = weight_table(tasks, preset.memory.top_fraction)
    best = max(table, key=lambda row: (round(row["image_auroc"], 3), -row["weight"]))
    print(f"chosen fusion weight: {best['weight']}")
    report = {"weights": args.weights, "fusion_table": table, "chosen_weight": best["weight"], "elpv": {}}
    if not args.skip_elpv:
        shots = [int(k) for k in args.shots.split(",")]
        for cell in ELPV_TYPES:
            report["elpv"][cell] = elpv_cell_type(inspector, cell, shots, seeds, best["weight"])
            print(f"{cell} zero-shot I-AUROC {report['elpv'][cell]['zero_shot']['auroc']:.3f}", flush=True)
    report["seconds"] = time.time() - start
    report["threads"] = torch.get_num_threads()
    write_json_atomic(args.out, report)
    print(f"{report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
