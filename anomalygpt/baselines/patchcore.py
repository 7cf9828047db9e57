"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022), full-shot.

A memory bank of locally aware patch features of the normals, thinned by greedy coreset selection; a test patch
scores its Euclidean distance to the nearest bank patch, an image its highest patch score reweighted by how
isolated that bank patch is among its own neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalygpt.baselines.features import extract_grids, patch_grid
from anomalygpt.coreset import greedy_coreset, random_projection
from anomalygpt.detector import (
    VALIDATION_FRACTION,
    DetectorError,
    FeatureCache,
    FitReport,
    Prediction,
    Stopwatch,
    checkpoint_fingerprint,
    held_out_rule,
    held_out_threshold,
    load_checkpoint,
    save_checkpoint,
    validation_split,
)
from anomalygpt.io import ImageSource
from anomalygpt.memory import fuse_maps

CHECKPOINT = "patchcore.safetensors"
PROJECT_ROWS = 1 << 16  # patches projected at a time (40 MB of float32 at 152 channels)


@dataclass(frozen=True)
class PatchCoreConfig:
    neighbourhood: int = 3  # patch features averaged over an n x n window per stage (local awareness)
    coreset_ratio: float = 0.01  # share of the training patches kept in the memory bank
    min_coreset: int = 1000  # keep at least this many patches (all when fewer): 1% of a few images is too thin
    projection_dim: int = 128  # Johnson-Lindenstrauss projection on which coreset distances are computed
    reweight_neighbours: int = 9  # b: bank neighbours of the nearest bank patch in the image-score reweighting
    sigma: float = 4.0  # Gaussian smoothing of the map, in image pixels
    chunk_elements: int = 1 << 24  # bound on query x bank distances held at once (64 MB of float32)


def validate(config: PatchCoreConfig) -> None:
    if config.neighbourhood < 1 or config.neighbourhood % 2 == 0:
        raise DetectorError(f"patchcore: neighbourhood must be a positive odd number, got {config.neighbourhood}")
    if not 0.0 < config.coreset_ratio <= 1.0:
        raise DetectorError(f"patchcore: coreset_ratio must be in (0, 1], got {config.coreset_ratio}")
    if config.min_coreset < 1:
        raise DetectorError(f"patchcore: min_coreset must be at least 1, got {config.min_coreset}")
    if config.projection_dim < 1:
        raise DetectorError(f"patchcore: projection_dim must be at least 1, got {config.projection_dim}")
    if config.reweight_neighbours < 1:
        raise DetectorError(f"patchcore: reweight_neighbours must be at least 1, got {config.reweight_neighbours}")
    if config.sigma < 0:
        raise DetectorError(f"patchcore: sigma must be >= 0, got {config.sigma}")
    if config.chunk_elements < 1:
        raise DetectorError(f"patchcore: chunk_elements must be at least 1, got {config.chunk_elements}")


