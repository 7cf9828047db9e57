"""PatchMemory: few-shot anomaly maps by nearest-neighbour matching against good reference patches.

It holds from one to thousands of references. Each reference keeps a share of its patches (a greedy coreset, or
a random subset), so that a query is never matched against more than `max_patches` patches per stage. With more
references than `retrieve`, each query is matched only against the patches of its `retrieve` nearest references
by a global descriptor, so a pool that mixes product variants behaves like the right few references.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomalygpt.backbones import VisionBackbone
from anomalygpt.coreset import greedy_coreset, random_projection
from anomalygpt.verdict import standardized, top_mean

N_DIHEDRAL = 8  # 4 rotations x optional horizontal flip
THINNINGS = ("coreset", "random")
CORESET_DIM = 128  # random projection the coreset distances are computed on
# Bound on query x memory similarities held at once on a GPU (512 MB of float32): MemoryConfig.chunk_elements suits
# a CPU's caches, but on a GPU its thousands of small products cost more in launches than in arithmetic.
CUDA_CHUNK_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class MemoryConfig:
    # The 8 rotations/flips of each reference: helps rotation-invariant products, hurts oriented ones.
    # None: decided per product from the references (anomalygpt.references.decide_augmentation).
    augment: bool | None = None
    # Each image's grey levels shifted and scaled to one mean and spread before the backbone (references and
    # queries alike), so brightness and contrast differences between good parts do not count as anomalies; the
    # reference-fit check still sees brightness. ELPV dev half: 4-shot I-AUROC +0.028 mono, +0.009 poly.
    standardize: bool = False
    neighbourhood: int = 3  # patch features averaged over an n x n window (local context, as in PatchCore)
    max_patches: int = 16_000  # per stage: the most good patches one query is matched against
    thinning: str = "coreset"  # how a reference's patches are cut to its share of max_patches: "coreset"/"random"
    retrieve: int = 8  # more references than this: each query is matched against its n nearest only (0: all)
    descriptor_grid: int = 4  # global descriptor: the last stage's features averaged over a g x g grid
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


def global_descriptor(last_stage: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, h, w) embedded patch features -> (B, C * grid * grid) unit descriptors of the whole image's layout."""
    return F.normalize(F.adaptive_avg_pool2d(last_stage.float(), grid).flatten(1), dim=1)


def appearance(last_stage: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) embedded patch features -> (B, C) unit mean feature: what the image looks like overall,
    for the reference-fit check (a local defect moves it little)."""
    return F.normalize(last_stage.float().mean(dim=(2, 3)), dim=1)


def original_positions(size: int, index: int) -> torch.Tensor:
    """(2, size, size): for each cell of dihedral view `index`, the (row, col) of the cell it came from."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return dihedral(torch.stack([rows, cols]), index)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Cosine distance (Q,) float32 from each normalised query (Q, C) to its nearest bank row (N, C), in bounded
    chunks, computed in the bank's dtype on the bank's device."""
    queries = queries.to(bank.device, bank.dtype)
    if bank.is_cuda:
        chunk_elements = max(chunk_elements, CUDA_CHUNK_ELEMENTS)
    rows = max(1, chunk_elements // max(1, bank.shape[0]))
    out = [1.0 - (queries[i : i + rows] @ bank.T).amax(dim=1).float() for i in range(0, queries.shape[0], rows)]
    return torch.cat(out).clamp_min(0.0)


@dataclass
class StageBank:
    """One stage's good patches, grouped by reference (ascending), with where each came from."""

    features: torch.Tensor  # (N, C) normalised, float16 (what a profile stores; searched as float32 slices)
    reference: torch.Tensor  # (N,) index of the reference image each patch came from, ascending
    position: torch.Tensor  # (N,) row * side + col of the patch's cell in its reference (original orientation)

    def quadrant(self, side: int) -> torch.Tensor:
        """(N,) 0..3: the quadrant of each patch's original cell on a side x side grid (row-major)."""
        rows, cols = self.position // side, self.position % side
        return quadrant_of(torch.stack([rows, cols]), side)


def quadrant_of(positions: torch.Tensor, size: int) -> torch.Tensor:
    """(2, ...) row/col positions on a size x size grid -> quadrant id 0..3 (row-major)."""
    half = size / 2
    return (positions[0] >= half).long() * 2 + (positions[1] >= half).long()


