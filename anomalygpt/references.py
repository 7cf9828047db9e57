"""Good references before they are trusted: degenerate sets, the augmentation decision, the reference-fit check.

- Blank (near-constant) references are refused; the same picture under several names counts once, with a warning,
  so a duplicated set behaves like one reference, never like a perfect one.
- Rotation/flip augmentation is decided per product from the references alone: each reference is held out with
  simple simulated defects drawn on it (dark and bright lines and spots), and the memory with augmentation is kept
  only when it separates those defects from the held-out good reference better than the memory without it.
- Every query's appearance (its mean deepest patch feature) is compared with the references': its distance to the
  nearest reference over the references' own typical spacing tells when a query looks unlike every reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from anomalygpt.backbones import VisionBackbone
from anomalygpt.memory import MemoryConfig, encode_views, fuse_maps, nearest_distance
from anomalygpt.verdict import BLANK_STD, FitStatistics, fit_of_distances, grey_thumbnail, pixel_spread, top_mean

# The same picture: grey levels differing by less than DUPLICATE_RMS (root mean square, 0-255, full resolution).
# ELPV dev half (bench/bench_reference_checks.py): re-saved copies 0, JPEG quality 95 up to 1.2, 1-level noise
# 0.8, JPEG quality 75 up to 2.3 (65-95 % caught); the closest distinct good cells 2.9 (mono) and 3.4 (poly).
# Only pairs whose 32 px thumbnails are closer than CANDIDATE_RMS are compared at full resolution.
DUPLICATE_RMS = 2.0
CANDIDATE_RMS = 2.0
AUGMENT_SUBSET = 8  # references the augmentation decision holds out, at most
# Augmentation is kept only when it raises the separation by at least this factor: it costs 8x the indexing time,
# and on ELPV's dev half it raised the separation by 4-25 % without moving real AUROC (4-shot 0.861 vs 0.863,
# pools 0.948 vs 0.948), so a small gain is not worth it.
AUGMENT_GAIN = 1.3
BRIGHTNESS_SPREAD_PRIOR = 0.05  # floor of the brightness spread, relative to the mean, over sqrt(k)


class InspectionError(ValueError):
    """The inspection cannot run on these inputs (no references, size mismatch, blank references...)."""


@dataclass
class ReferenceSet:
    """The references kept after the checks, and what was said about them."""

    keep: list[int]  # indices into the given references
    warnings: list[str]
    brightness: list[float]  # mean grey level of each reference kept


def check_references(images: Sequence[np.ndarray], names: Sequence[str]) -> ReferenceSet:
    """One pass over the references: one size, none blank; one of each group of the same picture kept."""
    thumbs: list[torch.Tensor] = []
    size: tuple[int, int] | None = None
    for image, name in zip(images, names, strict=True):
        if size is not None and image.shape[:2] != size:
            raise InspectionError(
                f"references differ in size ({names[0]}: {size[1]}x{size[0]}, {name}: "
                f"{image.shape[1]}x{image.shape[0]}); use references of one size"
            )
        size = image.shape[:2]
        spread = pixel_spread(image)
        if spread < BLANK_STD:
            raise InspectionError(
                f"{name}: blank reference (its pixels vary by {spread:.1f} grey levels); "
                "references must be good images of the product"
            )
        thumbs.append(torch.from_numpy(grey_thumbnail(image).ravel()))

    def same_picture(i: int, j: int) -> bool:
        return grey_rms(images[i], images[j]) < DUPLICATE_RMS

    keep, warnings = unique_references(torch.stack(thumbs), names, same_picture)
    return ReferenceSet(keep, warnings, [float(thumbs[i].mean()) for i in keep])


def grey_rms(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference of two same-size images' grey levels, at full resolution."""
    grey_a, grey_b = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float32) for x in (a, b))
    return float(np.sqrt(np.mean((grey_a - grey_b) ** 2)))


def unique_references(
    thumbs: torch.Tensor, names: Sequence[str], same_picture: Callable[[int, int], bool], block: int = 1024
) -> tuple[list[int], list[str]]:
    """The indices of the first of each group of the same picture, and a warning per group. Thumbnails (R, T)
    closer than CANDIDATE_RMS are candidates; `same_picture` confirms them at full resolution (fine textures can
    share a thumbnail)."""
    first_copy = [-1] * len(thumbs)  # the earlier reference each one copies, or -1
    for start in range(0, len(thumbs), block):
        rms = torch.cdist(thumbs[start : start + block], thumbs[: start + block]) / math.sqrt(thumbs.shape[1])
        for offset, row in enumerate(rms):
            index = start + offset
            candidates = torch.nonzero(row[:index] < CANDIDATE_RMS).flatten().tolist()
            first_copy[index] = next((j for j in candidates if same_picture(j, index)), -1)
    groups: dict[int, list[int]] = {}
    for index, original in enumerate(first_copy):
        if original >= 0:
            root = original if first_copy[original] < 0 else first_copy[original]
            groups.setdefault(root, []).append(index)
    warnings = [
        f"{len(copies) + 1} references are the same picture ({', '.join(names[i] for i in [root, *copies])}): "
        "counted once"
        for root, copies in groups.items()
    ]
    return [i for i, original in enumerate(first_copy) if original < 0], warnings


