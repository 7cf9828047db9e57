"""Locally aware patch features shared by the feature-based baselines (PatchCore, SimpleNet, feature autoencoder)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