def reference_share(cfg: MemoryConfig, n_references: int) -> int:
    """Patches per stage each reference keeps: max_patches over the references one query is matched against."""
    matched = min(n_references, cfg.retrieve) if cfg.retrieve > 0 else n_references
    return max(1, cfg.max_patches // max(1, matched))


def thin(features: torch.Tensor, keep: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of `keep` rows of features (N, C): greedy k-center coreset or a random subset."""
    n = features.shape[0]
    if keep >= n:
        return torch.arange(n)
    if method == "random":
        return torch.randperm(n, generator=generator)[:keep].sort().values
    if method != "coreset":
        raise ValueError(f"unknown thinning {method!r}; known: {', '.join(THINNINGS)}")
    projected = features.float() @ random_projection(features.shape[1], CORESET_DIM, generator)
    first = int(torch.randint(n, (1,), generator=generator))
    return greedy_coreset(projected, keep, first).sort().values


def reference_bank(views: torch.Tensor, index: int, keep: int, method: str, generator: torch.Generator) -> StageBank:
    """One reference's bank rows at one stage from its dihedral views (V, C, h, w), thinned to `keep` rows."""
    n_views, channels, side, _ = views.shape
    rows = views.permute(0, 2, 3, 1).reshape(-1, channels)
    origin = torch.cat([original_positions(side, v) for v in range(n_views)], dim=1)  # (2, V*side, side)
    positions = (origin[0] * side + origin[1]).reshape(-1)
    chosen = thin(rows.cpu(), keep, method, generator)  # on the CPU: its generator and one-thread greedy loop
    # float16: half the memory, and a profile stores exactly what the fitted memory holds; kept on the features'
    # device (the backbone's), where queries are searched
    features = rows[chosen.to(rows.device)].half()
    return StageBank(features, torch.full((len(chosen),), index, dtype=torch.long), positions[chosen])


def concat_banks(parts: Sequence[StageBank]) -> StageBank:
    return StageBank(
        torch.cat([p.features for p in parts]),
        torch.cat([p.reference for p in parts]),
        torch.cat([p.position for p in parts]),
    )


def memory_inputs(images: Sequence[np.ndarray], cfg: MemoryConfig) -> list[np.ndarray]:
    """The images as the memory sees them: standardised when the config asks for it."""
    return [standardized(image) for image in images] if cfg.standardize else list(images)


@torch.inference_mode()
def encode_views(backbone: VisionBackbone, image: np.ndarray, augment: bool, cfg: MemoryConfig) -> list[torch.Tensor]:
    """Per stage (V, C, h, w) embedded features of an image's dihedral views (V = 8, or 1 without augmentation)."""
    views = augmented_views(backbone.preprocess(memory_inputs([image], cfg)), augment)
    return embed_patches(backbone(torch.cat(views).contiguous(), embedding=False).patches, cfg.neighbourhood)


class PatchMemory:
    """Multi-stage memory of good patches; scores queries by distance to the nearest good patch."""

    def __init__(
        self,
        backbone: VisionBackbone,
        banks: list[StageBank],
        descriptors: torch.Tensor,
        appearances: torch.Tensor,
        image_size: tuple[int, int],
        cfg: MemoryConfig,
        augment: bool,
    ) -> None:
        self.backbone = backbone
        self.banks = banks
        self.descriptors = descriptors  # (R, D) one layout descriptor per reference (identity view), for retrieval
        self.appearances = appearances  # (R, C) one appearance per reference, for the reference-fit check
        self.image_size = image_size  # (H, W) of the references; queries must match
        self.cfg = cfg
        self.augment = augment  # whether the banks hold every dihedral view (the decision, not the preset's wish)
        n = descriptors.shape[0]
        # Rows of reference r at a stage: offsets[stage][r] to offsets[stage][r + 1].
        self.offsets = [
            torch.cat([torch.zeros(1, dtype=torch.long), bank.reference.bincount(minlength=n).cumsum(0)])
            for bank in banks
        ]
        # Added to every stage's distance map: the fused decoder's weighted abnormality (None: memory alone).
        self.prior: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None
        self._search: dict[torch.dtype, list[torch.Tensor]] = {}  # the banks as searched, per dtype (search_banks)

    @property
    def n_references(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def retrieval(self) -> bool:
        """Whether each query is matched against its nearest references only (a pool larger than `retrieve`)."""
        return 0 < self.cfg.retrieve < self.n_references

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        backbone: VisionBackbone,
        references: Sequence[np.ndarray],
        cfg: MemoryConfig,
        augment: bool,
        on_reference: Callable[[int, list[torch.Tensor]], None] | None = None,
        encoded: Mapping[int, list[torch.Tensor]] | None = None,
        on_progress: Callable[[], object] | None = None,
    ) -> PatchMemory:
        """Index references one at a time (bounded memory). on_reference sees each one's views (per stage
        (V, C, h, w)); `encoded` holds views already computed for some references (index -> views)."""
        if not references:
            raise ValueError("PatchMemory needs at least one good reference image")
        keep = reference_share(cfg, len(references))
        generator = torch.Generator().manual_seed(cfg.seed)
        per_stage: list[list[StageBank]] = [[] for _ in backbone.stage_dims]
        descriptors, appearances = [], []
        size: tuple[int, int] | None = None
        for index in range(len(references)):
            image = references[index]
            if size is not None and image.shape[:2] != size:
                raise ValueError(f"references differ in size: {size} and {image.shape[:2]}; use references of one size")
            size = image.shape[:2]
            views = (encoded or {}).get(index) or encode_views(backbone, image, augment, cfg)
            descriptors.append(global_descriptor(views[-1][:1], cfg.descriptor_grid)[0])
            appearances.append(appearance(views[-1][:1])[0])
            for parts, stage_views in zip(per_stage, views, strict=True):
                parts.append(reference_bank(stage_views, index, keep, cfg.thinning, generator))
            if on_reference is not None:
                on_reference(index, views)
            if on_progress is not None:
                on_progress()
        assert size is not None
        banks = [concat_banks(parts) for parts in per_stage]
        return cls(backbone, banks, torch.stack(descriptors), torch.stack(appearances), size, cfg, augment)

    def nearest_references(self, descriptors: torch.Tensor, exclude: int | None = None) -> torch.Tensor:
        """(B, n) indices of the n = min(retrieve, references) nearest references to each descriptor (B, D)."""
        similarity = descriptors @ self.descriptors.T  # (B, R)
        if exclude is not None:
            similarity[:, exclude] = -torch.inf
        available = self.n_references - (exclude is not None)
        n = min(self.cfg.retrieve, available) if self.cfg.retrieve > 0 else available
        return similarity.topk(n, dim=1).indices

    def search_banks(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Per stage (N, C) features of every reference in `dtype`, made once and kept on the banks' device, so
        that batch after batch searches them without a copy or a conversion."""
        if dtype not in self._search:
            self._search[dtype] = [bank.features.to(dtype).contiguous() for bank in self.banks]
        return self._search[dtype]

    def bank_of(
        self, references: Sequence[int] | torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> list[torch.Tensor]:
        """Per stage (N, C) features of the given references' patches, in `dtype`."""
        chosen = [int(r) for r in references]
        return [
            torch.cat([bank.features[offsets[r] : offsets[r + 1]] for r in chosen]).to(dtype)
            for bank, offsets in zip(self.banks, self.offsets, strict=True)
        ]

    @torch.inference_mode()
    def nearest_rows(
        self, queries: torch.Tensor, stage: int, references: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each query patch (Q, C): cosine distance to its best-matching good patch at `stage`, that patch's
        reference index and its position (row * side + col in the reference), among `references` (default all)."""
        bank = self.banks[stage]
        if references is None:
            rows = torch.arange(bank.features.shape[0])
        else:
            offsets = self.offsets[stage]
            rows = torch.cat([torch.arange(int(offsets[r]), int(offsets[r + 1])) for r in references])
        similarity, best = (queries @ bank.features[rows].float().T).max(dim=1)
        chosen = rows[best.cpu()]
        return (1.0 - similarity).clamp_min(0.0), bank.reference[chosen], bank.position[chosen]

    @torch.inference_mode()
    def stage_distances(self, feats: Sequence[torch.Tensor], banks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage (B, h, w) distances of embedded features (B, C, h, w) to their nearest row of each bank."""
        maps = []
        for stage_feats, bank in zip(feats, banks, strict=True):
            b, c, h, w = stage_feats.shape
            queries = stage_feats.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
            maps.append(nearest_distance(queries, bank, self.cfg.chunk_elements).view(b, h, w))
        return maps

    def with_prior(self, feats: Sequence[torch.Tensor], distances: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage anomaly maps: distances, plus the fused decoder's prior when one is set."""
        if self.prior is None:
            return distances
        return [d + p for d, p in zip(distances, self.prior(feats), strict=True)]

    @torch.inference_mode()
    def stage_maps(self, feats: Sequence[torch.Tensor], half: bool = False) -> list[torch.Tensor]:
        """Per stage (B, h, w) anomaly maps of queries: against every reference, or each against its nearest.
        `half`: similarities in float16 (Inspector.batch_maps asks for it on its device path only)."""
        dtype = torch.float16 if half else torch.float32
        if not self.retrieval:
            return self.with_prior(feats, self.stage_distances(feats, self.search_banks(dtype)))
        nearest = self.nearest_references(global_descriptor(feats[-1], self.cfg.descriptor_grid))
        per_image = [
            self.stage_distances([f[i : i + 1] for f in feats], self.bank_of(nearest[i], dtype))
            for i in range(len(nearest))
        ]
        distances = [torch.cat([maps[stage] for maps in per_image]) for stage in range(len(feats))]
        return self.with_prior(feats, distances)

    def fuse(self, stage_maps: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
        return fuse_maps(stage_maps, size, self.cfg.sigma)

    def maps_from_patches(self, patches: Sequence[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
        """(B, H, W) anomaly maps from the backbone's raw patch features of B images of size (H, W)."""
        return self.fuse(self.stage_maps(embed_patches(patches, self.cfg.neighbourhood)), size)

    def anomaly_maps(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, H, W) anomaly maps for same-size uint8 images."""
        return self.maps_from_patches(
            self.backbone.encode(memory_inputs(images, self.cfg)).patches, images[0].shape[:2]
        )

    def image_score(self, anomaly_map: np.ndarray) -> float:
        return top_mean(anomaly_map, self.cfg.top_fraction)


def fuse_maps(stage_maps: Sequence[torch.Tensor], size: tuple[int, int], sigma: float) -> np.ndarray:
    """Per-stage (B, h, w) maps -> (B, H, W) map at image size: upsampled, averaged, Gaussian-smoothed (scipy on the
    CPU; on a GPU there, with the same kernel and edge mode, and only the result copied back)."""
    if stage_maps[0].is_cuda:
        return fused_tensor(stage_maps, size, sigma).cpu().numpy()
    fused = upsampled_mean(stage_maps, size).cpu().numpy()
    return np.stack([gaussian_filter(m, sigma=sigma) for m in fused]).astype(np.float32)


def upsampled_mean(stage_maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-stage (B, h, w) maps -> (B, H, W) float32: each upsampled bilinearly to `size`, then averaged."""
    up = [F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] for m in stage_maps]
    return torch.stack(up).mean(dim=0)


def fused_tensor(stage_maps: Sequence[torch.Tensor], size: tuple[int, int], sigma: float) -> torch.Tensor:
    """fuse_maps as a (B, H, W) tensor on the maps' device, smoothed by gaussian_smooth."""
    return gaussian_smooth(upsampled_mean(stage_maps, size), sigma)


def gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian (truncated at 4 sigma, normalised), as float32."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return (weights / weights.sum()).to(device, torch.float32)


def reflected_indices(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded by `radius` on each side in scipy's 'reflect' mode (d c b a | a b c d),
    however large the radius."""
    period = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(period < n, period, 2 * n - 1 - period)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) maps smoothed as scipy.ndimage.gaussian_filter does (same kernel, 'reflect' edges; float32
    rounding differs by ~1e-7), one separable pass per axis on the maps' device."""
    if sigma <= 1e-15:  # as scipy: no smoothing
        return maps
    kernel = gaussian_kernel(sigma, maps.device)
    radius = (kernel.numel() - 1) // 2
    batch, height, width = maps.shape
    rows = maps.index_select(1, reflected_indices(height, radius, maps.device))  # (B, H + 2r, W)
    rows = F.conv1d(rows.permute(0, 2, 1).reshape(-1, 1, height + 2 * radius), kernel[None, None])
    rows = rows.reshape(batch, width, height).permute(0, 2, 1)  # (B, H, W)
    cols = rows.index_select(2, reflected_indices(width, radius, maps.device))  # (B, H, W + 2r)
    return F.conv1d(cols.reshape(-1, 1, width + 2 * radius), kernel[None, None]).reshape(batch, height, width)


def top_means(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B,) top_mean of each (H, W) map of a (B, H, W) tensor, on its device."""
    flat = maps.flatten(1)
    count = max(1, int(round(flat.shape[1] * fraction)))
    return flat.topk(count, dim=1, sorted=False).values.mean(dim=1)
