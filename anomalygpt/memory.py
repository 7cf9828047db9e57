"""PatchMemory: few-shot anomaly maps by nearest-neighbour matching against good reference patches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomalygpt.backbones import VisionBackbone

N_DIHEDRAL = 8  # 4 rotations x optional horizontal flip


@dataclass(frozen=True)
class MemoryConfig:
    augment: bool = True  # add the 8 rotations/flips of each reference; off for products with a fixed orientation
    neighbourhood: int = 3  # patch features averaged over an n x n window (local context, as in PatchCore)
    max_patches: int = 40_000  # per stage; a larger memory is randomly subsampled (seeded)
    chunk_elements: int = 1 << 23  # bound on query x memory similarities held at once (32 MB of float32)
    sigma: float = 4.0  # Gaussian smoothing of the fused map, in image pixels
    top_fraction: float = 0.01  # image score = mean of the highest fraction of map pixels
    seed: int = 0


def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    """One of the 8 rotations/flips of the last two (square) dims; index 0 is the identity."""
    if index >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=index % 4, dims=(-2, -1))


def augmented_views(pixels: torch.Tensor, augment: bool) -> list[torch.Tensor]:
    """(B, 3, S, S) -> list of its dihedral views (identity first)."""
    return [dihedral(pixels, i) for i in range(N_DIHEDRAL if augment else 1)]


def embed_patches(patches: Sequence[torch.Tensor], neighbourhood: int) -> list[torch.Tensor]:
    """Locally averaged, L2-normalised patch features per stage, each (B, C, h, w)."""
    out = []
    for feats in patches:
        if neighbourhood > 1:
            feats = F.avg_pool2d(feats, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
        out.append(F.normalize(feats.float(), dim=1))
    return out


def original_positions(size: int, index: int) -> torch.Tensor:
    """(2, size, size): for each cell of dihedral view `index`, the (row, col) of the cell it came from."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return dihedral(torch.stack([rows, cols]), index)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Cosine distance (Q,) from each normalised query (Q, C) to its nearest bank row (N, C), in bounded chunks."""
    rows = max(1, chunk_elements // max(1, bank.shape[0]))
    out = [1.0 - (queries[i : i + rows] @ bank.T).amax(dim=1) for i in range(0, queries.shape[0], rows)]
    return torch.cat(out).clamp_min(0.0)


@dataclass
class StageBank:
    features: torch.Tensor  # (N, C) normalised
    reference: torch.Tensor  # (N,) index of the reference image each patch came from
    quadrant: torch.Tensor  # (N,) 0..3, quadrant of the patch's original position (for k = 1 hold-out)


def quadrant_of(positions: torch.Tensor, size: int) -> torch.Tensor:
    """(2, ...) row/col positions on a size x size grid -> quadrant id 0..3 (row-major)."""
    half = size / 2
    return (positions[0] >= half).long() * 2 + (positions[1] >= half).long()


class PatchMemory:
    """Multi-stage memory of good patches; scores queries by distance to the nearest good patch."""

    def __init__(
        self,
        backbone: VisionBackbone,
        banks: list[StageBank],
        reference_feats: list[list[torch.Tensor]],
        image_size: tuple[int, int],
        cfg: MemoryConfig,
    ) -> None:
        self.backbone = backbone
        self.banks = banks
        self.reference_feats = reference_feats  # per reference, per stage (V, C, h, w): kept for calibration
        self.image_size = image_size  # (H, W) of the references; queries must match
        self.cfg = cfg
        # Added to every stage's distance map: the fused decoder's weighted abnormality (None: memory alone).
        self.prior: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None

    @property
    def n_references(self) -> int:
        return len(self.reference_feats)

    @classmethod
    @torch.inference_mode()
    def build(cls, backbone: VisionBackbone, references: Sequence[np.ndarray], cfg: MemoryConfig) -> PatchMemory:
        if not references:
            raise ValueError("PatchMemory needs at least one good reference image")
        sizes = {image.shape[:2] for image in references}
        if len(sizes) > 1:
            raise ValueError(f"references differ in size: {sorted(sizes)}; use references of one size")
        reference_feats = []
        for image in references:
            views = augmented_views(backbone.preprocess([image]), cfg.augment)
            reference_feats.append(
                embed_patches(backbone(torch.cat(views), embedding=False).patches, cfg.neighbourhood)
            )
        per_stage = [
            [view_bank(feats[stage], ref) for ref, feats in enumerate(reference_feats)]
            for stage in range(len(backbone.stage_dims))
        ]
        generator = torch.Generator().manual_seed(cfg.seed)
        banks = [subsample(concat_banks(parts), cfg.max_patches, generator) for parts in per_stage]
        return cls(backbone, banks, reference_feats, sizes.pop(), cfg)

    @torch.inference_mode()
    def stage_distances(
        self, feats: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Per stage (B, h, w) distance maps; `exclude` is a per-stage list of bank masks to leave out."""
        maps = []
        for stage, (stage_feats, bank) in enumerate(zip(feats, self.banks, strict=True)):
            bank_feats = bank.features if exclude is None else bank.features[~exclude[stage]]
            b, c, h, w = stage_feats.shape
            queries = stage_feats.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
            maps.append(nearest_distance(queries, bank_feats, self.cfg.chunk_elements).view(b, h, w))
        return maps

    def stage_maps(
        self, feats: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Per stage (B, h, w) anomaly maps: nearest-patch distances, plus the prior when one is set."""
        distances = self.stage_distances(feats, exclude)
        if self.prior is None:
            return distances
        return [d + p for d, p in zip(distances, self.prior(feats), strict=True)]

    def fuse(self, stage_maps: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
        return fuse_maps(stage_maps, size, self.cfg.sigma)

    def maps_from_patches(self, patches: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
        """(B, H, W) anomaly maps from the backbone's raw patch features of B images of size (H, W)."""
        return self.fuse(self.stage_maps(embed_patches(patches, self.cfg.neighbourhood)), size)

    def anomaly_maps(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, H, W) anomaly maps for same-size uint8 images."""
        return self.maps_from_patches(self.backbone.encode(images).patches, images[0].shape[:2])

    def image_score(self, anomaly_map: np.ndarray) -> float:
        return top_mean(anomaly_map, self.cfg.top_fraction)


def fuse_maps(stage_maps: Sequence[torch.Tensor], size: tuple[int, int], sigma: float) -> np.ndarray:
    """Per-stage (B, h, w) maps -> (B, H, W) map at image size: upsampled, averaged, Gaussian-smoothed."""
    up = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in stage_maps]
    fused = torch.stack(up).mean(dim=0).cpu().numpy()
    return np.stack([gaussian_filter(m, sigma=sigma) for m in fused]).astype(np.float32)


def top_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the highest `fraction` of values (at least one)."""
    flat = values.ravel()
    count = max(1, int(round(flat.size * fraction)))
    return float(np.partition(flat, flat.size - count)[-count:].mean())


def view_bank(feats: torch.Tensor, ref_index: int) -> StageBank:
    """Bank rows for all dihedral views (V, C, h, w) of one reference."""
    views, c, h, w = feats.shape
    rows = feats.permute(0, 2, 3, 1).reshape(-1, c)
    quadrants = torch.cat([quadrant_of(original_positions(h, v), h).reshape(-1) for v in range(views)])
    return StageBank(rows, torch.full((rows.shape[0],), ref_index, dtype=torch.long), quadrants)


def concat_banks(parts: Sequence[StageBank]) -> StageBank:
    return StageBank(
        torch.cat([p.features for p in parts]),
        torch.cat([p.reference for p in parts]),
        torch.cat([p.quadrant for p in parts]),
    )


def subsample(bank: StageBank, max_patches: int, generator: torch.Generator) -> StageBank:
    if bank.features.shape[0] <= max_patches:
        return bank
    keep = torch.randperm(bank.features.shape[0], generator=generator)[:max_patches]
    return StageBank(bank.features[keep], bank.reference[keep], bank.quadrant[keep])
