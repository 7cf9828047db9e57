"""Pixel AUROC of trained decoders on a fresh simulated test split (issue 5's first figure).

Training keeps the epoch with the best pixel AUROC on its validation split (the three VALIDATION_PICTURES,
simulated with seed + 1), so that figure took part in a choice. This bench draws a new split, never used to
choose anything: new crops of the same three pictures plus the stereo motorcycle (simulation.normals.TEST_PICTURES,
used by nothing else), simulated exactly as training simulates (same families, same object share) with another
seed, encoded once and scored by every decoder given. (Until 2026-12-01 the fourth picture was `cat`, which is
scikit-image's alias of the training picture `chelsea`.)

Two pixel AUROCs per decoder: the raw maps at 1/4 resolution (what training validates) and the Inspector's
zero-shot map (stages averaged, Gaussian-smoothed at full size), both against the masks at 1/4 resolution.

    python bench/bench_decoder_pixel.py --weights weights/decoder-efficientnet-lite0-minilm \
        --out runs/bench_decoder_pixel.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from anomalygpt.config import Preset, load_preset
from anomalygpt.decoder import TextPrior
from anomalygpt.inspection import load_prior
from anomalygpt.io import write_json_atomic
from anomalygpt.memory import fuse_maps, top_mean
from anomalygpt.prompts import text_anchors
from simulation.normals import TEST_PICTURES
from train.decoder import DecoderTrainConfig, SimulatedSplit, decoder_maps, encode_split, simulated_images


def score(prior: TextPrior, split: SimulatedSplit, preset: Preset, pictures: tuple[str, ...]) -> dict:
    anchors = text_anchors(prior.encoder, None)
    masks = split.masks.numpy()
    raw = decoder_maps(prior.decoder, split.feats, anchors, masks.shape[-1]).numpy()
    size, smoothed, scores = preset.backbone.image_size, [], []
    for first in range(0, masks.shape[0], 32):
        abnormal = prior.abnormal([f[first : first + 32].float() for f in split.feats], None)
        maps = fuse_maps(abnormal, (size, size), preset.memory.sigma)  # as Inspector.inspect makes them
        scores += [top_mean(m, preset.memory.top_fraction) for m in maps]
        smoothed.append(maps[:, 2::4, 2::4])  # the centre of each 4 x 4 cell of the masks' grid
    inspector_maps = np.concatenate(smoothed)
    labels = split.labels.numpy()
    per_picture = {}
    for index, name in enumerate(pictures):
        rows = np.arange(index, masks.shape[0], len(pictures))
        per_picture[name] = round(float(roc_auc_score(masks[rows].ravel(), inspector_maps[rows].ravel())), 4)
    return {
        "pixel_auroc_raw": round(float(roc_auc_score(masks.ravel(), raw.ravel())), 4),
        "pixel_auroc_inspector": round(float(roc_auc_score(masks.ravel(), inspector_maps.ravel())), 4),
        "pixel_auroc_inspector_per_picture": per_picture,
        "image_auroc_inspector": round(float(roc_auc_score(labels, scores)), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", required=True, help="decoder weights stems (paths without suffix)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--n", type=int, default=400, help="simulated test images")
    parser.add_argument("--seed", type=int, default=100, help="simulation seed (training used 0, validation 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_decoder_pixel.json"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    begin = time.perf_counter()
    base = load_preset(args.preset)
    cfg = DecoderTrainConfig(out=args.out.parent)  # the training defaults: anomaly and object shares
    split = encode_split(base, *simulated_images(TEST_PICTURES, args.n, base.backbone.image_size, cfg, args.seed))
    results = {}
    for stem in args.weights:
        preset = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, weights=stem))
        results[stem] = score(load_prior(preset), split, preset, TEST_PICTURES)
        print(stem, results[stem], flush=True)
    summary = {
        "command": "python bench/bench_decoder_pixel.py " + " ".join(f"--weights {w}" for w in args.weights),
        "test_pictures": TEST_PICTURES,
        "n": args.n,
        "seed": args.seed,
        "anomalous": int(split.labels.sum()),
        "results": results,
        "seconds": round(time.perf_counter() - begin, 1),
    }
    write_json_atomic(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
