"""RuntimeInspector: an exported profile inspecting images with onnxruntime or OpenVINO and numpy, no torch."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalygpt.io import ImageSource, load_source
from anomalygpt.regions import map_cell_px
from anomalygpt.runtime import scoring
from anomalygpt.runtime.bundle import Bundle, read_bundle
from anomalygpt.runtime.engines import Engine, open_engine
from anomalygpt.verdict import (
    Inspection,
    fit_of_distances,
    grey_thumbnail,
    query_warnings,
    standardized,
    top_mean,
    working_image,
)


class RuntimeInspectionError(ValueError):
    """A query the runtime cannot inspect (another size than the references); the message is one line."""


@dataclass(frozen=True)
class Memory:
    """The exported memory as float32 numpy arrays, ready to search."""

    banks: list[np.ndarray]  # per stage (N, C) unit patch features
    offsets: list[np.ndarray]  # per stage (R + 1,): rows of reference r are offsets[r] to offsets[r + 1]
    descriptors: np.ndarray  # (R, D) layout descriptors, for retrieval
    appearances: np.ndarray  # (R, C) appearances, for the reference-fit check
    up: list[tuple[np.ndarray, np.ndarray]]  # per stage (H, h), (W, w) bilinear upsampling matrices

    @classmethod
    def of(cls, bundle: Bundle) -> Memory:
        arrays, n = bundle.arrays, bundle.arrays["descriptors"].shape[0]
        stages = range(bundle.n_stages)
        offsets = [
            np.concatenate([[0], np.cumsum(np.bincount(arrays[f"reference{s}"].astype(np.int64), minlength=n))])
            for s in stages
        ]
        return cls(
            banks=[arrays[f"features{s}"].astype(np.float32) for s in stages],
            offsets=offsets,
            descriptors=arrays["descriptors"].astype(np.float32),
            appearances=arrays["appearances"].astype(np.float32),
            up=[(arrays[f"up_rows{s}"], arrays[f"up_cols{s}"]) for s in stages],
        )

    def banks_of(self, references: np.ndarray) -> list[np.ndarray]:
        """Per stage the rows of the given references."""
        return [
            np.concatenate([bank[offsets[r] : offsets[r + 1]] for r in references])
            for bank, offsets in zip(self.banks, self.offsets, strict=True)
        ]


class RuntimeInspector:
    """Inspects images against an exported profile exactly as the torch Inspector does against the profile."""

    def __init__(self, bundle: Bundle, engine: Engine) -> None:
        self.bundle = bundle
        self.engine = engine
        self.memory = Memory.of(bundle)
        self.settings = bundle.memory
        manifest = bundle.manifest
        self.retrieval = 0 < self.settings.retrieve < self.memory.descriptors.shape[0]
        self.n_outputs = len(manifest["outputs"]["features"]), len(manifest["outputs"]["prior"])

    @classmethod
    def open(cls, folder: str | Path, threads: int | None = None) -> RuntimeInspector:
        """A runtime folder written by `anomalygpt export`, checked, with its engine on the CPU."""
        bundle = read_bundle(folder)
        outputs = bundle.manifest["outputs"]
        names = [*outputs["features"], *outputs["prior"]]
        return cls(bundle, open_engine(bundle.engine, bundle.model_path(), names, threads))

    def decoded(self, image: ImageSource, source: str | None) -> tuple[np.ndarray, tuple[int, int], str | None]:
        """The image at its working size, checked against the profile's; the (H, W) of the file and the sha256 of
        its bytes (io.load_source)."""
        original, sha256 = load_source(image)
        pixels = working_image(original)
        if pixels.shape[:2] != self.bundle.image_size:
            h, w = self.bundle.image_size
            raise RuntimeInspectionError(
                f"{source or 'query'}: {pixels.shape[1]}x{pixels.shape[0]} px but the references "
                f"are {w}x{h} px; queries and references must have the same size"
            )
        return pixels, (int(original.shape[0]), int(original.shape[1])), sha256

    def anomaly_maps(self, batch: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """(H, W) anomaly maps of images at the profile's size (one engine call), and their (B, C, h, w)
        last-stage features."""
        inputs = [standardized(pixels) if self.settings.standardize else pixels for pixels in batch]
        outputs = self.engine(np.ascontiguousarray(np.stack(inputs)))
        n_features = self.n_outputs[0]
        feats, priors = outputs[:n_features], outputs[n_features:]
        maps = []
        for i in range(len(batch)):
            own = [stage[i : i + 1] for stage in feats]
            if self.retrieval:
                descriptor = scoring.global_descriptor(own[-1], self.settings.descriptor_grid)
                nearest = scoring.nearest_references(descriptor, self.memory.descriptors, self.settings.retrieve)[0]
                banks = self.memory.banks_of(nearest)
            else:
                banks = self.memory.banks
            stage_maps = scoring.stage_distances(own, banks, self.settings.chunk_elements)
            if priors:
                stage_maps = [m + p[i : i + 1] for m, p in zip(stage_maps, priors, strict=True)]
            maps.append(scoring.fuse_maps(stage_maps, self.memory.up, self.settings.sigma)[0])
        return maps, feats[-1]

    def inspect(
        self, image: ImageSource, class_name: str | None = None, source: str | None = None, sensitivity: float = 0.0
    ) -> Inspection:
        """Inspect one image (a file, array or bytes) as Inspector.inspect does with the profile's references."""
        return next(self.inspect_many([image], class_name, [source], sensitivity))

    def inspect_many(
        self,
        images: Sequence[ImageSource],
        class_name: str | None = None,
        sources: Sequence[str | None] | None = None,
        sensitivity: float = 0.0,
        batch_size: int = 16,
    ) -> Iterator[Inspection]:
        """Inspect images in batches (one engine call per batch); yields what `inspect` gives each, in order."""
        names = list(sources) if sources is not None else [None] * len(images)
        for first in range(0, len(images), batch_size):
            batch_names = names[first : first + batch_size]
            batch = images[first : first + batch_size]
            chunk = [self.decoded(image, name) for image, name in zip(batch, batch_names, strict=True)]
            start = time.perf_counter()
            maps, last = self.anomaly_maps([pixels for pixels, _, _ in chunk])
            share = (time.perf_counter() - start) * 1000 / len(chunk)  # the batch's time, per image
            for i, ((pixels, size, sha256), name) in enumerate(zip(chunk, batch_names, strict=True)):
                inspection = self.finish(pixels, size, maps[i], last[i : i + 1], class_name, name, sensitivity, share)
                inspection.source_sha256 = sha256
                yield inspection

    def finish(
        self,
        pixels: np.ndarray,
        source_size: tuple[int, int],
        anomaly_map: np.ndarray,
        last: np.ndarray,
        class_name: str | None,
        source: str | None,
        sensitivity: float,
        map_ms: float,
    ) -> Inspection:
        """The inspection of one image from its map and (1, C, h, w) last-stage features: reference fit, score,
        thresholds, verdict and regions."""
        start = time.perf_counter()
        manifest = self.bundle.manifest
        brightness = float(grey_thumbnail(pixels).mean())
        distance = scoring.appearance_distance(scoring.appearance(last)[0], self.memory.appearances)
        fit = fit_of_distances(distance, brightness, self.bundle.fit_stats, manifest["references"])
        score = top_mean(anomaly_map, self.settings.top_fraction)
        backbone = manifest["backbone"]
        height, width = pixels.shape[:2]
        min_region_px = map_cell_px(height, width, min(backbone["strides"]), backbone["image_size"])
        elapsed = map_ms + (time.perf_counter() - start) * 1000
        return Inspection.decided(
            pixels,
            anomaly_map,
            score,
            self.bundle.calibration,
            sensitivity,
            min_region_px,
            mode="pool" if self.retrieval else "few-shot",
            n_references=int(self.memory.descriptors.shape[0]),
            class_name=class_name or manifest["class_name"],
            source=source,
            timings_ms={"inspect": round(elapsed, 1), "index_references": round(float(manifest["index_ms"]), 1)},
            warnings=query_warnings(pixels, fit, backbone["image_size"]) + list(manifest["warnings"]),
            reference_fit=fit,
            source_size=None if (height, width) == source_size else source_size,
        )
