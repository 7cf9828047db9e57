"""The same-picture check's margins, on ELPV's dev half (odd-numbered cells): how far apart distinct good cells
are, and how close re-saved copies of one cell stay (anomalygpt/references.py DUPLICATE_RMS, CANDIDATE_RMS).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_reference_checks.py
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from anomalygpt.io import load_image
from anomalygpt.references import CANDIDATE_RMS, DUPLICATE_RMS, grey_rms, grey_thumbnail
from eval.datasets import ELPV_TYPES, elpv_half, load_split


def reencoded(image: np.ndarray, fmt: str, **options) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return load_image(buffer.getvalue())


def main() -> int:
    rng = np.random.default_rng(0)
    for cell in ELPV_TYPES:
        paths = sorted(elpv_half(load_split("elpv", None, cell), "dev").reference_pool)
        images = [load_image(p) for p in paths]
        thumbs = torch.from_numpy(np.stack([grey_thumbnail(i).ravel() for i in images]))
        rms = torch.cdist(thumbs, thumbs) / np.sqrt(thumbs.shape[1])
        rms.fill_diagonal_(float("inf"))
        nearest = rms.amin(dim=1)
        i, j = np.unravel_index(int(rms.argmin()), rms.shape)
        closest = grey_rms(images[i], images[j])
        print(
            f"{cell}: {len(images)} distinct good cells; nearest-other thumbnail RMS min {nearest.min():.2f}, "
            f"1st percentile {np.quantile(nearest.numpy(), 0.01):.2f} (candidates below {CANDIDATE_RMS}: "
            f"{int((nearest < CANDIDATE_RMS).sum())}); the closest pair at full resolution {closest:.2f}"
        )
        copies = {"PNG re-save": [], "JPEG q95": [], "JPEG q75": [], "1-level noise": []}
        for image in [images[k] for k in rng.choice(len(images), 20, replace=False)]:
            noise = (image.astype(int) + rng.integers(-1, 2, image.shape[:2])[..., None]).clip(0, 255).astype(np.uint8)
            variants = {
                "PNG re-save": reencoded(image, "PNG"),
                "JPEG q95": reencoded(image, "JPEG", quality=95),
                "JPEG q75": reencoded(image, "JPEG", quality=75),
                "1-level noise": noise,
            }
            for name, copy in variants.items():
                copies[name].append(grey_rms(image, copy))
        for name, values in copies.items():
            same = np.mean(np.array(values) < DUPLICATE_RMS)
            print(
                f"  copies, {name}: full-resolution RMS max {max(values):.2f}; counted as the same picture: {same:.0%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
