"""Anomaly map -> connected regions with box, area, location words and shape/contrast descriptors.

Coordinates are continuous pixel coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1), so a
box (x0, y0, x1, y1) has x1/y1 exclusive and a filled box has its centroid at the box centre.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.segmentation import watershed

WIDESPREAD = "widespread"  # the location of a region covering WIDESPREAD_PCT or more of the image: no one place
LOCATION_WORDS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Every phrase that names a place uses exactly one LOCATION_WORDS entry; answers name places only through these
# phrases (simulation.conversations keeps top/bottom/left/right/center out of all other template text), so an
# evaluator can read the locations off any answer except near_edge's, which names image borders.
LOCATION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
    WIDESPREAD: "across most of the image",
}
# How answers word a region's contrast descriptor.
CONTRAST_PHRASES = {
    "darker": "darker than its surroundings",
    "brighter": "brighter than its surroundings",
    "similar": "about as bright as its surroundings",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Size words by % of the image area. MVTec AD / VisA defects mostly cover well under 1% of the image:
# below 0.5% (about a 16x16 px blob at 224 px, one backbone patch) is a spot an operator must look for,
# 0.5-3% (up to about a 40x40 px blob at 224 px) is plainly visible, and 3% or more is a large area.
SMALL_MAX_PCT = 0.5
MEDIUM_MAX_PCT = 3.0
ELONGATION_RATIO = 3.0  # sqrt(lambda_max / lambda_min) of the pixel-coordinate covariance
CONTRAST_LEVELS = 8.0  # grey-level difference (0-255) between a region and its ring that counts as visible
RING_MIN_PX = 3
RING_FRACTION = 0.1  # ring width as a fraction of the region's equivalent diameter
# Components smaller than 0.01% of the image (and never under 4 px) are interpolation specks from
# upsampling a patch-level map; at 224x224 that is 6 px, at 1024x1024 about a 10x10 px blob.
MIN_AREA_FRACTION = 1e-4
MIN_AREA_FLOOR_PX = 4
# An anomalous area is split at its separate peaks (watershed of the map) when the map dips between them by at
# least this share of the area's peak height above the threshold: two cracks are two regions, one crack's ripples
# are not. Chosen with the inspection's peak rule (decide: a region must peak above the image threshold) on
# simulated defects of the training pictures (bench/bench_regions.py --pictures train): count accuracy on flagged
# images 0.370 (0.25) / 0.301 (0.5) / 0.274 (0.75) / 0.288 (no split) / 0.219 (before: no split, no peak rule).
SPLIT_DEPTH = 0.25
# A region covering this share of the image or more is "widespread": no single place describes it.
WIDESPREAD_PCT = 50.0
# regions.h_maxima labels the map once per distinct candidate peak value (~3.5 ns per pixel each), skimage's sorts
# every pixel once (~200 ns per pixel): past this many values skimage's is the faster way to the same answer.
MAX_LABELLINGS = 48
# A 3x3 grid cell holding this share of a region's pixels (of the cell's, for regions larger than a cell) is part of
# its span ("from the top left to the center").
SPAN_SHARE = 0.15
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    """One connected anomalous region of a thresholded anomaly map."""

    index: int  # 1-based, largest first
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    area_px: int
    area_pct: float  # % of the image area
    centroid: tuple[float, float]  # (x, y) in pixels
    location: str  # one of LOCATION_WORDS, from the centroid on a 3x3 grid; WIDESPREAD for most of the image
    peak_score: float
    mean_score: float
    shape: str  # "elongated" (line-like) or "compact" (spot-like)
    contrast: str  # "darker", "brighter" or "similar" than its surroundings
    size: str  # "small", "medium" or "large"
    # LOCATION_WORDS cells holding SPAN_SHARE or more of the region's pixels, in grid order (raster); () = location
    span: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: lists for tuples, floats rounded to what a reader can use."""
        data = asdict(self)
        data["box"] = list(self.box)
        data["span"] = list(self.span)
        data["area_pct"] = round(self.area_pct, 4)
        data["centroid"] = [round(value, 2) for value in self.centroid]
        data["peak_score"] = _significant(self.peak_score)
        data["mean_score"] = _significant(self.mean_score)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        """Inverse of to_dict (up to its rounding)."""
        span = tuple(data.get("span", ()))
        return cls(**{**data, "box": tuple(data["box"]), "centroid": tuple(data["centroid"]), "span": span})

    @property
    def places(self) -> tuple[str, ...]:
        """Every LOCATION_WORDS cell a statement may truthfully put this region in."""
        return tuple(dict.fromkeys((*self.span, self.location)))

    def where(self) -> str:
        """Its place in a few words: 'top left', 'top left to center' or 'widespread' (labels, tables)."""
        return where_words(self.location, self.span)

    def place(self) -> str:
        """Its place as a phrase: 'in the top left', 'from the top left to the center', 'across most of the
        image'."""
        ends = span_ends(self.span)
        if self.location == WIDESPREAD or ends is None:
            return LOCATION_PHRASES[self.location]
        return f"from the {ends[0]} to the {ends[1]}"

    def describe(self) -> str:
        """Short phrase, e.g. 'a small elongated darker region in the top left (0.8% of the image)'."""
        words = [self.size, self.shape] + ([self.contrast] if self.contrast != "similar" else [])
        return f"a {' '.join(words)} region {self.place()} ({format_pct(self.area_pct)} of the image)"


