"""The torch path's scoring in numpy: patch distances to the memory, fused map, image score, verdict, reference fit.

Each function mirrors one in anomalygpt.memory, anomalygpt.references or anomalygpt.inspection, which import
torch; tests/test_export.py checks every mirror against its original on the same numbers, so neither can drift
without a failing test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from anomalygpt.regions import Region, find_regions

MAX_WORKING_SIDE = 2048  # as anomalygpt.inspection.MAX_WORKING_SIDE
STANDARD_GREY = (128.0, 50.0)  # as anomalygpt.memory.STANDARD_GREY
THUMB_SIDE = 32  # as anomalygpt.references.THUMB_SIDE
FIT_LIMIT = 3.0  # as anomalygpt.references.FIT_LIMIT
BRIGHTNESS_LIMIT = 4.0  # as anomalygpt.references.BRIGHTNESS_LIMIT
NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


def working_image(pixels: np.ndarray) -> np.ndarray:
    """The image with its longer side cut to MAX_WORKING_SIDE by area interpolation, else as is."""
    height, width = pixels.shape[:2]
    scale = MAX_WORKING_SIDE / max(height, width)
    if scale >= 1.0:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def standardized(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with its grey levels moved to STANDARD_GREY's mean and spread."""
    pixels = image.astype(np.float32)
    mean, spread = STANDARD_GREY
    scaled = (pixels - pixels.mean()) * (spread / max(float(pixels.std()), 1e-3)) + mean
    return np.rint(scaled).clip(0, 255).astype(np.uint8)


