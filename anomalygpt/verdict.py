"""The torch-free steps around the anomaly map, shared by the torch Inspector and the exported runtime (no torch):
the working image, grey standardisation, the image score, the verdict with its thresholds and regions, and the
reference-fit check. One definition each, so the two paths cannot drift apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np

from anomalygpt.regions import Region, find_regions, regions_summary

MAX_WORKING_SIDE = 2048  # px: larger images are inspected downscaled (time and memory stay bounded)
STANDARD_GREY = (128.0, 50.0)  # mean and spread of a standardised image's grey levels
THUMB_SIDE = 32  # duplicate check and brightness on grey thumbnails of this side
# A query whose nearest reference is more than FIT_LIMIT times as far as the references' typical spacing does not
# fit (ELPV dev half, bench/bench_pools.py --parts fit --half dev: pools of good cells warn on 0.1-0.7 % of good
# cells of their type and on every cell of the other type; 4 references, a poorer yardstick, on 12-24 % and
# 67-97 %).
FIT_LIMIT = 3.0
# Brightness is checked apart, since standardised images hide it from the appearance: a query more than this many
# spreads from the references' mean grey level does not fit (dev half: < 0.5 % of good cells of a pool's type).
BRIGHTNESS_LIMIT = 4.0
# A threshold from a few references moves with which ones they are. ELPV dev half, draws of k good cells, seeds 0 to
# 19 per cell type (bench/bench_pools.py --parts trust --half dev): draws whose false alarms on the queries that fit
# their references passed 5 %: 3 of 40 at k = 4 (worst 47 %), 6 of 40 at k = 8 (worst 9 %), none at k = 16.
STEADY_REFERENCES = 16


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


# An image whose pixels vary by less than this (grey levels, the most varied channel's standard deviation) shows
# no product: a blank reference is refused, a blank query warned of.
BLANK_STD = 2.0
# A query this close to a reference in appearance (cosine distance) is the same picture: identical pixels give 0 up
# to rounding; the closest two distinct cells of ELPV's development half are 0.0016 apart (1,175 cells, scratch check
# recorded in bench/RESULTS.md), 15 times as far.
SAME_PICTURE_DISTANCE = 1e-4
# Smaller images are inspected with a warning. ELPV's development half, cells and their 4 references shrunk alike
# (bench/bench_small_images.py, 2 draws per type): image AUROC 0.878 at 300 px, 0.874 at 128, 0.868 at 96, 0.853 at
# 64, 0.837 at 48, 0.803 at 32, 0.731 at 16. At 96 px the loss (0.010) is within the spread between two draws of
# references (poly: 0.014 at 300 px, 0.030 at 96); at 64 px (0.025, poly 0.038) it is not. The backbone saw every
# size at its 320 px input, so the limit is the enlargement: a smaller side under 0.3 of the input side (96 of 320).
RELIABLE_SHARE = 0.3


def pixel_spread(image: np.ndarray) -> float:
    """The standard deviation of an (H, W) or (H, W, C) uint8 image's levels, of its most varied channel."""
    _, std = cv2.meanStdDev(image)
    return float(std.max())


# How the trust warnings about the query begin (the figure shows each in short, visualize.SHORT_WARNINGS).
SAME_PICTURE_HEAD = "the image is the same picture as the good reference"
BLANK_HEAD = "the image is blank"
SMALL_HEAD = "the image is only"
FIT_HEAD = "the image does not look like the good references"


def query_warnings(pixels: np.ndarray, fit: dict[str, Any] | None, input_side: int) -> list[str]:
    """Why an inspection of this query cannot be trusted, one line each: it is one of the references, it is blank,
    it is too small to show fine defects at the backbone's input_side, it does not look like the references
    (fit_warning; fit None: no references)."""
    warnings = []
    if fit is not None and float(fit["distance"]) <= SAME_PICTURE_DISTANCE:
        warnings.append(
            f"{SAME_PICTURE_HEAD} {fit['nearest'][0]}: it was scored against itself, so the verdict says nothing "
            "about it; inspect it against references that do not include it"
        )
    spread = pixel_spread(pixels)
    if spread < BLANK_STD:
        warnings.append(
            f"{BLANK_HEAD} (its pixels vary by {spread:.1f} grey levels): there is no product to inspect; check the "
            "camera, the lighting and the file"
        )
    height, width = pixels.shape[:2]
    reliable = math.ceil(RELIABLE_SHARE * input_side)
    if min(height, width) < reliable:
        warnings.append(
            f"{SMALL_HEAD} {width}x{height} px, enlarged {input_side / min(height, width):.1f} times for the model: "
            f"defects a few pixels wide at this size are lost; inspect a picture of {reliable} px or more per side"
        )
    unfit = fit_warning(fit)
    return warnings + ([unfit] if unfit else [])


