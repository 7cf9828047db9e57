"""Choose the threshold rule's z on data that is not the benchmark: skimage's bundled textures as products.

Each texture is a "product": references and good test images are random crops (references from the top half,
test crops from the bottom half, so no test pixel was ever a reference pixel); defective test images are good test
crops with a simulated defect (simulation.anomalies, generic parameters). For every (texture, k, seed) the Inspector
indexes the references once; the false-alarm rate and recall are then read off for several z, since the threshold is
mean + z * spread of the same held-out reference scores. The references are indexed with no spread floor
(spread_prior 0), so the floor rule spread = max(std, prior / sqrt(k) * mean) is swept exactly afterwards.

    python bench/bench_calibration.py --out runs/bench_calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from skimage import data

from anomalygpt.config import load_preset
from anomalygpt.inspection import build_inspector
from anomalygpt.io import write_json_atomic
from simulation.anomalies import load_params, simulate_random
from simulation.normals import band_crops

TEXTURES = ("brick", "grass", "gravel", "immunohistochemistry")
Z_VALUES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
PRIORS = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)  # spread_prior values swept at the preset's z
STATIONARY = ("brick", "grass", "gravel")  # immunohistochemistry varies across the image: reported apart


def texture_rgb(name: str) -> np.ndarray:
    image = getattr(data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def run(texture: str, k: int, seed: int, n_test: int, size: int, inspector) -> dict:
    rng = np.random.default_rng([seed, k, TEXTURES.index(texture)])
    image = texture_rgb(texture)
    half = image.shape[0] // 2
    refs = band_crops(image, k, size, (0, half), rng)
    goods = band_crops(image, 2 * n_test, size, (half, image.shape[0]), rng)
    params = load_params(None)
    defects = [simulate_random(img, goods[n_test:], params, rng).image for img in goods[:n_test]]
    references = inspector.fit(refs)
    cal = references.calibration
    good_scores = np.array([inspector.inspect(g, references).score for g in goods[n_test:]])
    bad_scores = np.array([inspector.inspect(d, references).score for d in defects])
    by_z = {}
    for z in Z_VALUES:
        threshold = cal.normal_mean + z * cal.normal_spread
        by_z[str(z)] = {
            "false_alarm_rate": float((good_scores > threshold).mean()),
            "recall": float((bad_scores > threshold).mean()),
        }
    return {
        "texture": texture,
        "k": k,
        "seed": seed,
        "by_z": by_z,
        "normal_mean": cal.normal_mean,
        "normal_spread": cal.normal_spread,
        "image_threshold": cal.image_threshold,  # the inspector's own, at its preset's z
        "good_scores": good_scores.tolist(),
        "bad_scores": bad_scores.tolist(),
    }


def prior_table(runs: list[dict], z: float) -> list[dict]:
    """False alarms and recall at threshold mean + z * max(std, prior / sqrt(k) * mean), per k and prior."""
    print(f"| k | spread prior | floor | stationary false alarms | stationary recall | {' | '.join(TEXTURES)} |")
    print("|---|---|---|---|---|" + "---|" * len(TEXTURES))
    rows = []
    for k in sorted({r["k"] for r in runs}):
        for prior in PRIORS:
            rates: dict[str, list[tuple[float, float]]] = {t: [] for t in TEXTURES}
            for r in (r for r in runs if r["k"] == k):
                spread = max(r["normal_spread"], prior / np.sqrt(k) * r["normal_mean"])
                threshold = r["normal_mean"] + z * spread
                rates[r["texture"]].append(
                    (
                        float(np.mean(np.array(r["good_scores"]) > threshold)),
                        float(np.mean(np.array(r["bad_scores"]) > threshold)),
                    )
                )
            stationary = [pair for t in STATIONARY for pair in rates[t]]
            far, rec = float(np.mean([p[0] for p in stationary])), float(np.mean([p[1] for p in stationary]))
            per = {t: [float(np.mean([p[0] for p in v])), float(np.mean([p[1] for p in v]))] for t, v in rates.items()}
            rows.append({"k": k, "prior": prior, "false_alarm_rate": far, "recall": rec, "per_texture": per})
            cells = " | ".join(f"{per[t][0]:.2f}/{per[t][1]:.2f}" for t in TEXTURES)
            print(f"| {k} | {prior} | {prior / np.sqrt(k):.3f} | {far:.3f} | {rec:.3f} | {cells} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--shots", default="1,4")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_calibration.json"))
    args = parser.parse_args()
    start = time.time()
    preset = load_preset(args.preset)
    raw = dataclasses.replace(preset.calibration, spread_prior=0.0)
    inspector = build_inspector(dataclasses.replace(preset, calibration=raw))
    runs = [
        run(t, int(k), int(s), args.n_test, args.size, inspector)
        for t in TEXTURES
        for k in args.shots.split(",")
        for s in args.seeds.split(",")
    ]
    print("| k | z | false alarms (good) | recall (simulated defects) |\n|---|---|---|---|")
    table = []
    for k in sorted({r["k"] for r in runs}):
        for z in Z_VALUES:
            sel = [r["by_z"][str(z)] for r in runs if r["k"] == k]
            far = float(np.mean([s["false_alarm_rate"] for s in sel]))
            rec = float(np.mean([s["recall"] for s in sel]))
            table.append({"k": k, "z": z, "false_alarm_rate": far, "recall": rec})
            print(f"| {k} | {z} | {far:.3f} | {rec:.3f} |")
    priors = prior_table(runs, preset.calibration.z)
    write_json_atomic(
        args.out,
        {
            "runs": runs,
            "table": table,
            "priors": priors,
            "seconds": time.time() - start,
            "textures": TEXTURES,
            "n_test": args.n_test,
            "size": args.size,
        },
    )
    print(f"{time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
