"""Thresholds from the good references alone: held-out scores of the references, then a margin rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from anomalygpt.memory import PatchMemory
from anomalygpt.verdict import Calibration, top_mean

# With one reference the threshold comes from the quadrants of that image alone and cannot see how good parts
# differ from one another: on ELPV its false alarms ranged from 0 % to 93 % over three draws (bench/RESULTS.md).
ONE_REFERENCE_CAVEAT = (
    "one reference: its threshold cannot see how good parts vary; "
    "give 4 or more good references for a dependable threshold"
)
# Without references the verdict is the text-aligned decoder's, trained on simulated defects only: on real ELPV cells
# it ranks at an image AUROC of 0.60-0.62 (bench/RESULTS.md), so no answer may present it as dependable.
ZERO_SHOT_TEXT_CAVEAT = (
    "no good references: this verdict comes from a decoder trained on simulated defects, with a threshold set on "
    "simulated images, and is much weaker on real products; give 4 or more good references for a dependable verdict"
)


@dataclass(frozen=True)
class CalibrationConfig:
    z: float = 3.0  # image threshold = mean + z * spread of the held-out normal scores (bench/bench_calibration.py)
    # A few references give an unstable std (with one, the held-out quadrants show only the variation inside one
    # image), so the spread has a floor, relative to the mean, that shrinks as 1/sqrt(k): spread_prior / sqrt(k).
    # 0.2: false alarms 1.1%, 7.4%, 4.1% at k = 1, 2, 4 on stationary textures (bench/bench_calibration.py).
    spread_prior: float = 0.2
    pixel_quantile: float = 0.999  # pixel threshold: this quantile of the held-out normal map values
    max_held_out: int = 32  # a larger pool is calibrated on a seeded sample of this many held-out references
    seed: int = 0


def held_out_maps(memory: PatchMemory, held_out: dict[int, list[torch.Tensor]]) -> tuple[list[np.ndarray], str]:
    """Anomaly maps of references scored against a memory that excludes them, as a query would be scored.

    held_out: reference index -> per stage (V, C, h, w) embedded features of its views (the views in the memory).
    k >= 2: each held-out reference against the other references (with retrieval: against its nearest others;
    then only its identity view, as queries come). k = 1: each quadrant of the reference against a memory without
    that quadrant's patches; only the held-out quadrant of the map is kept, so every score is of patches the
    memory has not seen.
    """
    if memory.n_references >= 2:
        how = "its nearest others" if memory.retrieval else "the others"
        return leave_one_reference_out(memory, held_out), (
            f"leave-one-out: {len(held_out)} of {memory.n_references} references each scored against {how}"
        )
    return leave_one_quadrant_out(
        memory, held_out[0]
    ), "k=1: each quadrant of the reference scored against the other three"


@torch.inference_mode()
def leave_one_reference_out(memory: PatchMemory, held_out: dict[int, list[torch.Tensor]]) -> list[np.ndarray]:
    maps: list[np.ndarray] = []
    everyone = torch.arange(memory.n_references)
    for ref, views in held_out.items():
        if memory.retrieval:
            views = [feats[:1] for feats in views]
            others = memory.nearest_references(memory.descriptors[ref : ref + 1], exclude=ref)[0]
        else:
            others = everyone[everyone != ref]
        distances = memory.stage_distances(views, memory.bank_of(others))
        maps.extend(memory.fuse(memory.with_prior(views, distances), memory.image_size))
    return maps


@torch.inference_mode()
def leave_one_quadrant_out(memory: PatchMemory, views: list[torch.Tensor]) -> list[np.ndarray]:
    height, width = memory.image_size
    identity = [feats[:1] for feats in views]
    maps = []
    for quadrant in range(4):
        banks = [
            bank.features[bank.quadrant(feats.shape[-1]) != quadrant].float()
            for bank, feats in zip(memory.banks, views, strict=True)
        ]
        full = memory.fuse(memory.with_prior(identity, memory.stage_distances(identity, banks)), memory.image_size)[0]
        row, col = divmod(quadrant, 2)
        maps.append(full[row * height // 2 : (row + 1) * height // 2, col * width // 2 : (col + 1) * width // 2])
    return maps


def held_out_choice(n_references: int, cfg: CalibrationConfig) -> list[int]:
    """The references scored held out: all of them, or a seeded sample of max_held_out from a larger pool."""
    if n_references <= cfg.max_held_out:
        return list(range(n_references))
    return sorted(np.random.default_rng(cfg.seed).choice(n_references, cfg.max_held_out, replace=False).tolist())


def calibrate(memory: PatchMemory, held_out: dict[int, list[torch.Tensor]], cfg: CalibrationConfig) -> Calibration:
    maps, method = held_out_maps(memory, held_out)
    scores = np.array([top_mean(m, memory.cfg.top_fraction) for m in maps])
    mean = float(scores.mean())
    floor = cfg.spread_prior / math.sqrt(memory.n_references)
    raw = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    spread = max(raw, floor * mean, 1e-6)
    image_threshold = mean + cfg.z * spread
    pixels = np.concatenate([m.ravel() for m in maps])
    # Regions of an anomalous image must exist: the pixel threshold never exceeds the image threshold.
    pixel_threshold = min(float(np.quantile(pixels, cfg.pixel_quantile)), image_threshold)
    return Calibration(image_threshold, pixel_threshold, mean, spread, int(scores.size), method, raw)


def fixed_calibration(
    normal_mean: float, normal_spread: float, pixel_value: float, n_scores: int, cfg: CalibrationConfig, method: str
) -> Calibration:
    """Thresholds from stored statistics of normal scores (zero-shot: simulated validation normals), same rule."""
    spread = max(normal_spread, 1e-6)
    image_threshold = normal_mean + cfg.z * spread
    return Calibration(image_threshold, min(pixel_value, image_threshold), normal_mean, spread, n_scores, method)
