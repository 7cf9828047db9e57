"""How the baselines' free choices were made: on simulated anomalies of bundled pictures, never on ELPV.

Each "product" is one scikit-image picture that no training of ours uses for anything else
(simulation.normals.VALIDATION_PICTURES): random crops are its good images, and the same crops with a simulated
anomaly (simulation.anomalies.simulate_random) are its defects. Every variant trains on the same good crops and
is scored on the same test crops; image AUROC per product and the mean are printed. The choices measured are
the ones no paper fixes for our features and sizes: the U-Net autoencoder's guard against copying its input
(dropped skips, input noise) and SimpleNet's noise scale relative to the adapted features.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_baseline_defaults.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from anomalygpt.backbones import BackboneConfig, build_backbone
from anomalygpt.baselines import simplenet, unet_ae
from anomalygpt.detector import FeatureCache
from simulation.anomalies import SimulationError, load_params, simulate_random
from simulation.normals import VALIDATION_PICTURES, normal_crops

SIZE = 256


def product(
    picture: str, n_train: int, n_test: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(good training crops, test crops, test labels): half of the test crops carry one simulated anomaly."""
    rng = np.random.default_rng(seed)
    crops = normal_crops((picture,), n_train + 2 * n_test, SIZE, rng)
    train, test, labels = crops[:n_train], [], []
    params = load_params(None)
    for index, crop in enumerate(crops[n_train:]):
        anomalous = index % 2 == 1
        if anomalous:
            try:
                crop = simulate_random(crop, train[:8], params, np.random.default_rng([seed, index])).image
            except SimulationError:
                continue
        test.append(crop)
        labels.append(int(anomalous))
    return train, test, np.asarray(labels)


VARIANTS: dict[str, tuple[Any, Any]] = {
    "unet-ae all skips, clean inputs": (unet_ae, unet_ae.UNetAEConfig(dropped_skips=0, noise_std=0.0)),
    "unet-ae all skips, noisy inputs": (unet_ae, unet_ae.UNetAEConfig(dropped_skips=0)),
    "unet-ae finest skip dropped, clean inputs": (unet_ae, unet_ae.UNetAEConfig(noise_std=0.0)),
    "unet-ae default (finest skip dropped, noisy inputs)": (unet_ae, unet_ae.UNetAEConfig()),
    "simplenet noise 0.25": (simplenet, simplenet.SimpleNetConfig(noise_scale=0.25)),
    "simplenet noise 0.5 (default)": (simplenet, simplenet.SimpleNetConfig()),
    "simplenet noise 1.0": (simplenet, simplenet.SimpleNetConfig(noise_scale=1.0)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--test", type=int, default=40, help="test crops per class")
    parser.add_argument("--pictures", default=",".join(VALIDATION_PICTURES))
    parser.add_argument("--only", default="", help="comma-separated variant prefixes (default: all)")
    args = parser.parse_args()
    features = FeatureCache(build_backbone(BackboneConfig()), keep=True)
    pictures = args.pictures.split(",")
    data = {picture: product(picture, args.train, args.test, seed=7) for picture in pictures}
    rows = {}
    for name, (module, config) in VARIANTS.items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only.split(",")):
            continue
        start, aurocs = time.perf_counter(), {}
        for picture, (train, test, labels) in data.items():
            detector = module.build(features, 0, config)
            detector.fit(train)
            aurocs[picture] = float(roc_auc_score(labels, detector.predict(test).scores))
        rows[name] = {**aurocs, "mean": float(np.mean(list(aurocs.values()))), "seconds": time.perf_counter() - start}
        print(json.dumps({name: rows[name]}), flush=True)
    print(
        f"\nMachine: {platform.platform()}, {os.cpu_count()} CPUs; {args.train} good training crops, {args.test} + "
        f"{args.test} test crops of {SIZE} px per picture\n"
    )
    print("| variant | " + " | ".join(pictures) + " | mean |\n|---|" + "---|" * (len(pictures) + 1))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[p]:.3f}" for p in pictures) + f" | {row['mean']:.3f} |")
    print("\nconfigs: " + json.dumps({n: dataclasses.asdict(c) for n, (_, c) in VARIANTS.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
