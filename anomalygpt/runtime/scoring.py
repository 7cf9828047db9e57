"""The torch path's tensor steps in numpy: patch distances to the memory, fused map, appearance distances.

Each function mirrors one in anomalygpt.memory or anomalygpt.references, which import torch; tests/test_export.py
checks every mirror against its original on the same numbers, so neither can drift without a failing test. The
steps that need no torch (working image, standardisation, score, verdict, reference fit) are anomalygpt.verdict's,
shared with the torch path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


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


def appearance_distance(query: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(R,) cosine distances of a unit appearance (D,) to the references' (R, D), as references.reference_fit's."""
    return np.maximum(1.0 - references @ query, 0.0)