def simulated_defects(image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Four copies of the image with one simple defect each: a dark line, a bright line, a dark and a bright spot."""
    height, width = image.shape[:2]
    side = min(height, width)
    out = []
    for shape, darker in (("line", True), ("line", False), ("spot", True), ("spot", False)):
        mask = np.zeros((height, width), np.uint8)
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        if shape == "line":
            angle = rng.uniform(0, np.pi)
            half = 0.2 * side
            dy, dx = half * np.sin(angle), half * np.cos(angle)
            start, end = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
            cv2.line(mask, start, end, 1, thickness=max(2, side // 60))
        else:
            cv2.circle(mask, (int(cx), int(cy)), max(3, side // 16), 1, thickness=-1)
        grey = image.astype(np.float32)
        target = grey * 0.4 if darker else grey + 0.6 * (255 - grey)
        out.append(np.where(mask[..., None] > 0, target, grey).clip(0, 255).astype(np.uint8))
    return out


@dataclass(frozen=True)
class AugmentationDecision:
    augment: bool
    reason: str  # in words, for the profile and the inspection
    separation_on: float | None = None  # held-out defect / good score ratio with the 8 views
    separation_off: float | None = None  # the same without them

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.inference_mode()
def decide_augmentation(
    backbone: VisionBackbone, images: Sequence[np.ndarray], cfg: MemoryConfig, rng: np.random.Generator
) -> tuple[AugmentationDecision, dict[int, list[torch.Tensor]]]:
    """The decision, and the full views of the references it encoded (index -> per stage (8, C, h, w))."""
    if cfg.augment is not None:
        return AugmentationDecision(cfg.augment, "set by the preset"), {}
    if len(images) < 2:
        return AugmentationDecision(True, "one reference: nothing to hold out, so kept on"), {}
    subset = sorted(rng.choice(len(images), min(AUGMENT_SUBSET, len(images)), replace=False).tolist())
    views = {i: encode_views(backbone, images[i], True, cfg) for i in subset}
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for held in subset:
        queries = [encode_views(backbone, image, False, cfg) for image in simulated_defects(images[held], rng)]
        for augment in (True, False):
            bank = [
                torch.cat([rows_of(views[i][s], augment) for i in subset if i != held]) for s in range(len(views[held]))
            ]
            good = held_out_score(views[held], bank, images[held].shape[:2], cfg)
            ratios[augment] += [held_out_score(q, bank, images[held].shape[:2], cfg) / max(good, 1e-9) for q in queries]
    on, off = float(np.median(ratios[True])), float(np.median(ratios[False]))
    augment = on >= AUGMENT_GAIN * off
    reason = (
        f"decided from {len(subset)} references with simulated defects: defect/good score ratio "
        f"{on:.2f} with rotations/flips, {off:.2f} without; kept when {AUGMENT_GAIN:g} times as high or more"
    )
    return AugmentationDecision(augment, reason, on, off), views


def rows_of(views: torch.Tensor, augment: bool) -> torch.Tensor:
    """(N, C) bank rows of one stage's views (V, C, h, w): every view, or the identity only."""
    chosen = views if augment else views[:1]
    return chosen.permute(0, 2, 3, 1).reshape(-1, chosen.shape[1])


def held_out_score(
    views: list[torch.Tensor], bank: list[torch.Tensor], size: tuple[int, int], cfg: MemoryConfig
) -> float:
    """Image score of an image's identity view (per stage (V, C, h, w)) against per-stage bank rows."""
    stage_maps = []
    for feats, rows in zip(views, bank, strict=True):
        _, c, h, w = feats.shape
        queries = feats[:1].permute(0, 2, 3, 1).reshape(-1, c)
        stage_maps.append(nearest_distance(queries, rows, cfg.chunk_elements).view(1, h, w))
    return top_mean(fuse_maps(stage_maps, size, cfg.sigma)[0], cfg.top_fraction)


def fit_statistics(appearances: torch.Tensor, brightness: Sequence[float]) -> FitStatistics:
    """From (R, D) unit appearance descriptors and R mean grey levels."""
    n = appearances.shape[0]
    if n < 2:
        return FitStatistics(0.0, 0)
    distance = 1.0 - appearances @ appearances.T
    distance.fill_diagonal_(math.inf)
    typical = max(float(distance.amin(dim=1).clamp_min(0.0).double().mean()), 1e-6)
    levels = np.asarray(brightness, dtype=np.float64)
    spread = max(float(levels.std(ddof=1)), BRIGHTNESS_SPREAD_PRIOR * float(levels.mean()) / math.sqrt(n), 1.0)
    return FitStatistics(typical, n, float(levels.mean()), spread)


def reference_fit(
    appearance: torch.Tensor,
    brightness: float,
    references: torch.Tensor,
    stats: FitStatistics,
    names: Sequence[str],
    shown: int = 3,
) -> dict[str, object]:
    """How well one query matches the references (verdict.fit_of_distances), from its appearance (D,) and the
    references' (R, D)."""
    distance = (1.0 - references @ appearance).clamp_min(0.0)  # (R,)
    return fit_of_distances(distance.cpu().numpy(), brightness, stats, names, shown)