BATCH_MODE_NOTE = (
    "no references: the image was scored against the other images of its batch; the threshold comes from the "
    "batch's own scores and assumes fewer than half of them are defective"
)


def few_references_note(n_references: int) -> str | None:
    """What to know about a threshold from 2 to STEADY_REFERENCES - 1 references (one has its own caveat)."""
    if not 2 <= n_references < STEADY_REFERENCES:
        return None
    return (
        f"a threshold from {n_references} good references is rough: which {n_references} they are can move it "
        f"enough to flag many good parts or to miss most defects; {STEADY_REFERENCES} or more make it steadier"
    )


def working_image(pixels: np.ndarray) -> np.ndarray:
    """The image downscaled (area interpolation) so that its longer side is at most MAX_WORKING_SIDE, else as is:
    the backbone sees 320 px anyway, and maps, regions and overlays at the file's size grow without bound
    (a 6000 x 6000 query took 14.9 GB before)."""
    height, width = pixels.shape[:2]
    scale = MAX_WORKING_SIDE / max(height, width)
    if scale >= 1.0:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def standardized(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with its grey levels (all channels together) moved to STANDARD_GREY's mean and spread.
    The float32 mapping is worked out for the 256 levels and looked up: the same bytes as mapping every pixel
    (0.38 ms instead of 0.60 for a 300 px image, on every query's decode)."""
    pixels = image.astype(np.float32)
    mean, spread = STANDARD_GREY
    levels = np.arange(256, dtype=np.float32)
    scaled = (levels - pixels.mean()) * (spread / max(float(pixels.std()), 1e-3)) + mean
    return cv2.LUT(image, np.rint(scaled).clip(0, 255).astype(np.uint8))


def grey_thumbnail(image: np.ndarray) -> np.ndarray:
    """(THUMB_SIDE, THUMB_SIDE) float32 grey thumbnail of an (H, W, 3) uint8 image."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def top_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the highest `fraction` of values (at least one)."""
    flat = values.ravel()
    count = max(1, int(round(flat.size * fraction)))
    return float(np.partition(flat, flat.size - count)[-count:].mean())


@dataclass(frozen=True)
class Calibration:
    image_threshold: float
    pixel_threshold: float
    normal_mean: float  # mean held-out score of good references
    normal_spread: float  # their spread (std with a floor): the unit of the margin
    n_scores: int
    method: str  # how the held-out scores were formed, in words
    raw_spread: float = 0.0  # the held-out scores' own std, before the floor (0 with one score)
    # Each held-out reference's score as a query is scored (one per reference, in their order): kept in profiles
    # and eval results, left out of inspection records (up to 512 numbers each).
    reference_scores: tuple[float, ...] = field(default=(), repr=False)
    # The rate of the conformal threshold when it set image_threshold (enough held-out references), else None
    false_alarm_rate: float | None = None

    def __post_init__(self) -> None:  # a JSON list (profiles, eval results) compares equal to what was saved
        object.__setattr__(self, "reference_scores", tuple(float(value) for value in self.reference_scores))

    def margin(self, score: float) -> float:
        """Distance of a score from the threshold in units of the normal spread (> 0: anomalous)."""
        return (score - self.image_threshold) / self.normal_spread

    def p_value(self, score: float) -> float | None:
        """The share of held-out good references scoring at least `score`, counting the query as one of them:
        (1 + count) / (n + 1), the chance that a good part like them scores this high; None unless the conformal
        rule set the threshold (with fewer references the share is too coarse to read)."""
        if self.false_alarm_rate is None or not self.reference_scores:
            return None
        as_high = sum(value >= score for value in self.reference_scores)
        return (1 + as_high) / (len(self.reference_scores) + 1)

    def to_dict(self, scores: bool = False) -> dict[str, Any]:
        """Its fields as JSON values; with the reference scores only when `scores`."""
        data = asdict(self)
        if scores:
            data["reference_scores"] = list(self.reference_scores)
        else:
            del data["reference_scores"]
        return data


def confidence_word(margin: float) -> str:
    """How sure the verdict is, from the margin in units of the normal spread."""
    distance = abs(margin)
    if distance < 1.0:
        return "low"
    return "medium" if distance < 3.0 else "high"


@dataclass
class Inspection:
    """What the detector decided about one image; the assistant explains it and never contradicts it."""

    is_anomalous: bool
    score: float
    threshold: float
    margin: float  # (score - threshold) / normal spread
    confidence: str  # "low", "medium" or "high"
    pixel_threshold: float
    regions: list[Region]
    mode: str  # "few-shot" or "pool" (references), "zero-shot-text" (the decoder) or "zero-shot-batch"
    n_references: int
    image_size: tuple[int, int]  # (H, W) the image was inspected at: the map, boxes and areas are in these pixels
    calibration: dict[str, Any]
    class_name: str | None = None
    source: str | None = None
    # "inspect": this image's time; "index_references": what indexing its reference set took, once, when it was
    # fitted (a profile's: at `anomalygpt fit`, not in this run).
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Why the inspection may not be trusted (references unlike the query, degenerate references...), one line
    # each; every front end shows them before the verdict and the assistant says them first.
    warnings: list[str] = field(default_factory=list)
    # How well the query matches the references: {"distance", "units" (distance in units of the references'
    # own spread), "fits" (bool), "nearest" (names of the nearest references)}; None in zero-shot mode.
    reference_fit: dict[str, Any] | None = None
    source_size: tuple[int, int] | None = None  # (H, W) of the file when it was inspected downscaled, else None
    # sha256 of the file's bytes as they were decoded for this inspection; None for arrays and bytes given in memory
    source_sha256: str | None = None
    # Smallest region kept (px): one cell of the map's resolution, finer detail is interpolation; None: the default
    min_region_px: int | None = None
    # With a conformal threshold (49 or more held-out references): the share of good references scoring at least
    # as high as this image (Calibration.p_value); at sensitivity 0 the verdict is anomalous exactly where it is at
    # or below the calibration's false_alarm_rate. None otherwise.
    p_value: float | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32; saved apart, not in JSON

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    @property
    def notes(self) -> list[str]:
        """What to know about how the verdict was reached, short of a warning (few_references_note), one line
        each: in the record beside the warnings; the front ends show them after the verdict."""
        if self.mode == "zero-shot-batch":
            return [BATCH_MODE_NOTE]
        note = few_references_note(self.n_references)
        return [note] if note else []

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key not in ("anomaly_map", "regions")}
        data["verdict"] = self.verdict
        data["notes"] = self.notes
        data["regions"] = [region.to_dict() for region in self.regions]
        data["image_size"] = list(self.image_size)
        data["source_size"] = None if self.source_size is None else list(self.source_size)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def facts(self) -> str:
        """A short plain-text statement of the inspection, for the LLM's system turn and the CLI."""
        thing = self.class_name or "the product"
        verdict = "ANOMALOUS (defect found)" if self.is_anomalous else "NORMAL (no defect found)"
        lines = [f"Warning: {warning}" for warning in self.warnings] + [
            f"Verdict for {thing}: {verdict}, confidence {self.confidence}.",
            f"Anomaly score {self.score:.4f} vs threshold {self.threshold:.4f} "
            f"(margin {self.margin:+.1f} normal spreads; {self.mode}, {self.n_references} good references).",
            regions_summary(self.regions) if self.is_anomalous else "No anomalous region.",
        ]
        return "\n".join(lines)

    @classmethod
    def decided(
        cls,
        pixels: np.ndarray,
        anomaly_map: np.ndarray,
        score: float,
        calibration: Calibration,
        sensitivity: float,
        min_region_px: int,
        **fields: Any,
    ) -> Inspection:
        """The Inspection of an image's map and score: decide()'s verdict, thresholds and regions, and `fields`
        (mode, n_references, class_name, source, timings_ms, ...)."""
        decision = decide(anomaly_map, pixels, score, calibration, sensitivity, min_region_px)
        return cls(
            is_anomalous=decision.is_anomalous,
            score=score,
            threshold=decision.threshold,
            margin=decision.margin,
            confidence=confidence_word(decision.margin),
            pixel_threshold=decision.pixel_threshold,
            regions=decision.regions,
            image_size=(int(pixels.shape[0]), int(pixels.shape[1])),
            calibration=calibration.to_dict(),
            min_region_px=min_region_px,
            p_value=calibration.p_value(score),
            anomaly_map=anomaly_map,
            **fields,
        )


class Decision(NamedTuple):
    is_anomalous: bool
    margin: float
    threshold: float
    pixel_threshold: float
    regions: list[Region]


def decide(
    anomaly_map: np.ndarray,
    image: np.ndarray,
    score: float,
    calibration: Calibration,
    sensitivity: float = 0.0,
    min_region_px: int | None = None,
) -> Decision:
    """Verdict, margin, thresholds and regions; `sensitivity` > 0 lowers the thresholds by that many spreads.

    A region is an area above the pixel threshold of at least min_region_px (see Inspection.min_region_px) whose
    peak is above the image threshold: the pixel threshold is the good images' 99.9th percentile, so weaker areas
    are what good images show too (bench/bench_regions.py, training pictures: count accuracy on flagged images
    0.178 -> 0.370 with the split at SPLIT_DEPTH).

    The image threshold never goes below the held-out good references' mean score (nor below the calibrated
    threshold, where that is lower): under it, more than a typical good part's score would be flagged, and
    "anomalous, high confidence" would be said of good parts that the p-value calls common (sensitivity 5 took a
    pool's threshold from 0.216 to 0.0002). The pixel threshold moves by the same shift and stays at or below the
    image threshold (an anomalous image has a region), but never below half its calibrated value, where good
    texture itself becomes regions, unless the image threshold is lower still.
    """
    shift = sensitivity * calibration.normal_spread
    lowest = min(calibration.normal_mean, calibration.image_threshold)
    threshold = max(calibration.image_threshold - shift, lowest)
    half = calibration.pixel_threshold / 2
    floor = min(half, threshold) if threshold > 0 else half
    pixel_threshold = max(min(calibration.pixel_threshold - shift, threshold), floor)
    is_anomalous = bool(score > threshold)
    margin = (score - threshold) / calibration.normal_spread
    regions = (
        find_regions(anomaly_map, pixel_threshold, image, min_region_px, min_peak=threshold) if is_anomalous else []
    )
    return Decision(is_anomalous, margin, threshold, pixel_threshold, regions)


@dataclass(frozen=True)
class FitStatistics:
    """What good references look like to the reference-fit check."""

    typical: float  # mean nearest-other-reference appearance distance (cosine): the unit of a query's distance
    n: int  # references the statistics come from (0: one reference, nothing to compare)
    brightness: float = 0.0  # mean grey level of the references
    brightness_spread: float = 0.0  # its spread over the references (std with a floor): the unit of a query's

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_of_distances(
    distance: np.ndarray, brightness: float, stats: FitStatistics, names: Sequence[str], shown: int = 3
) -> dict[str, object]:
    """How well one query matches the references, from its appearance's (R,) cosine distances to theirs: the
    nearest distance, that over the references' typical spacing ("ratio"), its brightness in spreads from theirs
    ("brightness"), whether it fits on both, and the nearest references' names."""
    order = np.argsort(distance, kind="stable")[:shown].tolist()
    nearest = float(distance[order[0]])
    if stats.n == 0:
        return {"distance": round(nearest, 5), "ratio": None, "brightness": None, "fits": None, "nearest": [names[0]]}
    ratio = nearest / stats.typical
    light = (brightness - stats.brightness) / stats.brightness_spread
    return {
        "distance": round(nearest, 5),
        "ratio": round(ratio, 2),
        "brightness": round(light, 2),
        "fits": bool(ratio <= FIT_LIMIT and abs(light) <= BRIGHTNESS_LIMIT),
        "nearest": [names[i] for i in order],
    }


def fit_miss(fit: dict[str, object] | None) -> tuple[str, float] | None:
    """Why a query does not fit its references: ("spacing", its distance ratio) or ("brightness", its signed
    brightness in spreads); None when it fits, or when the fit is unknown."""
    if fit is None or fit.get("fits") is not False:
        return None
    ratio, light = float(fit["ratio"]), float(fit["brightness"])  # type: ignore[arg-type]
    return ("spacing", ratio) if ratio > FIT_LIMIT else ("brightness", light)


def fit_warning(fit: dict[str, object] | None) -> str | None:
    """The one-line warning for a query that does not fit its references, else None."""
    miss = fit_miss(fit)
    if miss is None:
        return None
    reason, value = miss
    if reason == "spacing":
        found = f"it is {value:.1f} times farther from the nearest one than the references are from each other"
    else:
        found = f"it is {abs(value):.1f} spreads {'brighter' if value > 0 else 'darker'} than they are"
    return (
        f"{FIT_HEAD} ({found}): another product, design or lighting, or "
        "a defect over much of it? The verdict compares it with references that do not fit"
    )
