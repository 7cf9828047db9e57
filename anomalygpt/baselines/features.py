"""Locally aware patch features shared by the feature-based baselines (PatchCore, SimpleNet, feature autoencoder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from anomalygpt.detector import FeatureCache, load_batches
from anomalygpt.io import ImageSource


def patch_grid(patches: Sequence[torch.Tensor], neighbourhood: int = 3) -> torch.Tensor:
    """(B, C_total, h, w) at the finest stage's grid: each stage's raw features averaged over an n x n window
    (PatchCore's local neighbourhood aggregation, not normalised), coarser stages upsampled bilinearly, concatenated.
    """
    if not patches:
        raise ValueError("patch_grid needs at least one stage of patch features")
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be a positive odd number, got {neighbourhood}")
    size = max((stage.shape[-2:] for stage in patches), key=lambda hw: hw[0] * hw[1])
    out = []
    for stage in patches:
        feats = stage.float()
        if neighbourhood > 1:
            feats = F.avg_pool2d(feats, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
        if feats.shape[-2:] != size:
            feats = F.interpolate(feats, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(feats)
    return torch.cat(out, dim=1)


class Grids(NamedTuple):
    grids: torch.Tensor  # (N, C, h, w) float16 on the CPU: 1,000 images of 40 x 40 x 152 take 0.5 GB
    image_size: tuple[int, int]  # (H, W) of the images


@torch.inference_mode()
def extract_grids(features: FeatureCache, sources: Sequence[ImageSource], neighbourhood: int, desc: str) -> Grids:
    """patch_grid of every image, loaded and encoded in batches into one preallocated float16 tensor."""
    grids: torch.Tensor | None = None
    size = (0, 0)
    row = 0
    for batch in load_batches(sources, desc):
        grid = patch_grid(features.patches(batch), neighbourhood).to("cpu", torch.float16)  # (B, C, h, w)
        if grids is None:
            grids = torch.empty((len(sources), *grid.shape[1:]), dtype=torch.float16)
            size = batch[0].shape[:2]
        grids[row : row + len(grid)] = grid
        row += len(grid)
    if grids is None:
        raise ValueError(f"{desc}: no images")
    return Grids(grids, size)