def grid_rows(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C), row-major per image."""
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])


def coreset_size(n_patches: int, ratio: float, minimum: int) -> int:
    return min(n_patches, max(minimum, math.ceil(ratio * n_patches)))


def project(grids: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """(N*h*w, D) float32 projections of the rows of (N, C, h, w) grids, written chunk by chunk into one tensor."""
    per_image = grids.shape[2] * grids.shape[3]
    out = torch.empty(len(grids) * per_image, projection.shape[1])
    step = max(1, PROJECT_ROWS // per_image)
    for i in range(0, len(grids), step):
        out[i * per_image : (i + step) * per_image] = grid_rows(grids[i : i + step].float()) @ projection
    return out


def nearest_bank(
    queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and bank indices (Q, k) of the k nearest bank rows (N, C) to each query (Q, C)."""
    rows = max(1, chunk_elements // bank.shape[0])
    parts = [
        torch.cdist(queries[i : i + rows], bank).topk(k, dim=1, largest=False) for i in range(0, len(queries), rows)
    ]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def reweighted_scores(
    worst: torch.Tensor, nearest: torch.Tensor, bank: torch.Tensor, b: int, chunk_elements: int
) -> torch.Tensor:
    """(B,) image scores: each image's worst patch (B, C) at distance s* from its nearest bank row m* (index (B,)),
    times w = 1 - exp(s*) / sum over the b bank neighbours m of m* (m* included) of exp(||worst - m||)."""
    b = min(b, bank.shape[0])
    neighbours = nearest_bank(bank[nearest], bank, b, chunk_elements)[1]  # (B, b)
    distances = (bank[neighbours] - worst[:, None]).norm(dim=2)  # (B, b)
    s_star = (bank[nearest] - worst).norm(dim=1)  # (B,)
    weight = 1.0 - torch.exp(s_star - torch.logsumexp(distances, dim=1))  # log-space: raw distances overflow exp
    return weight * s_star


class PatchCoreDetector:
    """Greedy-coreset memory of normal patch features; see the module docstring."""

    name = "patchcore"

    def __init__(self, features: FeatureCache, seed: int, config: PatchCoreConfig) -> None:
        validate(config)
        self.features = features
        self.seed = seed
        self.config = config
        self.bank: torch.Tensor | None = None  # (M, C) float32 selected patch features
        self.threshold = float("nan")

    def fingerprint(self, normals: Sequence[ImageSource]) -> dict[str, Any]:
        return checkpoint_fingerprint(self.name, self.config, self.seed, normals, self.features)

    def fit(self, normals: Sequence[ImageSource], workdir: Path | None = None) -> FitReport:
        watch = Stopwatch()
        fingerprint = self.fingerprint(normals)
        path = None if workdir is None else Path(workdir) / CHECKPOINT
        state = None if path is None else load_checkpoint(path, fingerprint)
        train, held_out = validation_split(len(normals), self.seed)
        resumed = state is not None
        if state is None:
            self.bank = self.select_bank([normals[i] for i in train]).to(self.device)
            threshold, _ = held_out_threshold(self, [normals[i] for i in held_out])
            state = {"fingerprint": fingerprint, "bank": self.bank.half().cpu(), "threshold": threshold}
            if path is not None:
                save_checkpoint(path, state)
        self.bank = state["bank"].to(self.device, torch.float32)  # stored float16 patches: lossless
        self.threshold = float(state["threshold"])
        rule = held_out_rule(len(held_out)) + f" ({VALIDATION_FRACTION:.0%}, not in the bank)"
        return FitReport(len(normals), watch.seconds, self.threshold, rule, resumed=resumed)

    @property
    def device(self) -> torch.device:
        return self.features.backbone.mean.device

    @torch.inference_mode()
    def select_bank(self, sources: Sequence[ImageSource]) -> torch.Tensor:
        """(M, C) float32 coreset of the training patches (held as float16 grids, projected in chunks)."""
        grids = extract_grids(self.features, sources, self.config.neighbourhood, f"{self.name}: features").grids
        generator = torch.Generator().manual_seed(self.seed)
        projected = project(grids, random_projection(grids.shape[1], self.config.projection_dim, generator))
        n_select = coreset_size(len(projected), self.config.coreset_ratio, self.config.min_coreset)
        first = int(torch.randint(len(projected), (1,), generator=generator))
        selected = greedy_coreset(projected, n_select, first)
        per_image = grids.shape[2] * grids.shape[3]
        image, position = selected // per_image, selected % per_image
        return grids.flatten(2)[image, :, position].float()  # (M, C), same rows as grid_rows without its copy

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        if self.bank is None:
            raise DetectorError(f"{self.name}: predict before fit")
        grid = patch_grid(self.features.patches(images), self.config.neighbourhood)  # (B, C, h, w)
        b, _, h, w = grid.shape
        queries = grid_rows(grid.float())
        distances, indices = nearest_bank(queries, self.bank, 1, self.config.chunk_elements)
        patch_scores = distances[:, 0].view(b, h * w)
        worst = patch_scores.argmax(dim=1) + torch.arange(b, device=grid.device) * (h * w)  # (B,) query rows
        scores = reweighted_scores(
            queries[worst], indices[worst, 0], self.bank, self.config.reweight_neighbours, self.config.chunk_elements
        )
        maps = fuse_maps([patch_scores.view(b, h, w)], images[0].shape[:2], self.config.sigma)
        return Prediction(scores.cpu().numpy().astype(np.float64), maps)


def build(features: FeatureCache, seed: int, config: PatchCoreConfig | None = None) -> PatchCoreDetector:
    """PatchCore on the cache's backbone; DetectorError on an invalid config."""
    return PatchCoreDetector(features, seed, config or PatchCoreConfig())