def where_words(location: str, span: Sequence[str]) -> str:
    """Region.where() from a region's location and span words, as its JSON record holds them."""
    ends = span_ends(span)
    return location if location == WIDESPREAD or ends is None else f"{ends[0]} to {ends[1]}"


def span_ends(span: Sequence[str]) -> tuple[str, str] | None:
    """The two cells of a span farthest apart on the grid, in raster order; None for a span of one cell."""
    if len(span) < 2:
        return None
    cells = [(LOCATION_WORDS.index(word) // 3, LOCATION_WORDS.index(word) % 3, word) for word in span]
    pairs = [(a, b) for i, a in enumerate(cells) for b in cells[i + 1 :]]
    first, last = max(pairs, key=lambda pair: (pair[0][0] - pair[1][0]) ** 2 + (pair[0][1] - pair[1][1]) ** 2)
    return first[2], last[2]


def _significant(value: float) -> float:
    """Value kept to 6 significant digits, so small scores keep their precision."""
    return float(f"{value:.6g}")


def format_pct(pct: float) -> str:
    """Percentage with as many digits as its size deserves: '12%', '0.8%', '0.043%'."""
    if pct >= 10:
        return f"{pct:.0f}%"
    if pct >= 0.1:
        return f"{pct:.1f}%"
    return f"{pct:.2g}%"


def location_word(x: float, y: float, width: int, height: int) -> str:
    """Word for the 3x3 grid cell holding point (x, y) of a width x height image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"location_word: image size must be positive, got {width}x{height}")
    return LOCATION_WORDS[3 * _third(y, height) + _third(x, width)]


def _third(value: float, extent: int) -> int:
    """0, 1 or 2: which third of [0, extent) the coordinate falls in."""
    if value < extent / 3:
        return 0
    if value >= 2 * extent / 3:
        return 2
    return 1


def default_min_area_px(height: int, width: int) -> int:
    """Smallest kept component: max(4 px, 0.01% of the image area)."""
    return max(MIN_AREA_FLOOR_PX, math.ceil(MIN_AREA_FRACTION * height * width))


def map_cell_px(height: int, width: int, stride: int, input_side: int) -> int:
    """Pixels of an (height, width) image covered by one cell of a map the backbone computed at `stride` on its
    input_side x input_side input: the finest detail the map resolves, so the smallest region worth naming."""
    if stride < 1 or input_side < 1:
        raise ValueError(f"map_cell_px: stride and input side must be positive, got {stride}, {input_side}")
    return max(1, math.ceil((stride * height / input_side) * (stride * width / input_side)))


def find_regions(
    score_map: np.ndarray,
    threshold: float,
    image: np.ndarray | None = None,
    min_area_px: int | None = None,
    split_depth: float | None = SPLIT_DEPTH,
    min_peak: float | None = None,
) -> list[Region]:
    """Regions of score_map > threshold, largest first (ties in raster order): 8-connected components, each split
    at its separate peaks (see SPLIT_DEPTH; None keeps components whole); parts under min_area_px, and with
    min_peak those whose peak score is not above it, are dropped."""
    scores = _checked_scores(score_map)  # (H, W)
    height, width = scores.shape
    if not math.isfinite(threshold):
        raise ValueError(f"find_regions: threshold must be a finite number, got {threshold}")
    min_area = default_min_area_px(height, width) if min_area_px is None else min_area_px
    if min_area < 1:
        raise ValueError(f"find_regions: min_area_px must be at least 1, got {min_area_px}")
    if split_depth is not None and not 0.0 < split_depth <= 1.0:
        raise ValueError(f"find_regions: split_depth must be in (0, 1], got {split_depth}")
    grey = None if image is None else _grey(image, scores.shape)  # (H, W)
    mask = scores > threshold  # (H, W)
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)  # (H, W) int
    if split_depth is not None:
        labels, count = split_at_peaks(scores, labels, count, threshold, split_depth, min_area)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    boxes = ndimage.find_objects(labels)
    kept = [label for label in range(1, count + 1) if areas[label] >= min_area]
    if min_peak is not None:  # each peak from its own box (ndimage.maximum sorts the whole map: 5 ms a call)
        kept = [label for label in kept if scores[boxes[label - 1]][labels[boxes[label - 1]] == label].max() > min_peak]
    kept.sort(key=lambda label: -areas[label])  # stable: equal areas stay in raster order
    return [
        _region(index, labels, label, boxes[label - 1], scores, grey, mask) for index, label in enumerate(kept, start=1)
    ]


def split_at_peaks(
    scores: np.ndarray, labels: np.ndarray, count: int, threshold: float, depth: float, min_area: int
) -> tuple[np.ndarray, int]:
    """Labels with each component of at least 2 x min_area px cut into the watershed basins of its peaks that
    stand `depth` x (its peak - threshold) above the saddles between them; returns (labels, count)."""
    out = np.zeros_like(labels)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    next_label = 0
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[box] == label  # (h, w)
        parts, n_parts = component.astype(labels.dtype), 1
        if areas[label] >= 2 * min_area:
            crop = np.where(component, scores[box], threshold)  # (h, w); outside the component: the threshold
            height = depth * float(crop.max() - threshold)
            markers, n_peaks = ndimage.label(h_maxima(crop, height, component), structure=EIGHT_CONNECTED)
            if n_peaks > 1:
                parts = watershed(-crop, markers, mask=component, connectivity=2)
                n_parts = n_peaks
        out[box][component] = parts[component] + next_label
        next_label += n_parts
    return out, next_label


def h_maxima(image: np.ndarray, h: float, within: np.ndarray | None = None) -> np.ndarray:
    """skimage.morphology.h_maxima(image, h) of a float64 (H, W) image, 8-connected, pixel for pixel (and only
    those in the boolean mask `within`, when given): the pixels x with image[x] - R[x] >= h, R the grey
    reconstruction by dilation of image - h - resolution under image.

    skimage sorts every pixel (11 ms per defective ELPV cell, half of its regions' time); this tests only the
    near-local maxima, since a pixel with a higher neighbour is never one. Pixel x is not one exactly when a pixel
    y whose marker stands within h of image[x] reaches x through pixels that all stand within h of image[x]
    (float subtraction is monotone, so the test is the reconstruction's to the last bit): one 8-connected
    labelling per distinct candidate value, so past MAX_LABELLINGS values (a map with many small peaks) skimage's
    sort is the cheaper way to the same answer, and is taken."""
    out = np.zeros(image.shape, np.uint8)  # (H, W)
    if h > np.ptp(image):
        return out
    marker = image - h - 2 * np.finfo(image.dtype).resolution * np.abs(image)  # as skimage's, (H, W)
    # A neighbour higher by more than rounding (~1e-15 relative) rules a pixel out; 1e-9 keeps every near-tie.
    slack = 1e-9 * max(float(np.abs(image).max()), h)
    candidates = image >= cv2.dilate(image, np.ones((3, 3), np.uint8)) - slack  # (H, W)
    rows, cols = np.nonzero(candidates if within is None else candidates & within)
    values = image[rows, cols]
    distinct = np.unique(values)
    if len(distinct) > MAX_LABELLINGS:
        found = morphology.h_maxima(image, h)
        return found if within is None else found * within
    for value in distinct:
        pick = values == value
        high = value - marker < h  # (H, W): markers within h of value
        kept = np.ones(int(pick.sum()), bool)
        if high.any():  # (none for the top value, as a rule)
            n_labels, labels = cv2.connectedComponents((value - image < h).view(np.uint8), connectivity=8)
            reached = np.zeros(n_labels, bool)
            reached[labels[high]] = True
            kept = ~reached[labels[rows[pick], cols[pick]]]
        out[rows[pick][kept], cols[pick][kept]] = 1
    return out


def _checked_scores(score_map: np.ndarray) -> np.ndarray:
    """score_map as (H, W) float64, rejecting wrong shapes and non-finite values."""
    scores = np.asarray(score_map, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"find_regions: score_map must be a non-empty (H, W) array, got {scores.shape}")
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        raise ValueError(f"find_regions: score_map has {bad} non-finite values (NaN or inf)")
    return scores


def _grey(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 image -> (H, W) float64 luma."""
    if image.dtype != np.uint8 or image.shape[:2] != shape or image.ndim not in (2, 3):
        raise ValueError(
            f"find_regions: image must be uint8 {shape} or {shape + (3,)}, got {image.dtype} {image.shape}"
        )
    if image.ndim == 2:
        return image.astype(np.float64)
    if image.shape[2] != 3:
        raise ValueError(f"find_regions: image must have 3 channels, got {image.shape}")
    return image.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)


def _region(
    index: int,
    labels: np.ndarray,
    label: int,
    box: tuple[slice, slice],
    scores: np.ndarray,
    grey: np.ndarray | None,
    mask: np.ndarray,
) -> Region:
    """Describe the component `label` whose bounding slices are `box`."""
    rows_slice, cols_slice = box
    component = labels[box] == label  # (h, w)
    rows, cols = np.nonzero(component)
    rows, cols = rows + rows_slice.start, cols + cols_slice.start
    values = scores[box][component]
    height, width = scores.shape
    area_pct = 100.0 * rows.size / (height * width)
    centroid = (float(cols.mean()) + 0.5, float(rows.mean()) + 0.5)
    widespread = area_pct >= WIDESPREAD_PCT
    return Region(
        index=index,
        box=(cols_slice.start, rows_slice.start, cols_slice.stop, rows_slice.stop),
        area_px=int(rows.size),
        area_pct=area_pct,
        centroid=centroid,
        location=WIDESPREAD if widespread else location_word(centroid[0], centroid[1], width, height),
        peak_score=float(values.max()),
        mean_score=float(values.mean()),
        shape=shape_word(rows, cols),
        contrast="similar" if grey is None else _contrast_word(grey, labels, label, box, mask),
        size=size_word(area_pct),
        span=grid_span(rows, cols, height, width),
    )


def grid_span(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> tuple[str, ...]:
    """LOCATION_WORDS cells (grid order) where the region of pixels (rows, cols) of a height x width image has at
    least SPAN_SHARE of the smaller of its area and the cell's: a small region's main cells, every cell a large
    one covers well (the fullest cell when none qualifies)."""
    # Pixel centres, as location_word reads a centroid: floor(3 (r + 1/2) / height), in integers (7x as fast on a
    # 20,000 px region as the same floor in floats).
    grid_rows = np.minimum((6 * rows + 3) // (2 * height), 2)
    grid_cols = np.minimum((6 * cols + 3) // (2 * width), 2)
    counts = np.bincount(3 * grid_rows + grid_cols, minlength=9)
    chosen = np.flatnonzero(counts >= SPAN_SHARE * min(rows.size, height * width / 9))
    if chosen.size == 0:
        chosen = np.array([int(counts.argmax())])
    return tuple(LOCATION_WORDS[i] for i in chosen)


def shape_word(rows: np.ndarray, cols: np.ndarray) -> str:
    """'elongated' when the pixel cloud's principal axes differ by ELONGATION_RATIO or more."""
    coords = np.stack([cols, rows]).astype(np.float64)  # (2, N)
    # Each pixel is a unit square with variance 1/12 per axis: this keeps lambda_min > 0 and gives a
    # 1-px-wide straight line of length L a ratio of exactly L, so lines from 3 px up are elongated.
    covariance = np.cov(coords, bias=True).reshape(2, 2) + np.eye(2) / 12.0
    low, high = np.linalg.eigvalsh(covariance)
    return "elongated" if math.sqrt(high / low) >= ELONGATION_RATIO else "compact"


def _contrast_word(grey: np.ndarray, labels: np.ndarray, label: int, box: tuple[slice, slice], mask: np.ndarray) -> str:
    """Compare the region's mean grey with a ring around it that excludes every anomalous pixel."""
    rows_slice, cols_slice = box
    area = int(np.count_nonzero(labels[box] == label))
    radius = max(RING_MIN_PX, round(RING_FRACTION * math.sqrt(4.0 * area / math.pi)))
    window = (
        slice(max(rows_slice.start - radius, 0), min(rows_slice.stop + radius, grey.shape[0])),
        slice(max(cols_slice.start - radius, 0), min(cols_slice.stop + radius, grey.shape[1])),
    )
    component = labels[window] == label  # (h, w)
    # Distance to the component <= radius is a disk dilation at O(pixels) cost (OpenCV's exact Euclidean distance:
    # scipy's distance_transform_edt's, 4x faster).
    distance = cv2.distanceTransform((~component).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # (h, w)
    ring = (distance <= radius) & ~mask[window]  # (h, w)
    if not ring.any():
        return "similar"
    difference = grey[window][component].mean() - grey[window][ring].mean()
    if difference > CONTRAST_LEVELS:
        return "brighter"
    if difference < -CONTRAST_LEVELS:
        return "darker"
    return "similar"


def size_word(area_pct: float) -> str:
    """'small', 'medium' or 'large' from the % of the image area."""
    if area_pct < SMALL_MAX_PCT:
        return "small"
    if area_pct < MEDIUM_MAX_PCT:
        return "medium"
    return "large"


def regions_summary(regions: list[Region]) -> str:
    """One sentence for the chat facts: 'No anomalous region.' or '2 anomalous regions: a ...; a ....'."""
    if not regions:
        return "No anomalous region."
    noun = "region" if len(regions) == 1 else "regions"
    return f"{len(regions)} anomalous {noun}: " + "; ".join(region.describe() for region in regions) + "."


def join_words(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def number_word(count: int) -> str:
    """'one'...'ten', digits above."""
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def where_phrase(regions: Sequence[Region], spans: bool = True) -> str:
    """Every region's place: 'in the top left', 'from the left to the center', or 'two in the top left and one at
    the bottom'; spans=False names each region's centroid cell only (the simulated training conversations' form,
    which the shipped assistant learned)."""
    places = [place_of(region, spans) for region in regions]
    groups = list(dict.fromkeys(places))  # first appearance, i.e. largest region first
    if len(groups) == len(places):
        return join_words(groups)
    if spans and counts_would_mislead(regions, places):
        return join_words([f"region {region.index} {place}" for region, place in zip(regions, places, strict=True)])
    return join_words([f"{number_word(places.count(place))} {place}" for place in groups])


def counts_would_mislead(regions: Sequence[Region], places: Sequence[str]) -> bool:
    """Whether counting regions by phrase could undercount a place ('two in the bottom left' while a region from the
    left to the bottom left reaches it too): two regions described by different phrases share a cell. Each region
    is then named by number."""
    for region, place in zip(regions, places, strict=True):
        for other, other_place in zip(regions, places, strict=True):
            if other_place != place and set(region.places) & set(other.places):
                return True
    return False


def place_of(region: Region, spans: bool) -> str:
    """Region.place(), or with spans=False the phrase of its centroid cell alone (see where_phrase)."""
    return region.place() if spans else LOCATION_PHRASES[region.location]


def size_details(regions: Sequence[Region], spans: bool = True) -> str:
    """Every region's size word and area, largest first: 'region 1 on the left is large at 6.1%; region 2 ...'."""
    return "; ".join(f"region {r.index} {place_of(r, spans)} is {r.size} at {format_pct(r.area_pct)}" for r in regions)


def appearance_details(regions: Sequence[Region], spans: bool = True) -> str:
    """Every region's shape and contrast: 'region 1 on the left is compact and darker than its surroundings; ...'."""
    return "; ".join(
        f"region {r.index} {place_of(r, spans)} is {r.shape} and {CONTRAST_PHRASES[r.contrast]}" for r in regions
    )


# A box within 5% of the shorter side from a border is "near the edge": at 256 px that is 13 px, about where
# fixtures, clamps and the image border itself can cause or hide a defect.
EDGE_MARGIN_FRACTION = 0.05
BORDERS = ("top", "bottom", "left", "right")


def edge_margin_px(width: int, height: int) -> int:
    """Largest gap (px) between a box and a border that still counts as near the edge."""
    return max(1, round(EDGE_MARGIN_FRACTION * min(width, height)))


def border_gaps(region: Region, width: int, height: int) -> dict[str, int]:
    """Pixels between the region's box and each image border (0: touching), in BORDERS order."""
    x0, y0, x1, y1 = region.box
    return {"top": y0, "bottom": height - y1, "left": x0, "right": width - x1}


def near_borders(region: Region, width: int, height: int) -> list[str]:
    """Borders within edge_margin_px of the region's box, in BORDERS order."""
    margin = edge_margin_px(width, height)
    return [side for side, gap in border_gaps(region, width, height).items() if gap <= margin]
