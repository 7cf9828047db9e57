"""Hand-made inspections with known regions, shared by the guard, grounded, claims and chat-scorer tests."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from anomalygpt.evidence import RegionEvidence
from anomalygpt.inspection import Inspection
from anomalygpt.regions import find_regions

SIDE = 90
# (x, y, width, height, map value, grey) per region; map values set the peak scores, greys the contrast.
THREE = (
    (5, 5, 12, 12, 0.8, 40),  # region 1: top left, compact, darker, medium (1.8%)
    (75, 0, 10, 10, 1.0, 128),  # region 2: top right, touches the top border, about as bright, the highest peak
    (40, 80, 30, 3, 0.9, 128),  # region 3: bottom, elongated, about as bright
)


def inspection_with(
    blobs: tuple[tuple[int, int, int, int, float, int], ...] = THREE, margin: float = 2.0, confidence: str = "medium"
) -> Inspection:
    """An inspection of a SIDE x SIDE grey image whose map is 1 on each blob (value as given), 0 elsewhere."""
    anomaly_map = np.zeros((SIDE, SIDE), dtype=np.float32)
    image = np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)
    for x, y, w, h, value, grey in blobs:
        anomaly_map[y : y + h, x : x + w] = value
        image[y : y + h, x : x + w] = grey
    anomalous = margin > 0
    return Inspection(
        is_anomalous=anomalous,
        score=0.5 + 0.1 * margin,
        threshold=0.5,
        margin=margin,
        confidence=confidence,
        pixel_threshold=0.5,
        regions=find_regions(anomaly_map, 0.5, image) if anomalous else [],
        mode="few-shot",
        n_references=2,
        image_size=(SIDE, SIDE),
        calibration={},
        anomaly_map=anomaly_map,
    )


def evidence_for(inspection: Inspection) -> tuple[RegionEvidence, ...]:
    """Made-up evidence: every region matches reference 2 at the same place, 14 grey levels darker there."""
    return tuple(
        RegionEvidence(r.index, 1, "good2.png", r.box, r.location, 0.8, 100.0, 114.0, -14.0, "similar")
        for r in inspection.regions
    )


NORMAL = inspection_with((), margin=-2.0)
ONE = inspection_with(THREE[:1])
MANY = inspection_with()
SPANNING = inspection_with(((3, 5, 10, 78, 0.9, 40),))  # one bar down the left column: top left to bottom left
WIDESPREAD = inspection_with(((0, 0, 90, 50, 0.9, 40),))  # 56 % of the image: no one place
LOW = replace(inspection_with(margin=0.4, confidence="low"), warnings=["the references do not fit this image"])
# Against a profile of 208 good references, whose conformal threshold gives each inspection its p-value
# and keeps a stated false-alarm rate
CONFORMAL = {"image_threshold": 0.5, "false_alarm_rate": 0.02}
POOL = replace(MANY, mode="pool", n_references=208, p_value=2 / 209, calibration=CONFORMAL)
POOL_NORMAL = replace(NORMAL, mode="pool", n_references=208, p_value=130 / 209, calibration=CONFORMAL)
