"""Evidence beside a defect: for each region, the good reference and place whose patches match it best.

The region's own patch features (the finest backbone stage, embedded as the memory embeds its references) slide over
each reference's features (identity view, computed once per reference set: `EvidenceIndex`); the window with the
highest mean cosine similarity is the best match. Its pixel box (the region's box moved there) is the good crop an
operator sees beside the defect crop, and the grey-level difference between the region's pixels and the same pixels
of that box says how the region differs (darker or brighter by how much, rougher or smoother). The references'
features are computed here from their images, with `References.memory.backbone`, `.memory.cfg.neighbourhood` and
`memory.embed_patches` only, so evidence does not depend on how the memory stores (or thins) its patches; with a
large pool it looks at MAX_REFERENCES of them, evenly spaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anomalygpt.io import ImageSource, load_image
from anomalygpt.memory import embed_patches
from anomalygpt.regions import EIGHT_CONNECTED, LUMA_WEIGHTS, Region, location_word

if TYPE_CHECKING:
    from anomalygpt.inspection import Inspection, Inspector, References

STAGE = 0  # the finest stage (stride 8 on EfficientNet-Lite0): places to within a few pixels
MAX_REFERENCES = 16  # references searched for a match (evenly spaced over a larger pool): one backbone pass each
TEXTURE_RATIO = 1.5  # grey-level spread ratio beyond which a region is rougher / smoother than its match
TEXTURE_MIN_PX = 16  # fewer pixels give no stable spread: texture "similar"


@dataclass(frozen=True)
class RegionEvidence:
    """The good place that matches one region best, and how the region differs from it."""

    region: int  # Region.index
    reference: int  # 0-based index into References.names
    reference_name: str  # the reference's file name (or "reference N")
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the reference, x1/y1 exclusive: the good crop
    location: str  # LOCATION_WORDS entry of that box's centre in the reference
    similarity: float  # mean cosine similarity of the region's patches to the matched window
    query_mean: float  # mean grey (0-255) of the region's pixels in the query
    reference_mean: float  # mean grey of the same pixels of the matched box
    difference: float  # query_mean - reference_mean: < 0 darker than the good place
    texture: str  # "rougher", "smoother" or "similar" (grey-level spread against the good place)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["box"] = list(self.box)
        for key in ("similarity", "query_mean", "reference_mean", "difference"):
            data[key] = round(float(data[key]), 4)
        return data


@dataclass(frozen=True)
class EvidenceIndex:
    """The searched references' features and grey images, computed once per reference set."""

    features: torch.Tensor  # (R, C, h, w) finest-stage embedded features of each searched reference
    greys: tuple[np.ndarray, ...]  # (H, W) grey image of each
    indices: tuple[int, ...]  # their indices into References.names
    names: tuple[str, ...]  # their file names
    neighbourhood: int  # the memory's patch neighbourhood, so queries are embedded alike

    @classmethod
    def build(
        cls,
        references: References,
        reference_images: Sequence[np.ndarray] | Callable[[int], np.ndarray],
        labels: Sequence[str] | None = None,
    ) -> EvidenceIndex:
        """reference_images: one per `references.names`, in that order (the pixels the good crops come from), or
        the function that reads reference i (only the searched ones are read: a large pool stays on disk);
        labels: how answers name them (default: the names), shown as file names."""
        if not callable(reference_images) and len(reference_images) != len(references.names):
            raise ValueError(f"evidence: {len(reference_images)} images for {len(references.names)} references")
        image = reference_images if callable(reference_images) else reference_images.__getitem__
        memory = references.memory
        chosen = searched(len(references.names))
        images = [image(i) for i in chosen]
        features = query_features(memory.backbone.encode(images).patches, memory.cfg.neighbourhood)
        labels = list(labels) if labels is not None else list(references.names)
        names = tuple(Path(labels[i]).name for i in chosen)
        greys = tuple(luma(image) for image in images)
        return cls(features, greys, tuple(chosen), names, memory.cfg.neighbourhood)


class EvidenceSource:
    """Evidence for any query against one reference set; the references' index is built on first need."""

    def __init__(
        self,
        references: References,
        images_by_name: Mapping[str, np.ndarray],
        labels_by_name: Mapping[str, str] | None = None,
    ) -> None:
        self.references = references
        self.images_by_name = images_by_name  # the reference pixels, by the name References gives each
        self.labels_by_name = labels_by_name or {}  # how answers name a reference (its file), by the same names
        self.index: EvidenceIndex | None = None

    def evidence(
        self, pixels: np.ndarray, inspection: Inspection, patches: Sequence[torch.Tensor] | None = None
    ) -> list[RegionEvidence]:
        """Per region, its best good match; `patches` (the query's raw backbone patches) saves an encoding."""
        if not inspection.regions:
            return []
        if self.index is None:
            names = self.references.names
            labels = [self.labels_by_name.get(name, name) for name in names]
            self.index = EvidenceIndex.build(self.references, lambda i: self.images_by_name[names[i]], labels)
        if patches is None:
            patches = list(self.references.memory.backbone.encode([pixels]).patches)
        return region_evidence(pixels, inspection, self.index, patches)