def grey_thumbnail(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def normalized(x: np.ndarray, axis: int) -> np.ndarray:
    norm = np.sqrt((x * x).sum(axis=axis, keepdims=True))
    return (x / np.maximum(norm, NORM_EPS)).astype(np.float32)


def appearance(last_stage: np.ndarray) -> np.ndarray:
    """(B, C, h, w) embedded features -> (B, C) unit mean feature."""
    return normalized(last_stage.mean(axis=(2, 3), dtype=np.float32), axis=1)


def adaptive_average(x: np.ndarray, grid: int) -> np.ndarray:
    """(B, C, h, w) -> (B, C, grid, grid): torch's adaptive_avg_pool2d (cells may overlap when h % grid != 0)."""
    height, width = x.shape[-2:]
    bounds = [[(i * size // grid, -(-(i + 1) * size // grid)) for i in range(grid)] for size in (height, width)]
    return np.stack(
        [np.stack([x[..., r0:r1, c0:c1].mean(axis=(-2, -1)) for c0, c1 in bounds[1]], -1) for r0, r1 in bounds[0]],
        -2,
    )


def global_descriptor(last_stage: np.ndarray, grid: int) -> np.ndarray:
    """(B, C, h, w) -> (B, C * grid * grid) unit descriptors, as the memory's retrieval uses."""
    return normalized(adaptive_average(last_stage, grid).reshape(last_stage.shape[0], -1), axis=1)


def nearest_references(descriptors: np.ndarray, references: np.ndarray, retrieve: int) -> np.ndarray:
    """(B, n) the n = min(retrieve, R) nearest references to each descriptor (B, D), by cosine similarity."""
    similarity = descriptors @ references.T  # (B, R)
    n = min(retrieve, references.shape[0]) if retrieve > 0 else references.shape[0]
    return np.argsort(-similarity, axis=1, kind="stable")[:, :n]


def nearest_distance(queries: np.ndarray, bank: np.ndarray, chunk_elements: int) -> np.ndarray:
    """Cosine distance (Q,) from each unit query (Q, C) to its nearest bank row (N, C), in bounded chunks."""
    rows = max(1, chunk_elements // max(1, bank.shape[0]))
    out = [1.0 - (queries[i : i + rows] @ bank.T).max(axis=1) for i in range(0, queries.shape[0], rows)]
    return np.maximum(np.concatenate(out), 0.0).astype(np.float32)


def stage_distances(feats: Sequence[np.ndarray], banks: Sequence[np.ndarray], chunk_elements: int) -> list[np.ndarray]:
    """Per stage (B, h, w) distances of embedded features (B, C, h, w) to their nearest row of each bank (N, C)."""
    maps = []
    for stage_feats, bank in zip(feats, banks, strict=True):
        b, c, h, w = stage_feats.shape
        queries = np.ascontiguousarray(stage_feats.transpose(0, 2, 3, 1).reshape(-1, c))
        maps.append(nearest_distance(queries, bank, chunk_elements).reshape(b, h, w))
    return maps


def fuse_maps(
    stage_maps: Sequence[np.ndarray], up: Sequence[tuple[np.ndarray, np.ndarray]], sigma: float
) -> np.ndarray:
    """Per-stage (B, h, w) maps -> (B, H, W): upsampled by each stage's (H, h) and (W, w) bilinear matrices,
    averaged, Gaussian-smoothed."""
    upsampled = [rows @ m @ cols.T for m, (rows, cols) in zip(stage_maps, up, strict=True)]
    fused = np.stack(upsampled).mean(axis=0, dtype=np.float32)
    return np.stack([gaussian_filter(m, sigma=sigma) for m in fused]).astype(np.float32)


def top_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the highest `fraction` of values (at least one)."""
    flat = values.ravel()
    count = max(1, int(round(flat.size * fraction)))
    return float(np.partition(flat, flat.size - count)[-count:].mean())


def confidence_word(margin: float) -> str:
    distance = abs(margin)
    if distance < 1.0:
        return "low"
    return "medium" if distance < 3.0 else "high"


class Decision(NamedTuple):
    is_anomalous: bool
    margin: float
    threshold: float
    pixel_threshold: float
    regions: list[Region]


def decide(
    anomaly_map: np.ndarray,
    image: np.ndarray,
    score: float,
    calibration: dict[str, Any],
    sensitivity: float,
    min_region_px: int | None,
) -> Decision:
    """Verdict, margin, thresholds and regions (none under min_region_px), by anomalygpt.inspection.decide's rule."""
    spread = float(calibration["normal_spread"])
    shift = sensitivity * spread
    threshold = float(calibration["image_threshold"]) - shift
    half = float(calibration["pixel_threshold"]) / 2
    floor = min(half, threshold) if threshold > 0 else half
    pixel_threshold = max(min(float(calibration["pixel_threshold"]) - shift, threshold), floor)
    is_anomalous = bool(score > threshold)
    regions = []
    if is_anomalous:  # a region must also peak above the image threshold, as in anomalygpt.inspection.decide
        regions = find_regions(anomaly_map, pixel_threshold, image, min_region_px, min_peak=threshold)
    return Decision(is_anomalous, (score - threshold) / spread, threshold, pixel_threshold, regions)


def reference_fit(
    query: np.ndarray, brightness: float, references: np.ndarray, stats: dict[str, Any], names: Sequence[str]
) -> dict[str, object]:
    """How well a query's appearance (D,) and brightness match the references', by references.reference_fit's rule."""
    distance = np.maximum(1.0 - references @ query, 0.0)  # (R,)
    order = np.argsort(distance, kind="stable")[:3].tolist()
    nearest = float(distance[order[0]])
    if stats["n"] == 0:
        return {"distance": round(nearest, 5), "ratio": None, "brightness": None, "fits": None, "nearest": [names[0]]}
    ratio = nearest / float(stats["typical"])
    light = (brightness - float(stats["brightness"])) / float(stats["brightness_spread"])
    return {
        "distance": round(nearest, 5),
        "ratio": round(ratio, 2),
        "brightness": round(light, 2),
        "fits": bool(ratio <= FIT_LIMIT and abs(light) <= BRIGHTNESS_LIMIT),
        "nearest": [names[i] for i in order],
    }


def fit_warning(fit: dict[str, object]) -> str | None:
    """The one-line warning for a query that does not fit its references, else None."""
    if fit["fits"] is not False:
        return None
    ratio, light = float(fit["ratio"]), float(fit["brightness"])  # type: ignore[arg-type]
    if ratio > FIT_LIMIT:
        found = f"it is {ratio:.1f} times farther from the nearest one than the references are from each other"
    else:
        found = f"it is {abs(light):.1f} spreads {'brighter' if light > 0 else 'darker'} than they are"
    return (
        f"the image does not look like the good references ({found}): another product, design or lighting, or "
        "a defect over much of it? The verdict compares it with references that do not fit"
    )
