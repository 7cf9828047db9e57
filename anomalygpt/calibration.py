"""Thresholds from the good references alone: held-out scores of the references, then a margin rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from anomalygpt.memory import PatchMemory, top_mean


@dataclass(frozen=True)
class CalibrationConfig:
    z: float = 3.0  # image threshold = mean + z * spread of the held-out normal scores (bench/bench_calibration.py)
    min_spread: float = 0.05  # spread floor, relative to the mean: 1-4 references give an unstable std
    pixel_quantile: float = 0.999  # pixel threshold: this quantile of the held-out normal map values


@dataclass(frozen=True)
class Calibration:
    image_threshold: float
    pixel_threshold: float
    normal_mean: float  # mean held-out score of good references
    normal_spread: float  # their spread (std with a floor): the unit of the margin
    n_scores: int
    method: str  # how the held-out scores were formed, in words

    def margin(self, score: float) -> float:
        """Distance of a score from the threshold in units of the normal spread (> 0: anomalous)."""
        return (score - self.image_threshold) / self.normal_spread

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def held_out_maps(memory: PatchMemory) -> tuple[list[np.ndarray], str]:
    """Anomaly maps of the references scored against memory that excludes them.

    k >= 2: each reference (every dihedral view of it) against the other references.
    k = 1: each quadrant of the reference against a memory without that quadrant's patches (all views);
    only the held-out quadrant of the map is kept, so every score is of patches the memory has not seen.
    """
    if memory.n_references >= 2:
        return leave_one_reference_out(memory), (
            f"leave-one-out: each of {memory.n_references} references scored against the others"
        )
    return leave_one_quadrant_out(memory), "k=1: each quadrant of the reference scored against the other three"


@torch.inference_mode()
def leave_one_reference_out(memory: PatchMemory) -> list[np.ndarray]:
    maps: list[np.ndarray] = []
    for ref in range(memory.n_references):
        exclude = [bank.reference == ref for bank in memory.banks]
        distances = memory.stage_distances(memory.reference_feats[ref], exclude)
        maps.extend(memory.fuse(distances, memory.image_size))
    return maps


@torch.inference_mode()
def leave_one_quadrant_out(memory: PatchMemory) -> list[np.ndarray]:
    height, width = memory.image_size
    identity = [feats[:1] for feats in memory.reference_feats[0]]
    maps = []
    for quadrant in range(4):
        exclude = [bank.quadrant == quadrant for bank in memory.banks]
        full = memory.fuse(memory.stage_distances(identity, exclude), memory.image_size)[0]
        row, col = divmod(quadrant, 2)
        maps.append(full[row * height // 2 : (row + 1) * height // 2, col * width // 2 : (col + 1) * width // 2])
    return maps


def calibrate(memory: PatchMemory, cfg: CalibrationConfig) -> Calibration:
    maps, method = held_out_maps(memory)
    scores = np.array([top_mean(m, memory.cfg.top_fraction) for m in maps])
    mean = float(scores.mean())
    spread = max(float(scores.std(ddof=1)) if scores.size > 1 else 0.0, cfg.min_spread * mean, 1e-6)
    image_threshold = mean + cfg.z * spread
    pixels = np.concatenate([m.ravel() for m in maps])
    # Regions of an anomalous image must exist: the pixel threshold never exceeds the image threshold.
    pixel_threshold = min(float(np.quantile(pixels, cfg.pixel_quantile)), image_threshold)
    return Calibration(image_threshold, pixel_threshold, mean, spread, int(scores.size), method)
