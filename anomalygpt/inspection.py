"""Inspector: image + good references -> Inspection (map, score, threshold, verdict, regions)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from anomalygpt.backbones import VisionBackbone, build_backbone
from anomalygpt.calibration import Calibration, calibrate
from anomalygpt.config import DEFAULT_PRESET, Preset, load_preset
from anomalygpt.io import ImageSource, load_image
from anomalygpt.memory import PatchMemory
from anomalygpt.regions import Region, find_regions, regions_summary

MAX_REFERENCES = 16


class InspectionError(ValueError):
    """The inspection cannot run on these inputs (no references, size mismatch...)."""


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
    mode: str  # "few-shot" (references) or "zero-shot"
    n_references: int
    image_size: tuple[int, int]  # (H, W)
    calibration: dict[str, Any]
    class_name: str | None = None
    source: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # (H, W) float32; saved apart, not in JSON

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key not in ("anomaly_map", "regions")}
        data["verdict"] = self.verdict
        data["regions"] = [region.to_dict() for region in self.regions]
        data["image_size"] = list(self.image_size)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def facts(self) -> str:
        """A short plain-text statement of the inspection, for the LLM's system turn and the CLI."""
        thing = self.class_name or "the product"
        verdict = "ANOMALOUS (defect found)" if self.is_anomalous else "NORMAL (no defect found)"
        lines = [
            f"Verdict for {thing}: {verdict}, confidence {self.confidence}.",
            f"Anomaly score {self.score:.4f} vs threshold {self.threshold:.4f} "
            f"(margin {self.margin:+.1f} normal spreads; {self.mode}, {self.n_references} good references).",
            regions_summary(self.regions) if self.is_anomalous else "No anomalous region.",
        ]
        return "\n".join(lines)


class Decision(NamedTuple):
    is_anomalous: bool
    margin: float
    threshold: float
    pixel_threshold: float
    regions: list[Region]


def decide(
    anomaly_map: np.ndarray, image: np.ndarray, score: float, calibration: Calibration, sensitivity: float = 0.0
) -> Decision:
    """Verdict, margin, thresholds and regions; `sensitivity` > 0 lowers the thresholds by that many spreads."""
    shift = sensitivity * calibration.normal_spread
    threshold = calibration.image_threshold - shift
    pixel_threshold = min(calibration.pixel_threshold - shift, threshold)
    is_anomalous = score > threshold
    margin = (score - threshold) / calibration.normal_spread
    regions = find_regions(anomaly_map, pixel_threshold, image) if is_anomalous else []
    return Decision(is_anomalous, margin, threshold, pixel_threshold, regions)


@dataclass
class References:
    """Good references indexed once (memory + thresholds); reused for every query of the same product."""

    memory: PatchMemory
    calibration: Calibration
    index_ms: float


class Inspector:
    def __init__(self, backbone: VisionBackbone, preset: Preset) -> None:
        self.backbone = backbone
        self.preset = preset

    def fit(self, references: Sequence[ImageSource]) -> References:
        """Index good reference images: patch memory and automatic thresholds."""
        if not references:
            raise InspectionError("no good reference images given: few-shot inspection needs 1 to 16 (--ref)")
        if len(references) > MAX_REFERENCES:
            raise InspectionError(f"{len(references)} references given; at most {MAX_REFERENCES} are supported")
        start = time.perf_counter()
        images = [load_image(ref) for ref in references]
        check_same_size(images, [reference_name(ref, i) for i, ref in enumerate(references)])
        memory = PatchMemory.build(self.backbone, images, self.preset.memory)
        calibration = calibrate(memory, self.preset.calibration)
        return References(memory, calibration, (time.perf_counter() - start) * 1000)

    def inspect(
        self,
        image: ImageSource,
        references: References | Sequence[ImageSource],
        class_name: str | None = None,
        source: str | None = None,
        sensitivity: float = 0.0,
    ) -> Inspection:
        """Inspect one image; `sensitivity` moves both thresholds down by that many normal spreads."""
        refs = references if isinstance(references, References) else self.fit(references)
        pixels = load_image(image)
        if pixels.shape[:2] != refs.memory.image_size:
            h, w = refs.memory.image_size
            raise InspectionError(
                f"{source or 'query'}: {pixels.shape[1]}x{pixels.shape[0]} px but the references "
                f"are {w}x{h} px; use references of the query's size"
            )
        start = time.perf_counter()
        with torch.inference_mode():
            anomaly_map = refs.memory.anomaly_maps([pixels])[0]
        score = refs.memory.image_score(anomaly_map)
        decision = decide(anomaly_map, pixels, score, refs.calibration, sensitivity)
        elapsed = (time.perf_counter() - start) * 1000
        return Inspection(
            is_anomalous=decision.is_anomalous,
            score=score,
            threshold=decision.threshold,
            margin=decision.margin,
            confidence=confidence_word(decision.margin),
            pixel_threshold=decision.pixel_threshold,
            regions=decision.regions,
            mode="few-shot",
            n_references=refs.memory.n_references,
            image_size=refs.memory.image_size,
            calibration=refs.calibration.to_dict(),
            class_name=class_name,
            source=source,
            timings_ms={"inspect": round(elapsed, 1), "index_references": round(refs.index_ms, 1)},
            anomaly_map=anomaly_map,
        )


def reference_name(ref: ImageSource, index: int) -> str:
    return str(ref) if isinstance(ref, (str, Path)) else f"reference {index + 1}"


def check_same_size(images: Sequence[np.ndarray], names: Sequence[str]) -> None:
    sizes = {image.shape[:2] for image in images}
    if len(sizes) > 1:
        listed = ", ".join(f"{name}: {img.shape[1]}x{img.shape[0]}" for name, img in zip(names, images, strict=True))
        raise InspectionError(f"references differ in size ({listed}); use references of one size")


def build_inspector(preset: str | Preset = DEFAULT_PRESET) -> Inspector:
    """The one factory: a preset name, JSON path or Preset -> Inspector with its frozen backbone."""
    cfg = preset if isinstance(preset, Preset) else load_preset(preset)
    backbone = build_backbone(cfg.backbone).to(cfg.device)
    return Inspector(backbone, cfg)