class FileImages(Mapping[str, np.ndarray]):
    """Reference pixels read from their files when first asked for (a profile keeps names, not pixels)."""

    def __init__(self, paths: Mapping[str, Path]) -> None:
        self.paths = dict(paths)  # reference name -> the file it is read from

    def __getitem__(self, name: str) -> np.ndarray:
        from anomalygpt.verdict import working_image  # the size the references were indexed at

        return working_image(load_image(self.paths[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def profile_evidence(references: References, profile: str | Path) -> EvidenceSource | None:
    """Evidence for references loaded from a profile, when the files it was fitted from are still there, unchanged.

    A reference is named as `fit` was given it; relative names are looked for from here, then beside the profile.
    The files evidence reads must have a sha256 the profile recorded, so a changed file, or another folder's file
    of the same name, is never described as the good reference."""
    from anomalygpt.io import file_sha256
    from anomalygpt.profile import read_header

    names, recorded = references.names, list(read_header(profile).get("reference_sha256") or ())
    found = [reference_file(name, Path(profile).parent) for name in names]
    if not recorded or any(path is None for path in found):
        return None
    paths = dict(zip(names, (path for path in found if path is not None), strict=True))
    # One hash per name; when fit dropped duplicate pictures the hashes (of every file given) no longer line up.
    allowed = [{h} for h in recorded] if len(recorded) == len(names) else [set(recorded)] * len(names)
    if any(file_sha256(paths[names[i]]) not in allowed[i] for i in searched(len(names))):
        return None
    return EvidenceSource(references, FileImages(paths))


def reference_file(name: str, profile_folder: Path) -> Path | None:
    """The file a profile's reference name points to: as given, else beside the profile; None when neither is."""
    for path in (Path(name), profile_folder / name):
        if path.is_file():
            return path
    return None


@dataclass
class ChatReferences:
    """What a chat session keeps of its good references: the indexed set, how answers name each one, and the
    source of evidence against them (None when their pixels are not at hand)."""

    references: References
    sources: list[str]
    evidence: EvidenceSource | None


def fitted_references(
    inspector: Inspector, images: Sequence[ImageSource], class_name: str | None, sources: Sequence[str] | None = None
) -> ChatReferences:
    """Index good reference images for a chat; answers name them by `sources` (default "reference N")."""
    from anomalygpt.inspection import reference_name

    references = inspector.fit(images, class_name)
    labels = list(sources) if sources is not None else [f"reference {i + 1}" for i in range(len(images))]
    names = [reference_name(image, i) for i, image in enumerate(images)]
    pixels = {name: load_image(image) for name, image in zip(names, images, strict=True)}
    evidence = EvidenceSource(references, pixels, dict(zip(names, labels, strict=True)))
    return ChatReferences(references, labels, evidence)


def profile_references(inspector: Inspector, path: str | Path) -> ChatReferences:
    """A saved profile's references for a chat (no indexing); evidence when their files are still there."""
    references = inspector.load_profile(path)
    return ChatReferences(references, list(references.names), profile_evidence(references, path))


class ChoosesReferences:
    """How a chat session takes its good references: indexed from images, or a saved profile's. The session
    has `inspector` and `class_name` and defines `reinspect()` (a shown image against the new references)."""

    inspector: Inspector
    class_name: str | None
    references: References | None
    reference_sources: list[str]
    evidence_source: EvidenceSource | None

    def reinspect(self) -> None:
        raise NotImplementedError

    def use(self, chosen: ChatReferences) -> None:
        """New references: a shown image is inspected again, the history cleared."""
        self.references, self.reference_sources, self.evidence_source = (
            chosen.references,
            chosen.sources,
            chosen.evidence,
        )
        self.reinspect()

    def set_references(self, images: Sequence[ImageSource], sources: Sequence[str] | None = None) -> None:
        """Index new good references; a shown image is inspected again (a new inspection, history cleared)."""
        self.use(fitted_references(self.inspector, images, self.class_name, sources))

    def use_profile(self, path: str | Path) -> None:
        """Use the references of a saved profile (no indexing); evidence when their files are still there."""
        self.use(profile_references(self.inspector, path))


def query_features(patches: Sequence[torch.Tensor], neighbourhood: int) -> torch.Tensor:
    """(B, C, h, w) finest-stage embedded features from a backbone's raw patches (per stage (B, C, h, w))."""
    with torch.inference_mode():
        return embed_patches(patches[STAGE : STAGE + 1], neighbourhood)[0]


def region_evidence(
    pixels: np.ndarray,
    inspection: Inspection,
    index: EvidenceIndex,
    patches: Sequence[torch.Tensor],
) -> list[RegionEvidence]:
    """Per region of the Inspection, its best-matching good place; [] without regions.

    patches: the backbone's raw patch features of the query (per stage (1, C, h, w)), as the inspection saw it."""
    if not inspection.regions:
        return []
    query = query_features(patches, index.neighbourhood)[0]  # (C, h, w)
    masks = region_masks(inspection)
    grey = luma(pixels)
    return [best_match(region, masks[region.index], query, index, grey) for region in inspection.regions]


def searched(count: int) -> list[int]:
    """Indices of the references to search: all, or MAX_REFERENCES evenly spaced over a larger pool."""
    if count <= MAX_REFERENCES:
        return list(range(count))
    return sorted({round(i * (count - 1) / (MAX_REFERENCES - 1)) for i in range(MAX_REFERENCES)})


def luma(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W) float64 grey levels."""
    if image.ndim == 2:
        return image.astype(np.float64)
    return image.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)


def region_masks(inspection: Inspection) -> dict[int, np.ndarray]:
    """Region index -> (h, w) bool mask of its pixels inside its box, from the map as find_regions saw it."""
    if inspection.anomaly_map is None:
        raise ValueError("evidence: the inspection carries no anomaly map")
    labels, count = ndimage.label(inspection.anomaly_map > inspection.pixel_threshold, structure=EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    masks = {}
    for region in inspection.regions:
        x0, y0, x1, y1 = region.box
        window = labels[y0:y1, x0:x1]
        found = [label for label in np.unique(window) if label and areas[label] == region.area_px]
        masks[region.index] = window == found[0] if found else np.ones(window.shape, dtype=bool)
    return masks


def cell_span(start: int, stop: int, pixels: int, cells: int) -> tuple[int, int]:
    """The feature cells [a, b) covering pixels [start, stop) of an axis of `pixels` split into `cells`."""
    a = min(cells - 1, math.floor(start * cells / pixels))
    return a, max(a + 1, min(cells, math.ceil(stop * cells / pixels)))


def best_match(
    region: Region, mask: np.ndarray, query: torch.Tensor, index: EvidenceIndex, grey: np.ndarray
) -> RegionEvidence:
    """The reference window most similar to the region's patches (query: (C, h, w))."""
    height, width = grey.shape
    _, cells_h, cells_w = query.shape
    x0, y0, x1, y1 = region.box
    r0, r1 = cell_span(y0, y1, height, cells_h)
    c0, c1 = cell_span(x0, x1, width, cells_w)
    kernel = query[:, r0:r1, c0:c1][None]  # (1, C, kh, kw)
    with torch.inference_mode():
        scores = F.conv2d(index.features, kernel)[:, 0] / kernel[0, 0].numel()  # (R, h', w')
    best = int(scores.flatten(1).amax(dim=1).argmax())
    row, col = divmod(int(scores[best].argmax()), scores.shape[2])
    dy, dx = round((row - r0) * height / cells_h), round((col - c0) * width / cells_w)
    dy, dx = min(max(dy, -y0), height - y1), min(max(dx, -x0), width - x1)  # the moved box stays in the image
    box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
    inside = grey[y0:y1, x0:x1][mask]
    good = index.greys[best][box[1] : box[3], box[0] : box[2]][mask]
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return RegionEvidence(
        region=region.index,
        reference=index.indices[best],
        reference_name=index.names[best],
        box=box,
        location=location_word(centre[0], centre[1], width, height),
        similarity=float(scores[best].max()),
        query_mean=float(inside.mean()),
        reference_mean=float(good.mean()),
        difference=float(inside.mean() - good.mean()),
        texture=texture_word(inside, good),
    )


def texture_word(region: np.ndarray, good: np.ndarray) -> str:
    """'rougher' / 'smoother' when the region's grey spread differs from the good place's by TEXTURE_RATIO."""
    if region.size < TEXTURE_MIN_PX:
        return "similar"
    spread, good_spread = float(region.std()), float(good.std())
    if spread > TEXTURE_RATIO * max(good_spread, 1.0):
        return "rougher"
    if good_spread > TEXTURE_RATIO * max(spread, 1.0):
        return "smoother"
    return "similar"


def crop(image: np.ndarray, box: tuple[int, int, int, int], pad: int = 0) -> np.ndarray:
    """The box of an image, padded by `pad` pixels on each side where the image allows."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    return image[max(0, y0 - pad) : min(height, y1 + pad), max(0, x0 - pad) : min(width, x1 + pad)]
